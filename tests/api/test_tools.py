"""Tool calling through /v1/chat/completions on the tiny GGUF, with the chat templates of
real model families (each gives its own tool-call format), through the official SDK.

The weights are random: what the model says is noise, so what is tested is what does not
depend on it: forced calls (tool_choice required / a named function) are constrained to the
tools' schemas, parse into OpenAI tool_calls, stream as the SDK accumulates them, and the
round trip (call → tool result → answer) renders through each template.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from openai import OpenAI

from tests.conftest import FIXTURES, TINY_GGUF, LiveServer, assert_error

TEMPLATES = FIXTURES / "templates"
#: model name → (chat template file, the tool-call format its template implies)
FAMILIES = {
    "qwen": ("Qwen-Qwen2.5-7B-Instruct.jinja", "hermes"),
    "llama3": ("meta-llama-Llama-3.2-3B-Instruct.jinja", "llama3"),
    "mistral": ("mistralai-Mistral-7B-Instruct-v0.3.jinja", "mistral"),
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                             "maxLength": 8}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Zürich?"}]


def model_config(template: str) -> dict[str, Any]:
    return {"model_family": "llama", "setup_params": {"model_path": str(TINY_GGUF)},
            "model_params": {"n_ctx": 4096, "n_threads": 2,
                             "chat_template": (TEMPLATES / template).read_text()},
            "default_max_tokens": 64}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    models = {name: model_config(template) for name, (template, _) in FAMILIES.items()}
    live = LiveServer({"models": models}, tmp_path_factory.mktemp("tools")).start()
    yield live
    live.stop()


def valid_call(call: Any, names: set[str]) -> dict[str, Any]:
    assert call.type == "function" and call.id
    assert call.function.name in names
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return dict(arguments)


@pytest.mark.parametrize("model", list(FAMILIES))
def test_each_template_gives_its_format(server: LiveServer, model: str) -> None:
    assert server.model_stats(model)["state"] == "ready"
    card = server.client.get(f"/v1/models/{model}").json()
    assert "tools" in card["capabilities"]
    assert server.app.state.pool.clients[model].info.tool_format == FAMILIES[model][1]


@pytest.mark.parametrize(("model", "seed", "parallel"), [
    *[(m, 0, False) for m in FAMILIES], ("qwen", 2, False), ("qwen", 1, True),
    ("mistral", 1, True)])
def test_required_gives_calls_that_match_the_schemas(sdk: OpenAI, model: str, seed: int,
                                                     parallel: bool) -> None:
    """Random weights under the grammar: with parallel calls allowed they may go on calling
    until max_tokens; every complete call is returned."""
    reply = sdk.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                        tool_choice="required", max_tokens=120, seed=seed,
                                        temperature=1.0, parallel_tool_calls=parallel)
    choice = reply.choices[0]
    # parallel calls may go on until max_tokens cuts one: then "length", the complete ones
    assert choice.finish_reason == "tool_calls" or parallel, choice
    calls = choice.message.tool_calls or []
    assert calls and (parallel or len(calls) == 1)
    assert choice.message.content is None  # a forced answer is calls only
    for call in calls:
        valid_call(call, set(SCHEMAS))
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("model", list(FAMILIES))
def test_a_named_function_is_the_one_called_once_without_parallel_calls(
        sdk: OpenAI, model: str) -> None:
    reply = sdk.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, max_tokens=200, seed=3, temperature=1.0,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False)
    calls = reply.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_time"]
    valid_call(calls[0], {"get_time"})


@pytest.mark.parametrize("model", list(FAMILIES))
def test_streamed_calls_accumulate_in_the_sdk_as_the_whole_answer(sdk: OpenAI,
                                                                  model: str) -> None:
    asked = {"model": model, "messages": ASK, "tools": TOOLS, "tool_choice": "required",
             "max_tokens": 200, "seed": 5, "temperature": 1.0, "parallel_tool_calls": False}
    whole = sdk.chat.completions.create(**asked)  # type: ignore[call-overload]
    with sdk.chat.completions.stream(**asked) as stream:  # the SDK's own accumulator
        streamed = stream.get_final_completion()
    expected = whole.choices[0].message.tool_calls or []
    got = streamed.choices[0].message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in got] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in expected]
    assert streamed.choices[0].finish_reason == "tool_calls"
    assert streamed.usage is None or streamed.usage.completion_tokens > 0


def test_raw_stream_deltas_have_the_openai_shape(server: LiveServer) -> None:
    body = {"model": "qwen", "messages": ASK, "tools": TOOLS, "tool_choice": "required",
            "max_tokens": 200, "seed": 1, "temperature": 1.0, "stream": True,
            "parallel_tool_calls": False}
    with server.client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert deltas[0]["delta"]["role"] == "assistant"
    calls = [d["delta"]["tool_calls"][0] for d in deltas if "tool_calls" in d["delta"]]
    firsts = [c for c in calls if "id" in c]
    assert firsts and all(c["type"] == "function" and c["function"]["name"] for c in firsts)
    for index in {c["index"] for c in calls}:
        mine = [c for c in calls if c["index"] == index]
        assert "id" in mine[0]  # the first delta of a call names it
        assert all("id" not in c and "name" not in c["function"] for c in mine[1:])
        json.loads("".join(c["function"]["arguments"] for c in mine))
    assert deltas[-1]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_cut_by_max_tokens_is_length_without_leaked_text(
        server: LiveServer, stream: bool) -> None:
    body = {"model": "qwen", "messages": ASK, "tools": [WEATHER], "tool_choice": "required",
            "max_tokens": 6, "temperature": 0, "stream": stream}
    response = server.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    if not stream:
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert choice["message"]["content"] is None and "tool_calls" not in choice["message"]
        return
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    deltas = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert not "".join(d["delta"].get("content") or "" for d in deltas)
    assert deltas[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("model", list(FAMILIES))
def test_round_trip_call_result_answer(sdk: OpenAI, model: str) -> None:
    first = sdk.chat.completions.create(model=model, messages=ASK, tools=[WEATHER],
                                        tool_choice="required", max_tokens=200, seed=2,
                                        temperature=1.0, parallel_tool_calls=False)
    message = first.choices[0].message
    call = (message.tool_calls or [])[0]
    history = [*ASK, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id,
                "content": json.dumps({"temperature": 21, "sky": "☀️ clear"})}]
    final = sdk.chat.completions.create(model=model, messages=history,  # type: ignore[arg-type]
                                        tools=[WEATHER], max_tokens=8, temperature=0)
    assert final.choices[0].finish_reason in {"stop", "length", "tool_calls"}
    assert final.usage is not None and final.usage.prompt_tokens > first.usage.prompt_tokens


def test_tools_are_in_the_prompt_the_template_renders(server: LiveServer) -> None:
    plain = server.client.post("/v1/chat/completions", json={
        "model": "qwen", "messages": ASK, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    with_tools = server.client.post("/v1/chat/completions", json={
        "model": "qwen", "messages": ASK, "max_tokens": 1,
        "tools": TOOLS}).json()["usage"]["prompt_tokens"]
    none = server.client.post("/v1/chat/completions", json={
        "model": "qwen", "messages": ASK, "max_tokens": 1, "tools": TOOLS,
        "tool_choice": "none"}).json()["usage"]["prompt_tokens"]
    assert with_tools > plain + 40  # the definitions are there
    assert none == plain  # tool_choice none: the model is not told of them


@pytest.mark.parametrize(("body", "code", "mentions"), [
    ({"tool_choice": "required"}, "invalid_request", ("tools",)),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "invalid_request", ("nope", "get_weather")),
    ({"tools": [WEATHER, WEATHER]}, "invalid_request", ("unique",)),
    ({"tools": TOOLS, "logprobs": True}, "unsupported_parameter", ("logprobs",)),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer", "not": {"const": 1}}}}}}],
      "tool_choice": "required"}, "invalid_request", ("tools", "not")),
    ({"tools": TOOLS, "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "invalid_request", ("response_format",)),
])
def test_bad_tool_requests_are_400s_that_say_why(server: LiveServer, body: dict[str, Any],
                                                 code: str, mentions: tuple[str, ...]) -> None:
    response = server.client.post("/v1/chat/completions",
                                  json={"model": "qwen", "messages": ASK, **body})
    error = assert_error(response, 400, code, mentions)
    assert "response_format" not in error["message"] or "response_format" in body


@pytest.mark.parametrize(("messages", "mentions"), [
    ([{"role": "tool", "content": "42"}], ("tool_call_id",)),
    ([{"role": "user", "content": "x", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
     ("assistant",)),
    ([{"role": "function", "name": "f", "content": "x"}], ("tool",)),
    ([{"role": "user", "content": None}], ("content",)),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
     ("content",)),
])
def test_malformed_tool_history_is_422(server: LiveServer, messages: list[dict[str, Any]],
                                       mentions: tuple[str, ...]) -> None:
    response = server.client.post("/v1/chat/completions", json={
        "model": "qwen", "messages": messages, "tools": TOOLS})
    assert_error(response, 422, "invalid_parameter", mentions)


def test_hostile_tool_lists_are_bounded(server: LiveServer) -> None:
    many = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    assert_error(server.client.post("/v1/chat/completions", json={
        "model": "qwen", "messages": ASK, "tools": many}), 422, "invalid_parameter", ("128",))
    huge = [{"type": "function", "function": {"name": "f", "description": "word " * 1999}}
            for _ in range(1)] + [{"type": "function", "function": {
                "name": f"g{i}", "description": "word " * 1999}} for i in range(20)]
    response = server.client.post("/v1/chat/completions", json={
        "model": "qwen", "messages": ASK, "tools": huge, "max_tokens": 4})
    assert_error(response, 400, "context_length_exceeded")
    bad_name = [{"type": "function", "function": {"name": "no spaces allowed"}}]
    assert_error(server.client.post("/v1/chat/completions", json={
        "model": "qwen", "messages": ASK, "tools": bad_name}), 422, "invalid_parameter",
        ("name",))
