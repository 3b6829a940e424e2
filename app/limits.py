"""ASGI middleware in front of every route: authenticate from the headers, then read the
body, bounded in size, time and concurrency, before any route sees it.

Nothing of a request that needs a key is read before its key is checked: an unauthenticated
request is answered 401 from its headers alone (uvicorn discards the body it then sends), so
clients without a key cannot make the server hold their bodies. An authenticated body is
read within `server.body_read_timeout` (else 408) and at most `server.max_body_reads` bodies
are read at once (the others wait their turn): a slow sender holds a slot for a bounded time.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import anyio
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth.deps import identify, remember_key
from app.auth.setup import STORE_ERRORS, store_unavailable
from app.auth.throttle import client_address
from app.errors import BodyReadTimeout, PayloadTooLarge, response_for
from app.settings import ServerSettings
from backends.errors import LLMAPIError


class BodyReads:
    """The cap on bodies read at once, with its counts (`app.state.body_reads`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reading = 0
        self.waiting = 0
        self.peak = 0  # the most bodies read at once since the start
        self._slots = anyio.Semaphore(limit)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.reading += 1
        self.peak = max(self.peak, self.reading)
        try:
            yield
        finally:
            self.reading -= 1
            self._slots.release()


def _has_body(headers: Headers) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", "0") != "0"


class RequestGate:
    """Authentication before the body, then a bounded body read replayed to the app."""

    def __init__(self, app: ASGIApp, server: ServerSettings, reads: BodyReads,
                 open_routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.max_bytes = server.max_body_bytes
        self.timeout = server.body_read_timeout
        self.reads = reads
        self.open_routes = open_routes  # the routes served without a key (health's)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(self._too_large(), scope, receive, send)
            return
        if any(_full(route, scope) for route in self.open_routes):
            await self.app(scope, receive, send)  # health: no key, and it reads no body
            return
        try:
            routed = await self._authenticate(scope, headers)
            messages = await self._read(receive) if routed and _has_body(headers) else []
        except STORE_ERRORS as exc:
            await self._refuse(store_unavailable(exc), scope, receive, send)
            return
        except LLMAPIError as exc:
            await self._refuse(exc, scope, receive, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay if messages else receive, send)

    async def _authenticate(self, scope: Scope, headers: Headers) -> bool:
        """Check the key (every route but the open ones needs one, so a route added later is
        behind the key before its body is read too). False when the key is refused but no
        route takes the request: the router answers it (404, 405) without reading the body."""
        state = scope["app"].state
        if not state.accounts.enabled:
            return True
        try:
            remember_key(scope, await identify(state, headers, client_address(scope)))
        except LLMAPIError:
            routes: list[BaseRoute] = scope["app"].router.routes
            if any(_full(route, scope) for route in routes):  # matched only when refused:
                raise  # matching costs ~50 us on FastAPI's included routers
            return False
        return True

    async def _read(self, receive: Receive) -> list[Message]:
        """The whole body (bounded), as the messages that carried it."""
        messages: list[Message] = []
        size = 0
        async with self.reads.slot():
            with anyio.move_on_after(self.timeout) as timer:
                while True:
                    message = await receive()
                    messages.append(message)
                    if message["type"] != "http.request":
                        break  # the client left: the app sees the disconnect
                    size += len(message.get("body", b""))
                    if size > self.max_bytes:
                        raise self._too_large()
                    if not message.get("more_body", False):
                        break
        if timer.cancelled_caught:
            raise BodyReadTimeout(f"The request body did not arrive within {self.timeout:g} s "
                                  "(server.body_read_timeout); send it faster.")
        return messages

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than the server accepts "
                               f"({self.max_bytes} bytes; see server.max_body_bytes).")

    @staticmethod
    async def _refuse(exc: LLMAPIError, scope: Scope, receive: Receive, send: Send) -> None:
        await response_for(exc)(scope, receive, send)


def _full(route: BaseRoute, scope: Scope) -> bool:
    return route.matches(scope)[0] is Match.FULL
