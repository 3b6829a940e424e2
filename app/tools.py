"""Chat answers taken apart: the model's reasoning (its think block) into
`reasoning_content`, its tool calls into OpenAI `tool_calls`, the rest `content`; whole or
streamed, in the model's own formats (`backends.toolcalls`, reported by its engine).

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
    ReasoningStream,
    ToolCall,
    ToolCallStream,
    parse_tool_calls,
    split_reasoning,
)

#: The tool-call format and the names of the tools of a request, when it has tools.
ToolSpec = tuple[str, list[str]]


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


class Parsing:
    """How a request's answers are taken apart: its tools (None: no tool calls), the
    model's think markers (None: no reasoning) and whether the answer starts inside them
    (None: tell from the text)."""

    def __init__(self, tools: ToolSpec | None, reasoning: dict[str, Any] | None,
                 opened: bool | None, forced: bool = False) -> None:
        self.tools = tools
        self.reasoning = reasoning
        self.opened = opened
        # tool_choice required/named: the grammar makes the whole answer calls, so any
        # text left is a call cut short by max_tokens, not content.
        self.forced = forced

    @property
    def active(self) -> bool:
        return self.tools is not None or self.reasoning is not None

    def whole(self, text: str) -> tuple[str | None, str | None, list[dict[str, Any]] | None]:
        """(reasoning, content, calls) of a whole answer."""
        thought = None
        if self.reasoning is not None:
            thought, text = split_reasoning(text, self.reasoning["open"],
                                            self.reasoning["close"], started=self.opened)
        if self.tools is None:
            return thought, text, None
        content, calls = split_calls(text, *self.tools)
        return thought, None if self.forced else content, calls

    def stream(self) -> AnswerDeltas:
        return AnswerDeltas(self)


class AnswerDeltas:
    """One streamed choice's text as chat deltas: reasoning_content, content, tool_calls."""

    def __init__(self, parsing: Parsing) -> None:
        reasoning = parsing.reasoning
        self._thinking = ReasoningStream(reasoning["open"], reasoning["close"],
                                         started=parsing.opened) if reasoning else None
        self._calls = CallDeltas(*parsing.tools) if parsing.tools else None
        self._forced = parsing.forced

    @property
    def called(self) -> bool:
        return self._calls is not None and self._calls.called

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self._thinking is None:
            return self._unforced(self._content(text))
        return self._unforced(self._split(self._thinking.feed(text)))

    def _unforced(self, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A forced answer's deltas without content (see `Parsing.forced`)."""
        return [d for d in deltas if "content" not in d] if self._forced else deltas

    def close(self) -> list[dict[str, Any]]:
        deltas = self._split(self._thinking.close()) if self._thinking is not None else []
        if self._calls is not None:
            deltas += self._calls.close()
        return self._unforced(deltas)

    def _split(self, parts: list[tuple[str, str]]) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        for kind, text in parts:
            if kind == "reasoning":
                if text:
                    deltas.append({"reasoning_content": text})
            else:
                deltas += self._content(text)
        return deltas

    def _content(self, text: str) -> list[dict[str, Any]]:
        if self._calls is not None:
            return self._calls.feed(text)
        return [{"content": text}] if text else []
