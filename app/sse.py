"""Server-sent events on sse-starlette, with a cheap path for the one-event-per-token case.

`EventStream` is sse-starlette's `EventSourceResponse` (disconnect watching, keep-alive pings,
graceful shutdown) that sends each event directly when no per-send timeout is set (ours never
sets one): the library wraps every send in an anyio cancel scope, which costs more than the
rest of a token's trip through the event loop. `data_event` pre-encodes a one-line `data:`
event to the exact bytes sse-starlette would produce, skipping its encoder for every token.
"""

from __future__ import annotations

from typing import Any

from sse_starlette import EventSourceResponse
from starlette.types import Message, Send

SEP = "\n"


class EventStream(EventSourceResponse):
    """`EventSourceResponse` with `sep="\\n"` and no per-event cancel scope."""

    def __init__(self, content: Any, status_code: int = 200, ping: float | None = None,
                 **kwargs: Any) -> None:  # status_code: FastAPI's OpenAPI reads its default
        super().__init__(content, status_code=status_code, sep=SEP, ping=ping, **kwargs)

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)


def data_event(data: str) -> bytes | dict[str, str]:
    """`data: <data>` as bytes when it is one line, else the dict sse-starlette splits into
    several `data:` lines."""
    if "\n" in data or "\r" in data:
        return {"data": data}
    return b"data: " + data.encode() + b"\n\n"
