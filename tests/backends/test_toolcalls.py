"""backends.toolcalls: model outputs in each format, as the formats' public documentation
writes them (Qwen2.5's function-calling guide for hermes, Meta's Llama 3.1 prompt format for
JSON calls and <|python_tag|>, Mistral's v3 tokenizer for [TOOL_CALLS]) and as models drift
from it; each parsed whole and streamed split at every character, and at random."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.toolcalls import (
    FORMATS,
    CallDelta,
    ContentDelta,
    Delta,
    Parsed,
    ReasoningStream,
    ToolCallStream,
    collect,
    detect_format,
    parse_tool_calls,
    split_reasoning,
)

NAMES = frozenset({"get_current_temperature", "get_temperature_date", "get_current_conditions",
                   "get_current_weather", "get_weather", "get_time", "search"})
TEMPLATES = Path(__file__).parent.parent / "fixtures" / "templates"

Call = tuple[str, dict[str, Any]]


def call(name: str, **arguments: Any) -> Call:
    return name, arguments


def calls_of(parsed: Parsed) -> list[Call]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


def streamed(fmt: str, pieces: list[str]) -> tuple[list[Delta], Parsed]:
    stream = ToolCallStream(FORMATS[fmt], NAMES)
    deltas = [d for piece in pieces for d in stream.feed(piece)] + stream.close()
    return deltas, collect(deltas)


def same(a: Parsed, b: Parsed) -> bool:
    """Equal but for the calls' ids (random)."""
    return a.content == b.content and [(c.name, c.arguments) for c in a.tool_calls] \
        == [(c.name, c.arguments) for c in b.tool_calls]


WEATHER_PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
NESTED = ('{"name": "search", "arguments": {"query": "ramen 🍜 in 東京", "filters": '
          '{"open": true, "price": [1, 2], "near": {"lat": 35.68, "lon": 139.76}}, '
          '"limit": null}}')
TRICKY = ('{"name": "search", "arguments": {"query": "what do </tool_call>, <tool_call>, '
          '[TOOL_CALLS], <|python_tag|>, ``` and } { ] [ mean? \\"quoted\\" \\\\ \\u00e9"}}')

