"""Local worker processes: a model's crash ends its worker, never the API process.

Crashes are real: the `scripted` family ends its worker with SIGSEGV, as a fault in native
code would, and the llama tests `kill -9` the worker of the tiny GGUF mid-stream."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

import engine.local
from engine.local import LocalClient
from tests.conftest import LiveServer, assert_error, parse_sse, tiny_config, wait_for

GREEDY = {"temperature": 0}


def client_of(server: LiveServer, name: str) -> LocalClient:
    client = server.app.state.pool.clients[name]
    assert isinstance(client, LocalClient)
    return client


def worker_pid(server: LiveServer, name: str) -> int:
    pid = client_of(server, name).pid
    assert pid is not None
    return pid


def model_state(server: LiveServer, name: str) -> dict[str, Any]:
    return server.model_stats(name)


@pytest.fixture(autouse=True)
def quick_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Restart at once and give up after three failures: the tests see every state soon."""
    monkeypatch.setattr(engine.local, "BACKOFF_START", 0.05)
    monkeypatch.setattr(engine.local, "MAX_FAILURES", 3)


@pytest.fixture
def scripted(live_server: Any, tmp_path: Path) -> LiveServer:
    server: LiveServer = live_server({"models": {
        "s": {"model_family": "scripted",
              "model_params": {"pace": 0.01, "crash_marker": str(tmp_path / "crashed")}},
        "other": {"model_family": "reverse"}}})
    return server


def chat_stream(server: LiveServer, script: str, **params: Any) -> list[tuple[str, str]]:
    body = {"model": "s", "messages": [{"role": "user", "content": script}], "stream": True,
            **params}
    with server.client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        return list(parse_sse(response.iter_lines()))


def streamed_text(events: list[tuple[str, str]]) -> str:
    text = ""
    for _, data in events:
        if data != "[DONE]" and "choices" in (chunk := json.loads(data)):
            text += chunk["choices"][0]["delta"].get("content") or ""
    return text


def test_a_crash_mid_stream_ends_the_stream_with_an_error_frame(scripted: LiveServer) -> None:
    first = worker_pid(scripted, "s")
    events = chat_stream(scripted, "crash after 3", temperature=0.7)
    assert streamed_text(events) == "tick " * 3
    last = json.loads(events[-1][1])
    assert last["error"]["code"] == "engine_restarted", last
    assert "Retry" in last["error"]["message"] and "Traceback" not in last["error"]["message"]
    assert events[-1][1] != "[DONE]"
    # the API process is up, the other model was never touched, the worker comes back
    assert scripted.client.get("/health").status_code == 200
    wait_for(lambda: model_state(scripted, "s")["state"] == "ready", what="restart")
    assert worker_pid(scripted, "s") != first
    assert model_state(scripted, "s")["restarts"] == 1
    response = scripted.client.post("/v1/chat/completions", json={
        "model": "s", "messages": [{"role": "user", "content": "hello"}]})
    assert response.json()["choices"][0]["message"]["content"] == "hello"


def test_a_greedy_stream_is_rerun_and_its_text_arrives_exactly_once(
        scripted: LiveServer) -> None:
    events = chat_stream(scripted, "crash after 4", **GREEDY)
    assert streamed_text(events) == "tick " * 4 + "done"
    assert events[-1][1] == "[DONE]"
    assert model_state(scripted, "s")["restarts"] == 1


def test_a_crash_before_the_first_byte_is_a_json_503(scripted: LiveServer) -> None:
    response = scripted.client.post("/v1/chat/completions", json={
        "model": "s", "messages": [{"role": "user", "content": "crash after 0"}],
        "temperature": 1.0})
    assert_error(response, 503, "engine_restarted", mentions=("'s'",))
    assert "Retry-After" in response.headers


