"""The per-token SSE fast path: pre-encoded events are byte for byte what sse-starlette's
encoder and a pydantic dump per token would have sent."""

from __future__ import annotations

import pytest
from sse_starlette.event import ServerSentEvent

from app.api.openai import _text_event
from app.responses_openai import (
    ChatCompletionChunk,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionLogprobs,
    TextChoice,
)
from app.sse import SEP, data_event

TEXTS = ["hi", ' "quoted" \\ back', "tab\tand\rcr\nnl", "é 漢字 🙂", "\x00\x1f\x7f",
         "\u2028\u2029", "", "text-0123"]


def encoded(data: str) -> bytes:
    return ServerSentEvent(data=data, sep=SEP).encode()


@pytest.mark.parametrize("text", TEXTS)
def test_data_event_is_what_sse_starlette_encodes(text: str) -> None:
    event = data_event(text)
    if isinstance(event, dict):  # several lines: left to sse-starlette, which splits them
        assert "\n" in text or "\r" in text
        assert ServerSentEvent(data=event["data"], sep=SEP).encode() == encoded(text)
    else:
        assert event == encoded(text)


@pytest.mark.parametrize("scored", [False, True])
@pytest.mark.parametrize("exclude", [None, {"usage"}])
def test_text_events_equal_a_pydantic_dump_per_token(scored: bool,
                                                     exclude: set[str] | None) -> None:
    def completion(text: str) -> Completion:
        return Completion(id="cmpl-1", created=1, model='a "model"', choices=[TextChoice(
            index=2, text=text, finish_reason=None, logprobs=CompletionLogprobs.of([], scored))])

    def chat(text: str) -> ChatCompletionChunk:
        return ChatCompletionChunk(id="chatcmpl-1", created=1, model="m", choices=[ChunkChoice(
            index=0, delta={"content": text}, logprobs=ChoiceLogprobs.of([], scored))])

    for build in (completion, chat):
        event = _text_event(build, exclude)
        for text in TEXTS:
            assert event(text) == encoded(build(text).model_dump_json(exclude=exclude))


def test_a_marker_that_does_not_land_in_the_text_falls_back_to_pydantic() -> None:
    def echo_twice(text: str) -> Completion:  # the text appears twice: no single slot
        return Completion(id="cmpl-1", created=1, model=text, choices=[TextChoice(
            index=0, text=text, finish_reason=None)])

    event = _text_event(echo_twice, None)
    for text in TEXTS:
        assert event(text) == data_event(echo_twice(text).model_dump_json())
