"""Forced tool calls and response_format on a transformers model, through /v1/chat/completions
and the official SDK: the tiny HF fixture with Qwen 2.5's chat template (hermes calls).

The weights are random, so what is tested is what the grammar guarantees (tests/api/
test_tools.py does the same on the GGUF): forced calls name the tools asked for and carry
arguments that validate against their parameter schemas; a grammar llguidance cannot
compile is a 400 of the prepare step, and the server goes on serving.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from openai import OpenAI

from tests.api.test_tools import ASK, SCHEMAS, TEMPLATES, TOOLS, valid_call
from tests.conftest import FIXTURES, LiveServer, assert_error

MODEL = "qwen-hf"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    template = (TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()
    config = {"models": {MODEL: {
        "model_family": "huggingface", "placement": "inprocess",  # for the fault injection
        "setup_params": {"model_path": str(FIXTURES / "tiny-llama-hf")},
        "model_params": {"device_map": "cpu", "chat_template": template},
        "default_max_tokens": 64}}}
    live = LiveServer(config, tmp_path_factory.mktemp("hf-constrained")).start()
    yield live
    live.stop()


def test_the_model_declares_constrained_output_and_hermes_calls(server: LiveServer) -> None:
    card = server.client.get(f"/v1/models/{MODEL}").json()
    assert {"json_output", "tools"} <= set(card["capabilities"])
    assert server.app.state.pool.clients[MODEL].info.tool_format == "hermes"


@pytest.mark.parametrize(("seed", "parallel"), [(0, False), (1, False), (2, True)])
def test_required_gives_calls_that_match_the_schemas(sdk: OpenAI, seed: int,
                                                     parallel: bool) -> None:
    reply = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                        tool_choice="required", max_tokens=200, seed=seed,
                                        temperature=1.0, parallel_tool_calls=parallel)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls or []
    assert calls and (parallel or len(calls) == 1)
    for call in calls:
        valid_call(call, set(SCHEMAS))


def test_a_named_function_is_the_one_called_and_streams_alike(sdk: OpenAI) -> None:
    asked: dict[str, Any] = {
        "model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 200, "seed": 3,
        "temperature": 1.0, "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    whole = sdk.chat.completions.create(**asked)
    calls = whole.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_time"]
    valid_call(calls[0], {"get_time"})
    with sdk.chat.completions.stream(**asked) as stream:  # the SDK's own accumulator
        streamed = stream.get_final_completion()
    got = streamed.choices[0].message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in got] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def test_json_schema_through_the_qwen_template(sdk: OpenAI) -> None:
    schema = SCHEMAS["get_weather"]
    for seed in (0, 1):
        reply = sdk.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=200, seed=seed, temperature=1.0,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "weather", "schema": schema}})
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)


def test_an_uncompilable_grammar_is_a_400_of_the_prepare_step(
        server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """llguidance compiles every grammar the server writes (tests/backends/
    test_hf_grammar.py), so its refusal is injected: the converter hands it Lark that names
    a rule nobody defines. The 400 comes from the tokenizer thread's prepare step, before
    the request is admitted to the engine; the next request is served."""
    from backends import hf_grammar

    threads: list[str] = []
    original = hf_grammar.to_lark

    def unusable(gbnf: str) -> str:
        threads.append(threading.current_thread().name)
        return "start: no_such_rule" if "rejected" in gbnf else original(gbnf)

    monkeypatch.setattr(hf_grammar, "to_lark", unusable)
    schema = {"type": "object", "properties": {"rejected": {"type": "boolean"}},
              "required": ["rejected"], "additionalProperties": False}
    before = server.model_stats(MODEL)
    error = assert_error(server.client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": ASK, "max_tokens": 50,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "x", "schema": schema}}}),
        400, None, ("constrained decoding",))
    assert error["param"] == "response_format"
    assert threads and not any(name.startswith("engine-") for name in threads)
    after = server.model_stats(MODEL)
    assert (after["completed"], after["queued"], after["running"]) == \
        (before["completed"], before["queued"], before["running"])  # never admitted
    ok = server.client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": ASK, "max_tokens": 50, "temperature": 0,
        "response_format": {"type": "json_object"}})
    assert ok.status_code == 200, ok.text