def test_a_worker_that_crashes_at_load_is_failed_with_its_reason(live_server: Any) -> None:
    server: LiveServer = live_server({"models": {
        "bad": {"model_family": "scripted", "model_params": {"crash_on_load": True}},
        "good": {"model_family": "reverse"}}}, wait_ready=False)
    wait_for(lambda: model_state(server, "bad")["state"] == "failed", timeout=60,
             what="the crashing model to be marked failed")
    state = model_state(server, "bad")
    assert "SIGSEGV" in state["error"] and "not restarted again" in state["error"], state
    assert state["restarts"] == 3
    wait_for(lambda: model_state(server, "good")["state"] == "ready", what="the other model")
    response = server.client.post("/generate", json={"model": "bad", "prompt": "x"})
    assert_error(response, 503, "model_not_ready", mentions=("SIGSEGV",))
    assert server.client.post("/generate", json={"model": "good", "prompt": "abc"}).json() \
        == "cba"


# -- a real model, a real kill -9 --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_worker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = {"models": {"tiny": tiny_config(n_ctx=2048)}}
    server = LiveServer(config, tmp_path_factory.mktemp("kill")).start()
    yield server
    server.stop()


def completion_stream(server: LiveServer, on_piece: Any = None, **params: Any) -> tuple[
        str, list[tuple[str, str]]]:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400, "stream": True,
            **params}
    text, events = "", []
    with server.client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        for event in parse_sse(response.iter_lines()):
            events.append(event)
            if event[1] != "[DONE]" and "choices" in (chunk := json.loads(event[1])):
                text += chunk["choices"][0]["text"]
                if on_piece is not None:
                    on_piece(len(events))
    return text, events


def test_kill_9_mid_stream_greedy_completes_with_the_text_exactly_once(
        tiny_worker: LiveServer) -> None:
    expected, _ = completion_stream(tiny_worker, **GREEDY)
    assert len(expected) > 50
    killed = threading.Event()

    def kill_after_some(count: int) -> None:
        if count == 20 and not killed.is_set():
            killed.set()
            os.kill(worker_pid(tiny_worker, "tiny"), signal.SIGKILL)

    text, events = completion_stream(tiny_worker, on_piece=kill_after_some, **GREEDY)
    assert killed.is_set()
    assert text == expected
    assert events[-1][1] == "[DONE]"
    assert model_state(tiny_worker, "tiny")["restarts"] >= 1


def test_kill_9_mid_stream_sampled_ends_with_an_error_frame(tiny_worker: LiveServer) -> None:
    wait_for(lambda: model_state(tiny_worker, "tiny")["state"] == "ready", what="ready")
    killed = threading.Event()

    def kill_after_some(count: int) -> None:
        if count == 10 and not killed.is_set():
            killed.set()
            os.kill(worker_pid(tiny_worker, "tiny"), signal.SIGKILL)

    _, events = completion_stream(tiny_worker, on_piece=kill_after_some, temperature=1.0,
                                  seed=None)
    assert killed.is_set()
    assert json.loads(events[-1][1])["error"]["code"] == "engine_restarted"
    wait_for(lambda: model_state(tiny_worker, "tiny")["state"] == "ready", what="restart")
    response = tiny_worker.client.post("/v1/completions", json={
        "model": "tiny", "prompt": "Hello", "max_tokens": 4})
    assert response.status_code == 200, response.text



def test_while_restarting_ready_says_so_and_requests_get_503(
        scripted: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.local, "BACKOFF_START", 3.0)
    response = scripted.client.post("/v1/chat/completions", json={
        "model": "s", "messages": [{"role": "user", "content": "crash after 0"}],
        "temperature": 1.0})
    assert_error(response, 503, "engine_restarted")
    ready = scripted.client.get("/ready")
    assert ready.status_code == 503
    state = next(m for m in ready.json()["models"] if m["name"] == "s")
    assert state["state"] == "restarting" and "SIGSEGV" in state["error"], state
    response = scripted.client.post("/v1/chat/completions", json={
        "model": "s", "messages": [{"role": "user", "content": "hello"}]})
    assert_error(response, 503, "engine_restarted", mentions=("restarting",))
    assert int(response.headers["Retry-After"]) >= 1
    assert scripted.client.post("/generate", json={"model": "other", "prompt": "ab"}).json() \
        == "ba"
    wait_for(lambda: model_state(scripted, "s")["state"] == "ready", what="restart")