# (format, output, content, calls)
CASES: list[tuple[str, str, str, list[Call]]] = [
    # hermes: Qwen2.5's guide, two parallel calls
    ("hermes", '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": '
     '"San Francisco, CA, USA"}}\n</tool_call>\n<tool_call>\n{"name": "get_temperature_date", '
     '"arguments": {"location": "San Francisco, CA, USA", "date": "2024-10-01"}}\n</tool_call>',
     "", [call("get_current_temperature", location="San Francisco, CA, USA"),
          call("get_temperature_date", location="San Francisco, CA, USA", date="2024-10-01")]),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call>',
     "", [call("get_weather", city="Zürich")]),
    ("hermes", f"I'll look that up.\n\n<tool_call>\n{WEATHER_PARIS}\n</tool_call>\nOne moment.\n",
     "I'll look that up.\n\nOne moment.\n", [call("get_weather", city="Paris")]),
    ("hermes", f"<tool_call>\n{NESTED}\n</tool_call>", "",
     [call("search", query="ramen 🍜 in 東京", limit=None,
           filters={"open": True, "price": [1, 2], "near": {"lat": 35.68, "lon": 139.76}})]),
    ("hermes", f"<tool_call>\n{TRICKY}\n</tool_call>", "",
     [call("search", query='what do </tool_call>, <tool_call>, [TOOL_CALLS], <|python_tag|>, '
           '``` and } { ] [ mean? "quoted" \\ é')]),
    ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time"}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>',
     "", [call("get_time"), call("get_time"), call("get_weather", city="Paris")]),
    # the model stopped after the JSON, before </tool_call>
    ("hermes", f"<tool_call>\n{WEATHER_PARIS}\n", "", [call("get_weather", city="Paris")]),
    # malformed (Python quotes), truncated by max_tokens, an unknown tool: text, verbatim
    ("hermes", "<tool_call>\n{'name': 'get_weather', 'arguments': {'city': 'Paris'}}\n</tool_call>",
     "<tool_call>\n{'name': 'get_weather', 'arguments': {'city': 'Paris'}}\n</tool_call>", []),
    ("hermes", 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',
     'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', []),
    ("hermes", f'<tool_call>\n{{"name": "rm_rf", "arguments": {{}}}}\n</tool_call>\n'
     f'<tool_call>\n{WEATHER_PARIS}\n</tool_call>',
     '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
     [call("get_weather", city="Paris")]),
    ("hermes", "Use the <tool_call> tag like <tool_call>this</tool_call>.",
     "Use the <tool_call> tag like <tool_call>this</tool_call>.", []),
    ("hermes", '{"name": "get_weather", "arguments": {}}',
     '{"name": "get_weather", "arguments": {}}', []),
    ("hermes", "  Plain answer, { braces } and <tags>.\n\n",
     "  Plain answer, { braces } and <tags>.\n\n", []),
    # llama3: Meta's JSON tool calling (the bare object, "parameters")
    ("llama3", '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", '
     '"unit": "Fahrenheit"}}', "",
     [call("get_current_conditions", location="San Francisco, CA", unit="Fahrenheit")]),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Zürich"}}', "",
     [call("get_weather", city="Zürich")]),
    ("llama3", f"\n\n{WEATHER_PARIS}", "", [call("get_weather", city="Paris")]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
     '{"name": "get_time", "parameters": {}};{"name": "get_weather", "parameters": '
     '{"city": "東京"}}\n{"name": "get_time"}',
     "", [call("get_weather", city="Paris"), call("get_time"), call("get_weather", city="東京"),
          call("get_time")]),
    ("llama3", f"Let me check.<|python_tag|>{NESTED}", "Let me check.",
     [call("search", query="ramen 🍜 in 東京", limit=None,
           filters={"open": True, "price": [1, 2], "near": {"lat": 35.68, "lon": 139.76}})]),
    # built-in tools are Python calls: not ours, text
    ("llama3", '<|python_tag|>brave_search.call(query="Menlo Park weather")',
     '<|python_tag|>brave_search.call(query="Menlo Park weather")', []),
    ("llama3", f"The call would be {WEATHER_PARIS}", f"The call would be {WEATHER_PARIS}", []),
    ("llama3", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"',
     '{"name": "get_weather", "parameters": {"city": "Paris"', []),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}\nDone, here it is.',
     "Done, here it is.", [call("get_weather", city="Paris")]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": NaN}}',
     '{"name": "get_weather", "parameters": {"city": NaN}}', []),
    # mistral: the v3 tokenizer's [TOOL_CALLS] list (with and without a space, with ids)
    ("mistral", '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": '
     '"Paris, France", "format": "celsius"}}]', "",
     [call("get_current_weather", location="Paris, France", format="celsius")]),
    ("mistral", f'[TOOL_CALLS][{WEATHER_PARIS},{{"name": "get_time", "arguments": {{}}, '
     '"id": "a1b2c3d4e"}]', "", [call("get_weather", city="Paris"), call("get_time")]),
    # llama.cpp dropped the control token
    ("mistral", f' [{WEATHER_PARIS}, {TRICKY}]', "",
     [call("get_weather", city="Paris"),
      call("search", query='what do </tool_call>, <tool_call>, [TOOL_CALLS], <|python_tag|>, '
           '``` and } { ] [ mean? "quoted" \\ é')]),
    ("mistral", f"Sure.[TOOL_CALLS][{WEATHER_PARIS}]\nAnything else?",
     "Sure.\nAnything else?", [call("get_weather", city="Paris")]),
    ("mistral", '[TOOL_CALLS][{"name": "rm_rf", "arguments": {}}]',
     '[TOOL_CALLS][{"name": "rm_rf", "arguments": {}}]', []),
    # a later call that is not one ends the list: the rest is text
    ("mistral", f'[TOOL_CALLS][{WEATHER_PARIS}, {{"name": "rm_rf", "arguments": {{}}}}]',
     ', {"name": "rm_rf", "arguments": {}}]', [call("get_weather", city="Paris")]),
    ("mistral", f'[TOOL_CALLS][{WEATHER_PARIS}, {{"name": "get_ti',
     ', {"name": "get_ti', [call("get_weather", city="Paris")]),
    ("mistral", "[1, 2, 3] are [the docs](https://example.com) [TOOL_CALLS]",
     "[1, 2, 3] are [the docs](https://example.com) [TOOL_CALLS]", []),
    ("mistral", '[{"a": 1}]', '[{"a": 1}]', []),
    ("mistral", "[TOOL_CALLS][]", "[TOOL_CALLS][]", []),
    # json: no native format
    ("json", WEATHER_PARIS, "", [call("get_weather", city="Paris")]),
    ("json", f"I'll call the tool.\n```json\n{WEATHER_PARIS}\n```\n", "I'll call the tool.",
     [call("get_weather", city="Paris")]),
    ("json", f'```\n[{WEATHER_PARIS}, {{"name": "get_time", "arguments": {{}}}}]\n```', "",
     [call("get_weather", city="Paris"), call("get_time")]),
    ("json", f"Sure: {WEATHER_PARIS}\n{NESTED}", "Sure:",
     [call("get_weather", city="Paris"),
      call("search", query="ramen 🍜 in 東京", limit=None,
           filters={"open": True, "price": [1, 2], "near": {"lat": 35.68, "lon": 139.76}})]),
    ("json", '{"type": "function", "function": {"name": "get_weather", "arguments": '
     '"{\\"city\\": \\"Zürich\\"}"}}', "", [call("get_weather", city="Zürich")]),
    ("json", f"{WEATHER_PARIS}\nLet me know if you need more.", "Let me know if you need more.",
     [call("get_weather", city="Paris")]),
    ("json", '```python\nprint({"a": [1]})\n```\nand ```json\n{"city": "Paris"}\n```',
     '```python\nprint({"a": [1]})\n```\nand ```json\n{"city": "Paris"}\n```', []),
    ("json", 'Nested: {"plan": {"name": "get_weather", "arguments": {}}}',
     'Nested: {"plan": {"name": "get_weather", "arguments": {}}}', []),
    ("json", '{"name": "get_weather", "arguments": [1]} {x} `code` [a] {"name": "get_time"}',
     '{"name": "get_weather", "arguments": [1]} {x} `code` [a]', [call("get_time")]),
    ("json", '{"name": "get_weather", "arguments": {"city": "Paris"}, ',
     '{"name": "get_weather", "arguments": {"city": "Paris"}, ', []),
]


