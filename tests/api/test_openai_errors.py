"""Every error of /v1/* reaches the official SDK as its typed exception, in OpenAI's shape."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from llm_api_reverse.scripted import PIECES, PIECES_THEN_FAIL
from openai import OpenAI

from tests.conftest import LiveServer, assert_error, stream_events

USER = [{"role": "user", "content": "hi"}]
PERSON_WITH_BOUNDS = {"type": "object", "properties": {"age": {"type": "integer",
                                                               "minimum": 0}}}


def chat(**kwargs: Any) -> Callable[[OpenAI], Any]:
    return lambda sdk: sdk.chat.completions.create(**{"model": "tiny", "messages": USER,
                                                      **kwargs})


def complete(**kwargs: Any) -> Callable[[OpenAI], Any]:
    return lambda sdk: sdk.completions.create(**{"model": "tiny", "prompt": "x", **kwargs})


def embed(**kwargs: Any) -> Callable[[OpenAI], Any]:
    return lambda sdk: sdk.embeddings.create(**{"model": "tiny", "input": "x", **kwargs})


CASES = [
    # 400 BadRequestError: understood, but cannot be done
    (chat(max_tokens=9000), openai.BadRequestError, "context_length_exceeded", "8192"),
    (complete(max_tokens=9000), openai.BadRequestError, "context_length_exceeded", "8192"),
    (chat(top_logprobs=2), openai.BadRequestError, "invalid_request", "logprobs"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}],
          tool_choice={"type": "function", "function": {"name": "g"}}),
     openai.BadRequestError, "invalid_request", "'g'"),
    (chat(logit_bias={"5": 1}), openai.BadRequestError, "unsupported_parameter", "logit_bias"),
    (complete(model="rev", logprobs=2), openai.BadRequestError, "unsupported_capability",
     "logprobs"),
    (embed(dimensions=8), openai.BadRequestError, "unsupported_parameter", "dimensions"),
    (chat(model="rev"), openai.BadRequestError, "unsupported_capability", "chat"),
    (complete(model="rev", extra_body={"response_format": None}), openai.UnprocessableEntityError,
     "invalid_parameter", "response_format"),
    (embed(model="rev"), openai.BadRequestError, "unsupported_capability", "embeddings"),
    (complete(suffix="y"), openai.BadRequestError, "unsupported_capability", "suffix"),
    (chat(response_format={"type": "json_schema", "json_schema": {
        "name": "p", "schema": PERSON_WITH_BOUNDS}}), openai.BadRequestError,
     "invalid_request", "properties.age.minimum"),
    (embed(input=[10**6]), openai.BadRequestError, "invalid_request", "token ids"),
    # 404 NotFoundError: unknown model, listing the served ones
    (chat(model="nope"), openai.NotFoundError, "model_not_found", "available"),
    (complete(model="nope"), openai.NotFoundError, "model_not_found", "nope"),
    (embed(model="nope"), openai.NotFoundError, "model_not_found", "nope"),
    (lambda sdk: sdk.models.retrieve("nope"), openai.NotFoundError, "model_not_found", "nope"),
    # 422 UnprocessableEntityError: malformed fields, listing what is allowed
    (chat(temperature=5), openai.UnprocessableEntityError, "invalid_parameter", "temperature"),
    (chat(n=9), openai.UnprocessableEntityError, "invalid_parameter", "n"),
    (chat(extra_body={"max_tokenz": 3}), openai.UnprocessableEntityError, "invalid_parameter",
     "max_completion_tokens"),
    (chat(messages=[{"role": "tool", "content": "x"}]),
     openai.UnprocessableEntityError, "invalid_parameter", "tool_call_id"),
    (chat(messages=[]), openai.UnprocessableEntityError, "invalid_parameter", "messages"),
    (chat(response_format={"type": "xml"}), openai.UnprocessableEntityError,
     "invalid_parameter", "json_schema"),
    (embed(input=[]), openai.UnprocessableEntityError, "invalid_parameter", "empty"),
    (embed(input=["a"] * 257), openai.UnprocessableEntityError, "invalid_parameter", "256"),
    (embed(encoding_format="int8"), openai.UnprocessableEntityError, "invalid_parameter",
     "base64"),
    # 500 InternalServerError: the engine failed; no internals leak
    (complete(model="rev", prompt="fail"), openai.InternalServerError, "backend_failure",
     "server log"),
]


@pytest.mark.parametrize(("call", "exc_type", "code", "mention"), CASES)
def test_errors_raise_the_sdks_typed_exceptions(client: OpenAI, call: Callable[[OpenAI], Any],
                                                exc_type: type[openai.APIStatusError],
                                                code: str, mention: str) -> None:
    with pytest.raises(exc_type) as caught:
        call(client)
    body = caught.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    assert body["code"] == code, body
    assert mention in body["message"], body
    assert "Traceback" not in body["message"] and "/srv" not in body["message"]


def test_error_bodies_are_openais_shape(v1: LiveServer) -> None:
    error = assert_error(v1.client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": USER, "logit_bias": {"1": 2}}), 400,
        "unsupported_parameter")
    assert error["type"] == "invalid_request_error" and error["param"] == "logit_bias"
    error = assert_error(v1.client.post("/v1/chat/completions", json={
        "model": "nope", "messages": USER}), 404, "model_not_found")
    assert error["param"] == "model"


def test_a_failure_before_the_first_piece_is_an_error_frame(client: OpenAI,
                                                            v1: LiveServer) -> None:
    stream = client.completions.create(model="rev", prompt="fail", stream=True)
    with pytest.raises(openai.APIError) as caught:
        list(stream)
    assert caught.value.body["code"] == "backend_failure"  # type: ignore[index]
    with v1.client.stream("POST", "/v1/completions", json={
            "model": "rev", "prompt": "fail", "stream": True}) as response:
        raw = response.read().decode()
    assert '"error"' in raw and "[DONE]" not in raw and "secret" not in raw
    assert client.completions.create(model="rev", prompt="ok").choices[0].text == "ko"


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server over the `scripted` test family (tests/plugins/llm-api-reverse)."""
    server = LiveServer({"models": {"script": {"model_family": "scripted"}}},
                        tmp_path_factory.mktemp("scripted")).start()
    yield server
    server.stop()


