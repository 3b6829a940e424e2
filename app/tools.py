"""Tool calls in chat answers: the model's text turned into OpenAI `tool_calls`, whole or
streamed, in the model's own format (`backends.toolcalls`, reported by its engine).

A streamed call goes out as OpenAI streams it: its first delta carries `index`, `id`,
`type` and the function's name, the next ones fragments of `arguments`; text around calls
stays `content`. The answer's finish reason is `tool_calls` when it made any.
"""

from __future__ import annotations

from typing import Any

from backends.chat_messages import nine_char_id
from backends.toolcalls import (
    FORMATS,
    CallDelta,
    ContentDelta,
    ToolCall,
    ToolCallStream,
    parse_tool_calls,
)


def call_id(tool_format: str, given: str) -> str:
    """The id a call goes out with: Mistral's templates take only 9 alphanumerics back."""
    return nine_char_id(given) if tool_format == "mistral" else given


def tool_call_out(call: ToolCall, tool_format: str) -> dict[str, Any]:
    return {"id": call_id(tool_format, call.id), "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def split_calls(text: str, tool_format: str,
                names: list[str]) -> tuple[str | None, list[dict[str, Any]] | None]:
    """A whole answer's content (None when it is only calls) and its calls (None: none)."""
    parsed = parse_tool_calls(text, FORMATS[tool_format], names)
    if not parsed.tool_calls:
        return text, None
    return (parsed.content or None), [tool_call_out(c, tool_format) for c in parsed.tool_calls]


class CallDeltas:
    """One streamed choice's text turned into chat deltas: `content` ones and
    `tool_calls` ones."""

    def __init__(self, tool_format: str, names: list[str]) -> None:
        self._stream = ToolCallStream(FORMATS[tool_format], names)
        self._format = tool_format
        self.called = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._deltas(self._stream.feed(text))

    def close(self) -> list[dict[str, Any]]:
        return self._deltas(self._stream.close())

    def _deltas(self, parts: list[ContentDelta | CallDelta]) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        for part in parts:
            if isinstance(part, ContentDelta):
                if part.text:
                    deltas.append({"content": part.text})
                continue
            self.called = True
            call: dict[str, Any] = {"index": part.index}
            if part.id is not None:
                call.update(id=call_id(self._format, part.id), type="function")
            function: dict[str, Any] = {"arguments": part.arguments}
            if part.name is not None:
                function["name"] = part.name
            call["function"] = function
            deltas.append({"tool_calls": [call]})
        return deltas
