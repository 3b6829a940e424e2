"""The HTTP server's configuration: uvicorn with the request head bounded in size and time.

uvicorn's fast parser (httptools) sets no limit on a request's headers and no deadline for
them: a client without any key could stream a 300 MB header (the event loop parses it, the
memory stays) or hold thousands of connections open with half a request line. Every
connection here must finish each request head (request line + headers) within
`server.header_read_timeout` and `server.max_header_bytes`, else it gets 408 or 431 in the
one error shape and is closed. Bodies are bounded later, after authentication
(`app.limits.RequestGate`).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import error_body

if TYPE_CHECKING:
    import uvicorn

    from app.settings import ServerSettings

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class BoundedHeadProtocol(HttpToolsProtocol):
    """httptools' protocol, refusing request heads that are too large or too slow."""

    max_head_bytes = 65_536
    head_timeout = 10.0
    #: Seconds a refused connection is kept half-open, its input read and dropped: closing
    #: at once while the client still sends makes the kernel answer with a reset, which
    #: can discard the refusal before the client reads it.
    linger_seconds = 2.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._in_head = True  # the bytes that arrive now belong to a request head
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the rest of a refused request: dropped until the connection closes
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # still in the head after this chunk (httptools calls on_headers_complete while fed)
        if self._in_head and self._head_bytes > self.max_head_bytes \
                and not self.transport.is_closing():
            self._refuse(431, "request_header_too_large",
                         f"The request line and headers are larger than the server accepts "
                         f"({self.max_head_bytes} bytes; server.max_header_bytes).")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0  # what comes next is the next request

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._in_head and not self.transport.is_closing():
            self._arm_head_timer()  # the keep-alive wait for the next request starts here

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes == 0:  # an idle connection: nothing to answer
            self.transport.close()
            return
        self._refuse(408, "request_header_timeout",
                     f"The request line and headers did not arrive within "
                     f"{self.head_timeout:g} s (server.header_read_timeout).")

    def _refuse(self, status: int, code: str, message: str) -> None:
        body = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
        head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body)))
        self.transport.write(head + body)
        self._refused = True
        self._disarm_head_timer()
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer, then FIN; the client's rest is read
            self.loop.call_later(self.linger_seconds, self.transport.close)
        else:
            self.transport.close()


def server_config(app: Any, server: ServerSettings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration for `app` under the `server` settings (`overrides` win)."""
    import uvicorn

    protocol = type("HeadBounds", (BoundedHeadProtocol,), {
        "max_head_bytes": server.max_header_bytes, "head_timeout": server.header_read_timeout})
    trusted = server.forwarded_allow_ips
    options: dict[str, Any] = {
        "host": server.host, "port": server.port, "log_level": server.log_level,
        # The log is configured once (app.telemetry), uvicorn's lines included; our access
        # line (with the request id, key id and tokens) replaces uvicorn's.
        "log_config": None, "access_log": False,
        "timeout_graceful_shutdown": int(server.graceful_shutdown_seconds),
        # Idle keep-alive connections live as long as a head may take (header_read_timeout
        # closes them then): longer than the 5 s clients (httpx, the openai SDK) keep them,
        # so a client never sends on a connection the server is closing at the same moment.
        "timeout_keep_alive": max(6, math.ceil(server.header_read_timeout)),
        "http": protocol,
        # uvicorn trusts X-Forwarded-For from 127.0.0.1 unless told otherwise: a local tunnel
        # would then let any client pick its address (and dodge the failed-key throttle).
        "proxy_headers": trusted is not None, "forwarded_allow_ips": trusted,
    }
    return uvicorn.Config(app, **{**options, **overrides})