def _piece(path: str, data: str) -> str:
    """The text of one streamed event of `path`."""
    if path == "/agenerate":
        return data
    choice = json.loads(data)["choices"][0]
    text: str = choice["delta"].get("content", "") if "delta" in choice else choice["text"]
    return text


MID_STREAM = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PIECES_THEN_FAIL}],
                              "stream": True}),
    ("/v1/completions", {"prompt": PIECES_THEN_FAIL, "stream": True}),
    ("/agenerate", {"prompt": PIECES_THEN_FAIL}),
]


@pytest.mark.parametrize(("path", "body"), MID_STREAM, ids=[p for p, _ in MID_STREAM])
def test_a_failure_mid_stream_ends_the_pieces_with_one_error_frame(
        scripted: LiveServer, path: str, body: dict[str, Any]) -> None:
    """The engine fails after two pieces were sent: the client has both pieces, then one
    error frame in the one error shape (OpenAI's style on /v1: a `data:` event, no [DONE];
    `event: error` on /agenerate), and nothing of the failure's internals."""
    events = stream_events(scripted.client, {"model": "script", **body}, path)
    *pieces, (kind, data) = events
    assert [_piece(path, d) for _, d in pieces if _piece(path, d)] == list(PIECES)
    assert all(k == "message" for k, _ in pieces)
    assert kind == ("error" if path == "/agenerate" else "message")
    error = json.loads(data)
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param",
                                                               "code"}
    assert error["error"]["code"] == "backend_failure"
    assert error["error"]["type"] == "server_error" and "server log" in error["error"]["message"]
    assert "secret" not in data and "/srv" not in data and "Traceback" not in data
    assert all(d != "[DONE]" for _, d in events)


def test_the_sdk_gets_the_pieces_then_raises(scripted: LiveServer) -> None:
    sdk = OpenAI(base_url=f"{scripted.url}/v1", api_key="unused", max_retries=0)
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in sdk.chat.completions.create(model="script", stream=True, messages=[
                {"role": "user", "content": PIECES_THEN_FAIL}]):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "".join(PIECES)
    assert caught.value.body["code"] == "backend_failure"  # type: ignore[index]
    with pytest.raises(openai.APIError) as caught:
        for completion in sdk.completions.create(model="script", prompt=PIECES_THEN_FAIL,
                                                 stream=True):
            received.append(completion.choices[0].text)
    assert "".join(received) == 2 * "".join(PIECES)
    assert "secret" not in caught.value.message


def test_a_loading_model_is_503(live_server: Any) -> None:
    server = live_server({"models": {"slow": {"model_family": "reverse",
                                              "model_params": {"load_seconds": 3}}}},
                         wait_ready=False)
    sdk = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        sdk.completions.create(model="slow", prompt="abc")
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"]
    assert caught.value.body["code"] == "model_not_ready"  # type: ignore[index]
    server.wait_ready()
    assert sdk.completions.create(model="slow", prompt="abc").choices[0].text == "cba"
