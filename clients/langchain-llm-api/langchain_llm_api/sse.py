"""A small server-sent events parser that follows the WHATWG event-stream rules.

Lines come already split (httpx's `iter_lines` splits on CR, LF and CRLF). Comment lines
(keep-alives such as `: ping`) are ignored; several `data:` lines of one event are joined with
newlines; an event is dispatched at a blank line; a field's value loses one leading space; an
event without data is not dispatched; an unterminated event at the end is discarded.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None


@dataclass
class SSEDecoder:
    """Feed lines one by one; `feed` returns an event when a blank line completes one."""

    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _last_id: str | None = None

    def feed(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        return None  # "retry" and unknown fields are ignored

    def _dispatch(self) -> ServerSentEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return ServerSentEvent(data="\n".join(data), event=event or "message", id=self._last_id)


def iter_events(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    decoder = SSEDecoder()
    for line in lines:
        event = decoder.feed(line.rstrip("\r\n"))
        if event is not None:
            yield event


async def aiter_events(lines: AsyncIterable[str]) -> AsyncIterator[ServerSentEvent]:
    decoder = SSEDecoder()
    async for line in lines:
        event = decoder.feed(line.rstrip("\r\n"))
        if event is not None:
            yield event
