"""What the classes put on the wire, how they read it back, and how answers become errors.

A recording endpoint checks the request (headers, body) and produces statuses a test server
cannot be made to send on demand; the live server covers the rest (see test_lc_llm.py).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from langchain_llm_api import (
    LLMAPI,
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    ChatLLMAPI,
    LLMAPIEmbeddings,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
)
from langchain_llm_api.sse import ServerSentEvent, iter_events
from lc_servers import RecordingEndpoint


def test_api_key_is_sent_as_bearer(recording_endpoint: RecordingEndpoint) -> None:
    LLMAPI(base_url=recording_endpoint.url, api_key="sk-secret-1").invoke("hi")
    [request] = recording_endpoint.requests
    assert request.path == "/generate"
    assert request.headers["Authorization"] == "Bearer sk-secret-1"


def test_api_key_from_the_environment(recording_endpoint: RecordingEndpoint,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_API_KEY", "sk-from-env")
    monkeypatch.setenv("LLM_API_BASE_URL", recording_endpoint.url)
    llm = LLMAPI()
    assert llm.base_url == recording_endpoint.url
    assert "sk-from-env" not in repr(llm)  # a SecretStr
    llm.invoke("hi")
    recording_endpoint.reply(200, [0.5, 0.25])
    LLMAPIEmbeddings().embed_query("hi")
    assert [r.headers["Authorization"] for r in recording_endpoint.requests] == \
        ["Bearer sk-from-env"] * 2


def test_no_key_no_header(recording_endpoint: RecordingEndpoint,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLM_API_KEY", raising=False)
    LLMAPI(base_url=recording_endpoint.url).invoke("hi")
    assert "Authorization" not in recording_endpoint.requests[0].headers


async def test_async_calls_send_the_key(recording_endpoint: RecordingEndpoint) -> None:
    await LLMAPI(base_url=recording_endpoint.url, api_key="sk-async").ainvoke("hi")
    assert recording_endpoint.requests[0].headers["Authorization"] == "Bearer sk-async"


def test_stop_and_params_only_when_given(recording_endpoint: RecordingEndpoint) -> None:
    LLMAPI(base_url=recording_endpoint.url).invoke("plain")
    LLMAPI(base_url=recording_endpoint.url, max_tokens=5, stop=["\n"]).invoke("with")
    LLMAPI(base_url=recording_endpoint.url, model="m", seed=3).invoke("call", stop=["END"])
    bodies = [r.body for r in recording_endpoint.requests]
    assert bodies == [
        {"prompt": "plain"},
        {"prompt": "with", "params": {"max_tokens": 5, "stop": ["\n"]}},
        {"prompt": "call", "params": {"seed": 3, "stop": ["END"]}, "model": "m"},
    ]


def test_embeddings_are_batched(recording_endpoint: RecordingEndpoint) -> None:
    recording_endpoint.reply(200, [[1.0, 0.0], [0.0, 1.0]])
    embeddings = LLMAPIEmbeddings(base_url=recording_endpoint.url, batch_size=2, model="e")
    assert embeddings.embed_documents(["a", "b", "c", "d"]) == [[1.0, 0.0], [0.0, 1.0]] * 2
    assert [r.body for r in recording_endpoint.requests] == [
        {"text": ["a", "b"], "model": "e"}, {"text": ["c", "d"], "model": "e"}]
    assert embeddings.embed_documents([]) == []
    assert len(recording_endpoint.requests) == 2
    with pytest.raises(TypeError, match="2 vectors for 1 texts"):
        embeddings.embed_documents(["only one"])  # the endpoint still answers two


def _error(code: str, type_: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


@pytest.mark.parametrize(("status", "headers", "body", "cls", "retry_after"), [
    (401, {}, _error("invalid_api_key", "authentication_error", "Unknown API key."),
     AuthenticationError, None),
    (403, {}, _error("model_not_allowed", "permission_error", "Key may use: a, b."),
     PermissionDeniedError, None),
    (429, {"Retry-After": "17"}, _error("quota_exceeded", "rate_limit_error",
                                         "max_requests used 10/10."), RateLimitError, 17),
    (503, {"Retry-After": "3"}, _error("queue_full", "overloaded_error", "Queue full."),
     OverloadedError, 3),
    (422, {}, _error("invalid_parameter", "invalid_request_error", "'params.top_k': bad"),
     BadRequestError, None),
])
@pytest.mark.parametrize("kind", ["llm", "llm-stream", "chat", "embeddings"])
async def test_error_statuses_become_typed_exceptions(
        recording_endpoint: RecordingEndpoint, status: int, headers: dict[str, str],
        body: dict[str, Any], cls: type[Exception], retry_after: float | None,
        kind: str) -> None:
    recording_endpoint.reply(status, body, headers)
    options = {"base_url": recording_endpoint.url, "max_retries": 0}
    calls = {
        "llm": lambda: LLMAPI(**options).ainvoke("x"),
        "llm-stream": lambda: _drain(LLMAPI(**options).astream("x")),
        "chat": lambda: ChatLLMAPI(**options, model="m").ainvoke("x"),
        "embeddings": lambda: LLMAPIEmbeddings(**options).aembed_query("x"),
    }
    with pytest.raises(cls) as raised:
        await calls[kind]()
    error: Any = raised.value
    assert error.status_code == status and error.retry_after == retry_after
    assert error.message == body["error"]["message"] and error.code == body["error"]["code"]
    assert str(status) in str(error) and body["error"]["message"] in str(error)


async def _drain(stream: Any) -> list[Any]:
    return [piece async for piece in stream]


def test_overloaded_is_retried_after_the_given_wait(recording_endpoint: RecordingEndpoint,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    # Only the client's own sleep: patching time.sleep would stall every thread of the process.
    monkeypatch.setattr("langchain_llm_api._connection.sleep", waits.append)
    recording_endpoint.reply(503, _error("queue_full", "overloaded_error", "Queue full."),
                             {"Retry-After": "2"})
    with pytest.raises(OverloadedError):
        LLMAPI(base_url=recording_endpoint.url, max_retries=2).invoke("x")
    assert len(recording_endpoint.requests) == 3 and waits == [2.0, 2.0]


def test_unreachable_server() -> None:
    with pytest.raises(APIConnectionError, match="could not talk"):
        LLMAPI(base_url="http://127.0.0.1:9", max_retries=0).invoke("x")


@pytest.mark.parametrize(("lines", "events"), [
    (["data: a", ""], [ServerSentEvent("a")]),
    ([": ping - 2026", "", "data: a", "", ": ping", ""], [ServerSentEvent("a")]),
    (["data: one", "data:", "data:  two", ""], [ServerSentEvent("one\n\n two")]),
    (["data:no-space", ""], [ServerSentEvent("no-space")]),
    (["event: error", "data: {}", ""], [ServerSentEvent("{}", "error")]),
    (["id: 7", "data: x", "", "data: y", ""], [ServerSentEvent("x", id="7"),
                                               ServerSentEvent("y", id="7")]),
    (["event: ignored", "", "data: z", ""], [ServerSentEvent("z")]),
    (["retry: 10", "unknown: 1", "data", ""], [ServerSentEvent("")]),
    (["data: cut off"], []),
])
def test_sse_parsing_follows_the_spec(lines: list[str], events: list[ServerSentEvent]) -> None:
    assert list(iter_events(lines)) == events


async def test_async_calls_never_touch_the_sync_client(recording_endpoint: RecordingEndpoint,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The async methods run on httpx.AsyncClient, not on a worker thread calling the sync
    client (LangChain's fallback for classes without native async)."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the sync httpx client was used by an async call")

    monkeypatch.setattr(httpx.Client, "send", refuse)
    url = recording_endpoint.url
    assert await LLMAPI(base_url=url).ainvoke("x") == "ok"
    recording_endpoint.reply(200, b"data: a\n\n: ping\n\ndata: b\n\n",
                             content_type="text/event-stream")
    assert [p async for p in LLMAPI(base_url=url).astream("x")] == ["a", "b"]
    recording_endpoint.reply(200, [[0.5], [1.0]])
    assert await LLMAPIEmbeddings(base_url=url).aembed_documents(["a", "b"]) == [[0.5], [1.0]]
