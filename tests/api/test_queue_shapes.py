"""Queue-style shapes (clients of a RabbitMQ/Redis LLM gateway): /chat_completion and the
{job_id, meta, content} body of /generate, with their exact responses."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest

from tests.conftest import LiveServer, assert_error, tiny_config

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A small context (256 tokens), so the clients' default tokens_limit of 8096 clamps."""
    config = {"models": {"small": tiny_config(n_ctx=256), "rev": {"model_family": "reverse"}}}
    server = LiveServer(config, tmp_path_factory.mktemp("gateway")).start()
    yield server
    server.stop()


def test_generate_queue_body_exact_response(gateway: LiveServer) -> None:
    response = gateway.client.post("/generate", json={
        "job_id": "job-7", "meta": {"model": "rev"}, "content": "abc def"})
    assert response.status_code == 200
    assert response.json() == {"content": "fed cba"}
    assert response.headers["x-request-id"] == "job-7" and "warning" not in response.headers
    classic = gateway.client.post("/generate", json={"prompt": "abc def", "model": "rev"})
    assert classic.json() == "fed cba"  # the classic body keeps its classic response


def test_generate_queue_body_matches_the_classic_one(gateway: LiveServer) -> None:
    meta = {"temperature": 0, "tokens_limit": 20, "stop_words": None, "model": "small"}
    queued = gateway.client.post("/generate", json={
        "job_id": "a1", "priority": 3, "source": "crm", "meta": meta, "content": "hello"})
    classic = gateway.client.post("/generate", json={
        "prompt": "hello", "model": "small", "params": {"temperature": 0, "max_tokens": 20}})
    assert queued.status_code == 200 and set(queued.json()) == {"content"}
    assert queued.json()["content"] == classic.json() and classic.json()


def test_chat_completion_matches_v1_chat(gateway: LiveServer) -> None:
    response = gateway.client.post("/chat_completion", json={
        "job_id": "chat-1", "meta": {"temperature": 0, "tokens_limit": 24, "model": "small"},
        "messages": MESSAGES})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "chat-1"
    body = response.json()
    assert set(body) == {"content"} and body["content"]
    v1 = gateway.client.post("/v1/chat/completions", json={
        "model": "small", "messages": MESSAGES, "temperature": 0, "max_tokens": 24}).json()
    assert body["content"] == v1["choices"][0]["message"]["content"]


def test_stop_words(gateway: LiveServer) -> None:
    def run(stop_words: list[str] | None) -> str:
        content: str = gateway.client.post("/chat_completion", json={
            "job_id": "s", "meta": {"temperature": 0, "tokens_limit": 40, "model": "small",
                                    "stop_words": stop_words},
            "messages": MESSAGES}).json()["content"]
        return content

    full = run(None)
    assert len(full) > 12
    stop = full[6:9]
    assert run([stop, "never-zz"]) == full[:full.index(stop)]


def test_tokens_limit_beyond_the_context_is_clamped(gateway: LiveServer) -> None:
    prompt_tokens = gateway.client.post("/tokenize", json={
        "model": "small", "messages": MESSAGES}).json()["count"]
    room = 256 - prompt_tokens
    before = gateway.model_stats("small")["tokens_generated"]
    response = gateway.client.post("/chat_completion", json={
        "job_id": "big", "meta": {"temperature": 0, "tokens_limit": 8096, "model": "small"},
        "messages": MESSAGES})
    assert response.status_code == 200, response.text
    warning = response.headers["warning"]
    assert warning.startswith("299 ") and "8096" in warning and f"clamped to {room}" in warning
    assert 0 < gateway.model_stats("small")["tokens_generated"] - before <= room
    fits = gateway.client.post("/chat_completion", json={
        "job_id": "fits", "meta": {"tokens_limit": room, "model": "small"},
        "messages": MESSAGES})
    assert fits.status_code == 200 and "warning" not in fits.headers


def test_job_id_is_echoed_on_errors_too(gateway: LiveServer) -> None:
    response = gateway.client.post("/chat_completion", json={
        "job_id": "err-1", "meta": {"model": "nope"}, "messages": MESSAGES})
    assert_error(response, 404, "model_not_found")
    assert response.headers["x-request-id"] == "err-1"


def test_job_id_is_in_the_log(gateway: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.api.native")
    gateway.client.post("/generate", json={"job_id": "trace-42", "source": "billing",
                                           "meta": {"model": "rev"}, "content": "x"})
    assert "job trace-42" in caplog.text and "billing" in caplog.text


@pytest.mark.parametrize(("path", "body", "status", "code", "mentions"), [
    ("/generate", {"meta": {}, "content": "x"}, 422, "invalid_parameter", ("job_id",)),
    ("/generate", {"job_id": "j", "meta": {"tokens": 3}, "content": "x"}, 422,
     "invalid_parameter", ("tokens", "allowed", "tokens_limit", "stop_words")),
    ("/generate", {"job_id": "j", "content": "x", "prompt": "y"}, 422, "invalid_parameter",
     ("prompt", "allowed", "content")),
    ("/generate", {"job_id": "has space", "content": "x"}, 422, "invalid_parameter",
     ("job_id", "printable")),
    ("/generate", {"job_id": "j", "meta": {"temperature": 3}, "content": "x"}, 422,
     "invalid_parameter", ("temperature",)),
    ("/generate", {"job_id": "j", "meta": {"model": "nope"}, "content": "x"}, 404,
     "model_not_found", ("nope", "small")),
    ("/chat_completion", {"job_id": "j", "messages": []}, 422, "invalid_parameter",
     ("messages",)),
    ("/chat_completion", {"job_id": "j", "meta": {"model": "rev"}, "messages": MESSAGES},
     400, "unsupported_capability", ("chat",)),
    ("/chat_completion", {"job_id": "j", "messages": [{"role": "bot", "content": "x"}]}, 422,
     "invalid_parameter", ("role",)),
])
def test_bad_queue_jobs(gateway: LiveServer, path: str, body: dict, status: int, code: str,
                        mentions: tuple[str, ...]) -> None:
    assert_error(gateway.client.post(path, json=body), status, code, mentions)


def test_openapi_documents_both_generate_bodies(gateway: LiveServer) -> None:
    spec = gateway.client.get("/openapi.json").json()
    body = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]
    [classic, queued] = body["schema"]["oneOf"]
    assert classic["$ref"].endswith("/GenerateRequest")
    assert set(queued["properties"]) == {"job_id", "priority", "source", "meta", "content"}
    refs = set(re.findall(r'"\$ref": ?"#/components/schemas/([^"]+)"', json.dumps(spec)))
    assert refs and refs <= set(spec["components"]["schemas"])