def case_id(case: tuple[str, str, str, list[Call]]) -> str:
    return f"{case[0]}-{case[1][:30]}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_parse_recorded_outputs(case: tuple[str, str, str, list[Call]]) -> None:
    fmt, text, content, calls = case
    parsed = parse_tool_calls(text, FORMATS[fmt], NAMES)
    assert parsed.content == content
    assert calls_of(parsed) == calls


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_streamed_split_anywhere_equals_whole(case: tuple[str, str, str, list[Call]]) -> None:
    fmt, text = case[0], case[1]
    whole = parse_tool_calls(text, FORMATS[fmt], NAMES)
    for i in range(len(text) + 1):
        assert same(streamed(fmt, [text[:i], text[i:]])[1], whole), i
    assert same(streamed(fmt, list(text))[1], whole)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(CASES), st.data())
def test_streamed_random_pieces_equal_whole(case: tuple[str, str, str, list[Call]],
                                            data: st.DataObject) -> None:
    fmt, text = case[0], case[1]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert same(streamed(fmt, pieces)[1], parse_tool_calls(text, FORMATS[fmt], NAMES))


# Outputs built from the pieces calls are made of, to reach states the recordings do not.
FRAGMENTS = ["<tool_call>", "</tool_call>", "<tool_", "[TOOL_CALLS]", "[TOOL_", "<|python_tag|>",
             "```json", "```", "`", "{", "}", "[", "]", ",", ";", " ", "\n", '"', "\\", "text",
             WEATHER_PARIS, '{"name": "get_time"}', '{"name": "rm_rf", "arguments": {}}',
             '{"name": "get_weather", "arguments": {"city": "Pa', '{"name": "get_weather", ']


