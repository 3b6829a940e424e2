"""The per-model scheduler through HTTP: queueing, 503s, cancellation, timeouts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import LiveServer, assert_error, parse_sse, tiny_config, wait_for

LONG = {"prompt": "hello", "params": {"temperature": 0, "max_tokens": 8000}}


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    return thread, result


def settled(server: LiveServer) -> int:
    """The engine's token count once it stopped moving."""
    wait_for(lambda: server.model_stats()["running"] == 0, what="the engine to go idle")
    first = server.model_stats()["tokens_generated"]
    time.sleep(0.3)
    assert server.model_stats()["tokens_generated"] == first, "the engine kept generating"
    return int(first)


def test_disconnect_mid_stream_stops_the_engine(live_server: Any) -> None:
    server = live_server(tiny_config())
    with server.client.stream("POST", "/agenerate", json=LONG) as response:
        events = parse_sse(response.iter_lines())
        for _ in range(5):
            next(events)
    # the connection is closed here, long before 8000 tokens
    tokens = settled(server)
    assert 5 <= tokens < 8000
    stats = server.model_stats()
    assert stats["cancelled"] == 1 and stats["completed"] == 0


def test_disconnect_of_a_plain_generate_stops_the_engine(live_server: Any) -> None:
    server = live_server(tiny_config())
    try:
        httpx.post(f"{server.url}/generate", json=LONG, timeout=0.5)
    except httpx.TimeoutException:
        pass
    tokens = settled(server)
    assert 0 < tokens < 8000


def test_queue_full_gives_503_with_retry_after(live_server: Any) -> None:
    config = {"models": {"tiny": {**tiny_config(parallel=1), "max_queue": 1}}}
    server = live_server(config)
    client = httpx.Client(base_url=server.url, timeout=120)
    running = client.stream("POST", "/agenerate", json=LONG)
    events = parse_sse(running.__enter__().iter_lines())
    next(events)  # the first request is running
    waiting, result = in_thread(lambda: client.post("/generate", json={
        "prompt": "hi", "params": {"max_tokens": 3}}))
    wait_for(lambda: server.model_stats()["queued"] == 1, what="a queued request")
    rejected = client.post("/generate", json={"prompt": "hi"})
    assert_error(rejected, 503, "queue_full", ("max_queue=1",))
    assert int(rejected.headers["Retry-After"]) >= 1
    assert_error(client.post("/embeddings", json={"text": "hi"}), 503, "queue_full")
    running.__exit__(None, None, None)  # free the engine: the queued request now runs
    waiting.join(60)
    assert result[0].status_code == 200 and isinstance(result[0].json(), str)
    client.close()


def test_health_answers_while_a_long_generation_runs(live_server: Any) -> None:
    server = live_server(tiny_config())
    with server.client.stream("POST", "/agenerate", json=LONG) as response:
        events = parse_sse(response.iter_lines())
        next(events)
        for path in ("/health", "/check", "/ready"):
            assert server.client.get(path).status_code == 200
        assert server.model_stats()["running"] == 1  # still generating when they answered


def test_timeout_cancels_and_explains(live_server: Any) -> None:
    config = {"server": {"request_timeout": 0.3}, **tiny_config()}
    server = live_server(config)
    assert_error(server.client.post("/generate", json=LONG), 504, "request_timeout",
                 ("request_timeout",))
    with server.client.stream("POST", "/agenerate", json=LONG) as response:
        assert response.status_code == 200
        events = list(parse_sse(response.iter_lines()))
    kind, data = events[-1]
    assert kind == "error"
    assert '"code": "request_timeout"' in data
    assert settled(server) < 2 * 8000


def test_ready_is_503_until_the_model_has_loaded(live_server: Any) -> None:
    config = {"models": {"slow": {"model_family": "reverse",
                                  "model_params": {"load_seconds": 1.5}}}}
    server = live_server(config, wait_ready=False)
    ready = server.client.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["models"][0]["state"] == "loading"
    assert server.client.get("/health").status_code == 200
    assert_error(server.client.post("/generate", json={"prompt": "abc"}), 503,
                 "model_not_ready", ("loading",))
    server.wait_ready()
    assert server.client.post("/generate", json={"prompt": "abc"}).json() == "cba"


def test_each_model_has_its_own_engine_and_queue(live_server: Any) -> None:
    config = {"models": {"tiny": {**tiny_config(parallel=1), "max_queue": 0},
                         "rev": {"model_family": "reverse"}}}
    server = live_server(config)
    assert [m["name"] for m in server.client.get("/ready").json()["models"]] == ["tiny", "rev"]
    with server.client.stream("POST", "/agenerate", json=LONG) as response:  # default: tiny
        events = parse_sse(response.iter_lines())  # (a dropped iterator closes the stream)
        next(events)
        assert server.model_stats("tiny")["running"] == 1
        # tiny is busy and may not queue, yet rev answers at once
        assert_error(server.client.post("/generate", json={"prompt": "x", "model": "tiny"}),
                     503, "queue_full")
        assert server.client.post("/generate", json={"prompt": "abc", "model": "rev"}).json() \
            == "cba"
