"""The per-model scheduler through HTTP: queueing, 503s, cancellation, timeouts."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, assert_error, parse_sse, tiny_config, wait_for
from tests.gated import gated_family

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
    body = json.dumps(LONG).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: server.model_stats()["tokens_generated"] > 0,
                 what="the generation to start")
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
    # embeddings have a bound of their own, in texts (engine.scheduler): one is served
    assert client.post("/embeddings", json={"text": "hi"}).status_code == 200
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


def test_timeout_cancels_and_explains(live_server: Any, request: pytest.FixtureRequest) -> None:
    """Each generation is held at the gate after one piece until its request_timeout has
    passed (the timeout is what is tested; 2 s leaves a busy machine time to start the
    stream), then the gate opens and the engine must drop it."""
    gate = gated_family(request)
    server = live_server({"server": {"request_timeout": 2}, "models": {"gated": gate.model()}})
    assert_error(server.client.post("/generate", json=LONG), 504, "request_timeout",
                 ("request_timeout",))
    gate.opened.set()
    wait_for(lambda: server.model_stats()["cancelled"] == 1, what="the engine to drop it")
    gate.opened.clear()
    gate.reached.clear()
    with server.client.stream("POST", "/agenerate", json=LONG) as response:
        assert response.status_code == 200
        events = list(parse_sse(response.iter_lines()))
    assert events[0] == ("message", ".")
    kind, data = events[-1]
    assert kind == "error"
    assert '"code": "request_timeout"' in data
    assert gate.reached.is_set()  # the stream timed out while held, not at its end
    gate.opened.set()
    wait_for(lambda: server.model_stats()["cancelled"] == 2, what="the engine to drop it")
    stats = server.model_stats()
    assert (stats["completed"], stats["tokens_generated"]) == (0, 2)


def test_ready_is_503_until_the_model_has_loaded(live_server: Any,
                                                request: pytest.FixtureRequest) -> None:
    gate = gated_family(request, loaded=False, opened=True)  # loads when the test says
    server = live_server({"models": {"slow": gate.model()}}, wait_ready=False)
    ready = server.client.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["models"][0]["state"] == "loading"
    assert server.client.get("/health").status_code == 200
    assert_error(server.client.post("/generate", json={"prompt": "abc"}), 503,
                 "model_not_ready", ("loading",))
    gate.loaded.set()
    server.wait_ready()
    assert server.client.post("/generate", json={"prompt": "abc", "params": {
        "max_tokens": 3}}).json() == "..."


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