@settings(max_examples=250, deadline=None)
@given(st.sampled_from(sorted(FORMATS)),
       st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=3), max_size=14), st.data())
def test_streamed_generated_outputs_equal_whole(fmt: str, parts: list[str],
                                                data: st.DataObject) -> None:
    text = "".join(parts)
    whole = parse_tool_calls(text, FORMATS[fmt], NAMES)
    if not whole.tool_calls:
        assert whole.content == text  # no calls: the text, unchanged
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert same(streamed(fmt, pieces)[1], whole)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8)
ARGUMENTS = st.dictionaries(st.text(), JSON_VALUES, max_size=4)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(FORMATS)),
       st.lists(st.tuples(st.sampled_from(sorted(NAMES)), ARGUMENTS), min_size=1, max_size=3))
def test_what_the_grammar_writes_parses_back(fmt: str, calls: list[Call]) -> None:
    """block_open + calls joined by separator, each call_open + {name, args_key} +
    call_close: the output `tool_choice: required` is constrained to."""
    parsed = parse_tool_calls(FORMATS[fmt].render(calls), FORMATS[fmt], NAMES)
    assert parsed.content == ""
    assert calls_of(parsed) == calls


def test_arguments_are_compact_json_with_unicode_kept() -> None:
    parsed = parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": '
                              '{ "city" : "Z\\u00fcrich",  "days": [1, 2] }}\n</tool_call>',
                              FORMATS["hermes"], NAMES)
    assert parsed.tool_calls[0].arguments == '{"city":"Zürich","days":[1,2]}'


def test_call_deltas_carry_id_and_name_first_then_arguments() -> None:
    text = f"<tool_call>\n{WEATHER_PARIS}\n</tool_call>\n<tool_call>\n{NESTED}\n</tool_call>"
    deltas, parsed = streamed("hermes", [text])
    calls = [d for d in deltas if isinstance(d, CallDelta)]
    assert [(d.index, d.name, d.arguments) for d in calls[::2]] == \
        [(0, "get_weather", ""), (1, "search", "")]
    assert [(d.index, d.id, d.name) for d in calls[1::2]] == [(0, None, None), (1, None, None)]
    assert [d.id for d in calls[::2]] == [c.id for c in parsed.tool_calls]
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in parsed.tool_calls)
    ids = {c.id for _ in range(50)
           for c in parse_tool_calls(text, FORMATS["hermes"], NAMES).tool_calls}
    assert len(ids) == 100


def test_stream_passes_text_at_once_and_a_call_when_its_json_closes() -> None:
    stream = ToolCallStream(FORMATS["hermes"], NAMES)
    assert stream.feed("Let me check the wea") == [ContentDelta("Let me check the wea")]
    assert stream.feed("ther. <tool") == [ContentDelta("ther.")]  # a marker may be arriving
    assert stream.feed('_call>\n{"name": "get_weather", "arguments": {"city": "Par') == []
    first, rest = stream.feed('is"}}')
    assert isinstance(first, CallDelta) and (first.index, first.name) == (0, "get_weather")
    assert rest == CallDelta(0, None, None, '{"city":"Paris"}')
    assert stream.feed("\n</tool_call>\n") == []
    assert stream.close() == []


def test_stream_releases_what_turns_out_not_to_be_a_call() -> None:
    stream = ToolCallStream(FORMATS["llama3"], NAMES)
    assert stream.feed('{"name": "rm_rf", "argu') == []  # bare JSON at the start: held
    assert collect(stream.feed('ments": {}} ok')).content == '{"name": "rm_rf", "arguments": {}} ok'
    stream = ToolCallStream(FORMATS["hermes"], NAMES)
    assert stream.feed('<tool_call>\n{"name": "get_weather", "arguments": {"ci') == []
    assert collect(stream.close()).content == \
        '<tool_call>\n{"name": "get_weather", "arguments": {"ci'


