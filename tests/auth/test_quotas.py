"""Quotas are exact under parallel load, on SQLite and on Postgres; tokens are reserved at
admission and settled to the real count, streaming included."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.auth.conftest import ADMIN, bearer, create_key, key_info
from tests.conftest import TINY_GGUF, LiveServer, assert_error, parse_sse, wait_for
from tests.gated import gated_family

N = 50


def in_parallel(server: LiveServer, n: int,
                send: Callable[[httpx.Client, int], httpx.Response]) -> list[httpx.Response]:
    """`n` requests from `n` threads, released together by a barrier."""
    barrier = threading.Barrier(n)

    def one(i: int) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            client.get("/health")  # connect before the barrier
            barrier.wait()
            return send(client, i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def prompt_tokens(text: str) -> int:
    """Tokens of `text` by llama.cpp itself, independently of the server."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(TINY_GGUF), vocab_only=True, verbose=False)
    return len(vocab.tokenize(text.encode(), add_bos=True, special=True))


def usage_of(server: LiveServer, key_id: int) -> dict[str, Any]:
    report: dict[str, Any] = server.client.get(
        "/admin/usage", params={"key_id": key_id}, headers=ADMIN).json()
    return report


@pytest.mark.parametrize("path", ["/generate", "/agenerate"])
def test_exactly_k_of_50_parallel_requests_succeed(auth_server: Any,
                                                   store_config: dict[str, Any],
                                                   path: str) -> None:
    server = auth_server(**store_config)
    k = 7
    key_id, secret = create_key(server.client, max_requests=k)
    responses = in_parallel(server, N, lambda c, i: c.post(
        path, json={"prompt": f"request {i}", "model": "rev"}, headers=bearer(secret)))
    ok = [r for r in responses if r.status_code == 200]
    assert len(ok) == k
    for response in responses:
        if response.status_code != 200:
            assert_error(response, 429, "quota_exceeded", ("Request quota", f"{k} of {k}"))
            assert response.headers["x-ratelimit-limit"] == str(k)
            assert response.headers["x-ratelimit-remaining"] == "0"
    info = key_info(server.client, key_id)
    assert (info["used_requests"], info["reserved_tokens"]) == (k, 0)
    totals = usage_of(server, key_id)["totals"]
    assert (totals["requests"], totals["errors"]) == (N, N - k)
    again = server.client.post(path, json={"prompt": "one more", "model": "rev"},
                               headers=bearer(secret))
    assert_error(again, 429, "quota_exceeded")


def test_token_quota_cannot_be_overrun_by_parallel_requests(auth_server: Any,
                                                             store_config: dict[str, Any]) -> None:
    server = auth_server(**store_config)
    prompt, max_tokens = "hello world", 12
    reservation = prompt_tokens(prompt) + max_tokens
    quota = 3 * reservation + reservation // 2
    key_id, secret = create_key(server.client, max_tokens=quota)
    body = {"prompt": prompt, "model": "tiny", "params": {"max_tokens": max_tokens,
                                                          "temperature": 0}}
    responses = in_parallel(server, 12, lambda c, i: c.post("/generate", json=body,
                                                            headers=bearer(secret)))
    ok = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code != 200]
    assert len(ok) >= 3 and rejected
    for response in rejected:
        assert_error(response, 429, "quota_exceeded", ("Token quota", str(quota)))
    info = key_info(server.client, key_id)
    assert info["reserved_tokens"] == 0
    assert info["used_tokens"] <= quota
    totals = usage_of(server, key_id)["totals"]
    assert info["used_tokens"] == totals["prompt_tokens"] + totals["completion_tokens"]
    assert info["used_requests"] == len(ok)


def test_stream_reserves_prompt_plus_max_tokens_then_settles(
        auth_server: Any, store_config: dict[str, Any], request: pytest.FixtureRequest) -> None:
    gate = gated_family(request)
    server = auth_server(models={"gated": gate.model()}, **store_config)
    key_id, secret = create_key(server.client, max_tokens=100_000)
    prompt = "once upon a time there was"  # 6 tokens: the gated model's tokens are words
    body = {"prompt": prompt, "model": "gated", "params": {"max_tokens": 50}}
    with server.client.stream("POST", "/agenerate", json=body,
                              headers=bearer(secret)) as response:
        events = parse_sse(response.iter_lines())
        assert next(events) == ("message", ".")
        gate.wait_reached()  # held there: the stream is still running while we look
        assert key_info(server.client, key_id)["reserved_tokens"] == 6 + 50
        gate.opened.set()
        text = "." + "".join(data for _, data in events)
    assert text == "." * 50
    info = key_info(server.client, key_id)  # settled before the stream's end was sent
    assert (info["reserved_tokens"], info["used_tokens"]) == (0, 6 + 50)
    day = usage_of(server, key_id)["days"][0]
    assert (day["prompt_tokens"], day["completion_tokens"]) == (6, 50)


