"""Reasoning models through /v1/chat/completions: the think block's text goes to
`reasoning_content` (streamed as `delta.reasoning_content`), the rest to `content`; counted
once in usage; turned off per request (reasoning_effort none, chat_template_kwargs).

The tiny GGUF's weights are random: its text never closes a think block, so with a
template that opens one in the prompt (DeepSeek-R1 style) the whole answer is reasoning,
and with the block closed by the template (enable_thinking false) it is all content.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import FIXTURES, TINY_GGUF, LiveServer, assert_error

THINK = (FIXTURES / "templates" / "tools" / "think-test.jinja").read_text()
ASK = [{"role": "user", "content": "Why is the sky blue?"}]
GREEDY = {"max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    model = {"model_family": "llama", "setup_params": {"model_path": str(TINY_GGUF)},
             "model_params": {"n_ctx": 1024, "n_threads": 2, "chat_template": THINK}}
    plain = {**model, "model_params": {**model["model_params"], "reasoning_format": "none"}}
    live = LiveServer({"models": {"think": model, "plain": plain}},
                      tmp_path_factory.mktemp("reasoning")).start()
    yield live
    live.stop()


def chat(server: LiveServer, model: str = "think", **extra: Any) -> dict[str, Any]:
    response = server.client.post("/v1/chat/completions", json={
        "model": model, "messages": ASK, **GREEDY, **extra})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_the_opened_think_block_is_reasoning_and_counted_once(server: LiveServer) -> None:
    info = server.app.state.pool.clients["think"].info
    assert info.reasoning == {"open": "<think>", "close": "</think>", "opened": True}
    split = chat(server)
    whole = chat(server, "plain")  # the same model and prompt, nothing split out
    message = split["choices"][0]["message"]
    assert message["reasoning_content"] == whole["choices"][0]["message"]["content"].strip()
    assert message["content"] == ""
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached_tokens vary
    assert [split["usage"][c] for c in counts] == [whole["usage"][c] for c in counts]
    assert split["usage"]["completion_tokens"] == GREEDY["max_tokens"]
    assert "reasoning_content" not in whole["choices"][0]["message"]


def test_streamed_reasoning_deltas_add_up_to_the_whole_answer(server: LiveServer) -> None:
    whole = chat(server)["choices"][0]["message"]
    body = {"model": "think", "messages": ASK, **GREEDY, "stream": True}
    with server.client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0]["role"] == "assistant"
    thought = "".join(d.get("reasoning_content", "") for d in deltas)
    said = "".join(d.get("content", "") for d in deltas)
    assert thought == whole["reasoning_content"] and said == whole["content"]
    assert sum("reasoning_content" in d for d in deltas) > 1  # streamed, not held back


@pytest.mark.parametrize("extra", [{"reasoning_effort": "none"},
                                   {"chat_template_kwargs": {"enable_thinking": False}}])
def test_thinking_turned_off_is_all_content(server: LiveServer, extra: dict[str, Any]) -> None:
    off = chat(server, **extra)
    message = off["choices"][0]["message"]
    assert "reasoning_content" not in message and message["content"]
    on = chat(server)
    assert off["usage"]["prompt_tokens"] > on["usage"]["prompt_tokens"]  # the closed block


def test_include_reasoning_false_leaves_it_in_content(server: LiveServer) -> None:
    message = chat(server, include_reasoning=False)["choices"][0]["message"]
    assert "reasoning_content" not in message and message["content"]


@pytest.mark.parametrize("name", ["messages", "tools", "add_generation_prompt", "_private",
                                  "not-an-identifier"])
def test_template_variables_of_the_server_cannot_be_replaced(server: LiveServer,
                                                             name: str) -> None:
    response = server.client.post("/v1/chat/completions", json={
        "model": "think", "messages": ASK, "chat_template_kwargs": {name: 1}})
    assert_error(response, 400, "invalid_request", ("chat_template_kwargs",))


def test_template_kwargs_are_bounded(server: LiveServer) -> None:
    many = {f"k{i}": 1 for i in range(17)}
    assert_error(server.client.post("/v1/chat/completions", json={
        "model": "think", "messages": ASK, "chat_template_kwargs": many}), 422,
        "invalid_parameter", ("16",))
    nested = {"k": {"deep": [1, 2]}}
    assert_error(server.client.post("/v1/chat/completions", json={
        "model": "think", "messages": ASK, "chat_template_kwargs": nested}), 422,
        "invalid_parameter", ("chat_template_kwargs",))