def test_a_lone_brace_in_prose_does_not_hold_the_text_back() -> None:
    stream = ToolCallStream(FORMATS["json"], NAMES)
    assert collect(stream.feed("Open with { and")).content == "Open with { and"
    assert stream.feed(' {"name": "get') == []  # may be a call (and the space its markup)
    done = collect(stream.feed('_time"}') + stream.close())
    assert (done.content, [c.name for c in done.tool_calls]) == ("", ["get_time"])


def test_never_raises_on_deep_nesting() -> None:
    deep = '{"name": "search", "arguments": {"q": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    text = f"<tool_call>{deep}</tool_call>"
    assert parse_tool_calls(text, FORMATS["hermes"], NAMES) == Parsed(text, ())


def test_no_tools_means_no_calls() -> None:
    assert parse_tool_calls(WEATHER_PARIS, FORMATS["json"], ()) == Parsed(WEATHER_PARIS, ())


def test_streamed_calls_merge_in_the_openai_sdk_and_langchain() -> None:
    """The deltas as chat.completion.chunk frames: the SDK's accumulator and LangChain's
    chunk merging rebuild the calls."""
    from langchain_core.messages import AIMessageChunk
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    text = f"Checking.\n<tool_call>\n{WEATHER_PARIS}\n</tool_call>\n<tool_call>\n{NESTED}\n" \
        "</tool_call>"
    deltas, parsed = streamed("hermes", list(text))
    state = ChatCompletionStreamState()
    merged = AIMessageChunk(content="")
    for delta in deltas:
        if isinstance(delta, ContentDelta):
            frame: dict[str, Any] = {"content": delta.text}
            merged += AIMessageChunk(content=delta.text)
        else:
            function = {"arguments": delta.arguments} | ({"name": delta.name} if delta.name else {})
            frame = {"tool_calls": [{"index": delta.index, "function": function}
                                    | ({"id": delta.id, "type": "function"} if delta.id else {})]}
            merged += AIMessageChunk(content="", tool_call_chunks=[{
                "index": delta.index, "id": delta.id, "name": delta.name,
                "args": delta.arguments}])
        state.handle_chunk(ChatCompletionChunk.model_validate({
            "id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": frame, "finish_reason": None}]}))
    state.handle_chunk(ChatCompletionChunk.model_validate({
        "id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
    message = state.get_final_completion().choices[0].message
    assert message.content == "Checking."
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()] \
        == [(c.id, c.name, c.arguments) for c in parsed.tool_calls]
    assert [(c["id"], c["name"], c["args"]) for c in merged.tool_calls] \
        == [(c.id, c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


@pytest.mark.parametrize(("template", "expected"), [
    ("Qwen-Qwen2.5-7B-Instruct.jinja", "hermes"),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", "llama3"),
    ("mistralai-Mistral-7B-Instruct-v0.3.jinja", "mistral"),
    ("google-gemma-2-2b-it.jinja", "json"),
])
def test_detect_format_from_real_templates(template: str, expected: str) -> None:
    assert detect_format((TEMPLATES / template).read_text()) == expected


def test_detect_format_without_markers() -> None:
    assert detect_format(None) == detect_format("") == "json"
    assert detect_format("{{ '<|python_tag|>' + call }}") == "llama3"


# Reasoning: (started, output, reasoning, content)
THINKING: list[tuple[bool | None, str, str | None, str]] = [
    (None, "<think>\nThe user wants 2+2.\n</think>\n\n4", "The user wants 2+2.", "4"),
    (False, "<think>\nThe user wants 2+2.\n</think>\n\n4", "The user wants 2+2.", "4"),
    # DeepSeek-R1 / QwQ: the prompt ends with "<think>\n", the output only closes it
    (None, "Hmm, 東京 in 🇯🇵.\n</think>\n\nTokyo.", "Hmm, 東京 in 🇯🇵.", "Tokyo."),
    (True, "Hmm, 東京 in 🇯🇵.\n</think>\n\nTokyo.", "Hmm, 東京 in 🇯🇵.", "Tokyo."),
    (False, "Hmm.\n</think>\n\nTokyo.", None, "Hmm.\n</think>\n\nTokyo."),
    # Qwen3 with thinking off writes an empty block itself sometimes
    (None, "<think>\n\n</think>\n\nHello!", "", "Hello!"),
    (None, "  Just an answer, with < and </ and <thin.\n", None,
     "  Just an answer, with < and </ and <thin.\n"),
    (False, "  Just an answer.\n", None, "  Just an answer.\n"),
    # max_tokens hit while thinking: all of it is reasoning
    (None, "<think>\nFirst, I need to", "First, I need to", ""),
    (True, "First, I need to </thi", "First, I need to </thi", ""),
    (None, "Note:\n<think>a < b</think>\nSo: yes. <think>again</think>", "a < b",
     "Note:\nSo: yes. <think>again</think>"),
    (True, "<think>nested?</think>ok", "<think>nested?", "ok"),
]


@pytest.mark.parametrize(("started", "text", "reasoning", "content"), THINKING)
def test_split_reasoning(started: bool | None, text: str, reasoning: str | None,
                         content: str) -> None:
    assert split_reasoning(text, started=started) == (reasoning, content)


def stream_reasoning(pieces: list[str], started: bool | None,
                     tags: tuple[str, str] = ("<think>", "</think>")) -> tuple[str, str]:
    stream = ReasoningStream(*tags, started=started)
    parts = [p for piece in pieces for p in stream.feed(piece)] + stream.close()
    assert all(kind in ("reasoning", "content") and text for kind, text in parts)
    return ("".join(t for k, t in parts if k == "reasoning"),
            "".join(t for k, t in parts if k == "content"))


@pytest.mark.parametrize(("started", "text", "reasoning", "content"), THINKING)
def test_reasoning_streamed_split_anywhere_equals_whole(started: bool | None, text: str,
                                                        reasoning: str | None,
                                                        content: str) -> None:
    for i in range(len(text) + 1):
        assert stream_reasoning([text[:i], text[i:]], started) == (reasoning or "", content), i
    assert stream_reasoning(list(text), started) == (reasoning or "", content)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([None, True, False]), st.sampled_from([
    ("<think>", "</think>"), ("<|begin_of_thought|>", "<|end_of_thought|>")]),
    st.lists(st.sampled_from(["<think>", "</think>", "<th", "</", "<|begin_of_thought|>",
                              "<|end_of_thought|>", "<|end", " ", "\n", "a b"])
             | st.text(max_size=3), max_size=12), st.data())
def test_reasoning_streamed_random_pieces_equal_whole(started: bool | None,
                                                      tags: tuple[str, str], parts: list[str],
                                                      data: st.DataObject) -> None:
    text = "".join(parts)
    reasoning, content = split_reasoning(text, *tags, started=started)
    if reasoning is None:
        assert content == text
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert stream_reasoning(pieces, started, tags) == (reasoning or "", content)


def test_reasoning_stream_is_prompt_when_it_knows_where_it_is() -> None:
    stream = ReasoningStream(started=True)
    assert stream.feed("\nStep one, </th") == [("reasoning", "Step one,")]
    assert stream.feed("ink>\n\nThe answer") == [("content", "The answer")]
    stream = ReasoningStream(started=False)
    assert stream.feed("Hello <thi") == [("content", "Hello")]
    # not knowing, it waits for a marker (the text may yet turn out to be reasoning)
    stream = ReasoningStream()
    assert stream.feed("Thinking about it") == []
    assert stream.feed("</think>Yes") == [("reasoning", "Thinking about it"), ("content", "Yes")]