def test_client_disconnect_mid_stream_settles_what_was_generated(
        auth_server: Any, store_config: dict[str, Any], request: pytest.FixtureRequest) -> None:
    gate = gated_family(request)
    server = auth_server(models={"gated": gate.model(before_gate=3)}, **store_config)
    key_id, secret = create_key(server.client, max_tokens=100_000)
    body = {"prompt": "hello", "model": "gated", "params": {"max_tokens": 2000}}
    with server.client.stream("POST", "/agenerate", json=body,
                              headers=bearer(secret)) as response:
        events = parse_sse(response.iter_lines())
        assert [next(events) for _ in range(3)] == [("message", ".")] * 3
        gate.wait_reached()
        assert key_info(server.client, key_id)["reserved_tokens"] == 1 + 2000
    # the client left while the generation was held at the gate, after 3 pieces
    wait_for(lambda: key_info(server.client, key_id)["reserved_tokens"] == 0,
             what="the reservation to be settled after the disconnect")
    assert key_info(server.client, key_id)["used_tokens"] == 1 + 3
    [day] = usage_of(server, key_id)["days"]
    assert (day["requests"], day["errors"], day["completion_tokens"]) == (1, 1, 3)
    gate.opened.set()  # the engine goes on, sees the cancellation and drops the generation
    wait_for(lambda: server.model_stats("gated")["cancelled"] == 1,
             what="the engine to drop the generation")
    assert server.model_stats("gated")["tokens_generated"] == 3


def test_failures_give_the_reservation_back(auth_server: Any) -> None:
    server = auth_server()
    key_id, secret = create_key(server.client, max_tokens=10_000, max_requests=10)
    too_long = {"prompt": "hi", "model": "tiny", "params": {"max_tokens": 5000}}
    assert_error(server.client.post("/generate", json=too_long, headers=bearer(secret)),
                 400, "context_length_exceeded")
    info = key_info(server.client, key_id)
    assert (info["used_requests"], info["used_tokens"], info["reserved_tokens"]) == (0, 0, 0)
    engine_failure = {"prompt": "fail", "model": "rev"}
    assert_error(server.client.post("/generate", json=engine_failure, headers=bearer(secret)),
                 500, "backend_failure")
    with server.client.stream("POST", "/agenerate", json=engine_failure,
                              headers=bearer(secret)) as response:
        [(kind, _)] = list(parse_sse(response.iter_lines()))
    assert kind == "error"
    info = key_info(server.client, key_id)
    assert info["reserved_tokens"] == 0 and info["used_requests"] == 2
    assert usage_of(server, key_id)["totals"]["errors"] == 3


def test_embeddings_count_their_tokens(auth_server: Any) -> None:
    server = auth_server()
    key_id, secret = create_key(server.client, max_tokens=1000)
    texts = ["hello world", "a brown fox jumps"]
    response = server.client.post("/embeddings", json={"text": texts, "model": "tiny"},
                                  headers=bearer(secret))
    assert response.status_code == 200
    expected = sum(prompt_tokens(t) for t in texts)
    info = key_info(server.client, key_id)
    assert (info["used_tokens"], info["reserved_tokens"]) == (expected, 0)
    totals = usage_of(server, key_id)["totals"]
    assert (totals["prompt_tokens"], totals["completion_tokens"], totals["words"]) == \
        (expected, 0, 6)


def test_client_leaving_a_plain_generate_settles_it(
        auth_server: Any, store_config: dict[str, Any], request: pytest.FixtureRequest) -> None:
    gate = gated_family(request)
    server = auth_server(models={"gated": gate.model(before_gate=2)}, **store_config)
    key_id, secret = create_key(server.client, max_tokens=100_000)
    body = json.dumps({"prompt": "hello", "model": "gated", "params": {"max_tokens": 8000}})
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                     f"{body}".encode())
        gate.wait_reached()
        assert key_info(server.client, key_id)["reserved_tokens"] == 1 + 8000
    # the client left while the generation was held at the gate, after 2 pieces
    wait_for(lambda: key_info(server.client, key_id)["reserved_tokens"] == 0,
             what="the reservation to be settled after the client left")
    # the prompt, and the pieces the request had collected when it saw the client go
    assert 1 <= key_info(server.client, key_id)["used_tokens"] <= 1 + 2
    [day] = usage_of(server, key_id)["days"]
    assert (day["requests"], day["errors"]) == (1, 1)
    gate.opened.set()
    wait_for(lambda: server.model_stats("gated")["cancelled"] == 1,
             what="the engine to drop the generation")
    assert server.model_stats("gated")["tokens_generated"] == 2
