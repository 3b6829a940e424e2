"""LLMAPI against a live `llm-api serve` on the tiny GGUF (greedy, so texts are repeatable)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_llm_api import (
    LLMAPI,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    OverloadedError,
)
from lc_servers import ServerProcess

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 24}


@pytest.fixture
def llm(llm_api_server: ServerProcess) -> LLMAPI:
    return LLMAPI(**llm_api_server.client_params(), **GREEDY)


def direct(server: ServerProcess, prompt: str, **params: Any) -> str:
    """The completion as /generate answers it, without the package."""
    body = {"prompt": prompt, "params": {**GREEDY, **params}}
    answer = httpx.post(f"{server.url}/generate", json=body, headers=server.headers(),
                        timeout=60)
    assert answer.status_code == 200, answer.text
    text = answer.json()
    assert isinstance(text, str)
    return text


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


class AsyncTokenRecorder(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


def test_invoke_returns_the_completion_text(llm: LLMAPI,
                                            llm_api_server: ServerProcess) -> None:
    text = llm.invoke("hello world")
    assert isinstance(text, str) and text.strip()
    assert text == direct(llm_api_server, "hello world")
    assert not (text.startswith('"') and text.endswith('"'))  # not the raw JSON


async def test_ainvoke_equals_invoke(llm: LLMAPI) -> None:
    assert await llm.ainvoke("the quick brown fox") == llm.invoke("the quick brown fox")


def test_stream_pieces_join_to_the_completion(llm: LLMAPI) -> None:
    llm = llm.model_copy(update={"max_tokens": 60})
    pieces = list(llm.stream("once upon a time"))
    assert len(pieces) > 1 and all(isinstance(p, str) for p in pieces)
    # the server sends ": ping" comments every 0.05 s: none of them leaks into the text
    assert "ping" not in "".join(pieces)
    assert "".join(pieces) == llm.invoke("once upon a time")


async def test_astream_pieces_join_to_the_completion(llm: LLMAPI) -> None:
    llm = llm.model_copy(update={"max_tokens": 60})
    pieces = [p async for p in llm.astream("once upon a time")]
    assert len(pieces) > 1
    assert "".join(pieces) == await llm.ainvoke("once upon a time")


def test_batch_keeps_order(llm: LLMAPI) -> None:
    prompts = ["alpha beta", "gamma delta", "epsilon"]
    assert llm.batch(prompts) == [llm.invoke(p) for p in prompts]


async def test_abatch_keeps_order(llm: LLMAPI) -> None:
    prompts = ["alpha beta", "gamma delta", "epsilon"]
    assert await llm.abatch(prompts) == [await llm.ainvoke(p) for p in prompts]


def test_stop_ends_the_completion_before_it(llm: LLMAPI) -> None:
    llm = llm.model_copy(update={"max_tokens": 60})
    full = llm.invoke("question")
    assert len(full) > 12
    stop = full[8:11]
    expected = full[:full.index(stop)]
    assert llm.invoke("question", stop=[stop]) == expected
    assert "".join(llm.stream("question", stop=[stop])) == expected
    assert llm.model_copy(update={"stop": [stop]}).invoke("question") == expected


def test_callbacks_receive_each_token(llm: LLMAPI) -> None:
    recorder = TokenRecorder()
    pieces = list(llm.stream("hello world", config={"callbacks": [recorder]}))
    assert recorder.tokens == pieces and len(pieces) > 1
    streaming = llm.model_copy(update={"streaming": True})
    recorder = TokenRecorder()
    text = streaming.invoke("hello world", config={"callbacks": [recorder]})
    assert recorder.tokens == pieces and "".join(pieces) == text


async def test_async_callbacks_receive_each_token(llm: LLMAPI) -> None:
    recorder = AsyncTokenRecorder()
    pieces = [p async for p in llm.astream("hello world", config={"callbacks": [recorder]})]
    assert recorder.tokens == pieces and len(pieces) > 1
    streaming = llm.model_copy(update={"streaming": True})
    recorder = AsyncTokenRecorder()
    text = await streaming.ainvoke("hello world", config={"callbacks": [recorder]})
    assert recorder.tokens == pieces and "".join(pieces) == text


def test_model_and_per_call_params(llm_api_server: ServerProcess) -> None:
    rev = LLMAPI(**llm_api_server.client_params(), model="rev")
    assert rev.invoke("abc") == "cba"
    assert "".join(rev.stream("line one\nline two")) == "owt enil\neno enil"
    llm = LLMAPI(**llm_api_server.client_params(), temperature=0)
    assert llm.invoke("hello world", max_tokens=24) == direct(llm_api_server, "hello world")
    with pytest.raises(ValueError, match="max_tokenz.*allowed"):
        llm.invoke("x", max_tokenz=3)


@pytest.mark.parametrize("call", ["invoke", "stream"])
def test_server_errors_become_exceptions(llm: LLMAPI, call: str) -> None:
    def run(model: LLMAPI, prompt: str = "x", **kwargs: Any) -> Any:
        return model.invoke(prompt, **kwargs) if call == "invoke" else \
            list(model.stream(prompt, **kwargs))

    with pytest.raises(NotFoundError) as not_found:
        run(llm.model_copy(update={"model": "nope"}))
    assert not_found.value.status_code == 404 and not_found.value.code == "model_not_found"
    assert "nope" in str(not_found.value)
    with pytest.raises(BadRequestError) as too_long:
        run(llm, max_tokens=100_000)
    assert too_long.value.status_code == 400
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(BadRequestError) as invalid:
        run(llm, temperature=5)
    assert invalid.value.status_code == 422 and invalid.value.param == "params.temperature"
    assert "temperature" in invalid.value.message


async def test_failure_inside_a_stream_raises(llm_api_server: ServerProcess) -> None:
    rev = LLMAPI(**llm_api_server.client_params(), model="rev")
    with pytest.raises(InternalServerError) as failed:
        list(rev.stream("fail"))
    assert failed.value.code == "backend_failure" and failed.value.status_code is None
    assert "secret" not in str(failed.value)
    with pytest.raises(InternalServerError, match="server log"):
        [piece async for piece in rev.astream("fail")]
    with pytest.raises(InternalServerError) as failed:
        rev.invoke("fail")
    assert failed.value.status_code == 500


async def test_overloaded_model_raises_with_retry_after(loading_server: ServerProcess) -> None:
    llm = LLMAPI(**loading_server.client_params(), max_retries=0)
    with pytest.raises(OverloadedError) as overloaded:
        await llm.ainvoke("x")
    assert overloaded.value.status_code == 503 and overloaded.value.code == "model_not_ready"
    assert overloaded.value.retry_after == 5
    with pytest.raises(OverloadedError):
        list(llm.stream("x"))
