"""Tokenizing never runs on, nor holds up, a model's engine thread (#22, finding 5).

The backend's tokenizer methods are wrapped to record the thread that calls them, and to
hold a long prompt at a gate the test opens: the engine thread must never be the caller,
and a stream must keep receiving tokens while a long prompt is being tokenized. Nothing here
depends on the machine's speed: every wait is for an event, with a generous timeout.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from backends.base import Backend
from engine.inprocess import InProcessClient
from engine.scheduler import ModelScheduler
from tests.auth.conftest import ADMIN, ADMIN_KEY, bearer
from tests.conftest import FIXTURES, TINY_GGUF, LiveServer, assert_error, parse_sse

WAIT = 60.0  # seconds: for events that happen at once unless the code under test is wrong
N_CTX = 2048
FAMILIES = {
    "llama": {"model_family": "llama", "setup_params": {"model_path": str(TINY_GGUF)},
              "model_params": {"n_ctx": N_CTX, "n_threads": 2, "parallel": 2}},
    "huggingface": {"model_family": "huggingface",
                    "setup_params": {"model_path": str(FIXTURES / "tiny-llama-hf")},
                    "model_params": {"context_length": N_CTX, "parallel": 2}},
}
TOKENIZER_METHODS = ("tokenize", "detokenize", "apply_chat_template")


@pytest.fixture(scope="module", params=list(FAMILIES))
def server(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One model of each family that tokenizes, auth on (keys with token quotas make
    admission count the prompt's tokens)."""
    config = {"auth": {"enabled": True, "admin_key": ADMIN_KEY},
              "server": {"placement": "inprocess"},
              "models": {"tiny": FAMILIES[request.param]}}
    live = LiveServer(config, tmp_path_factory.mktemp(request.param)).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def quota_key(server: LiveServer) -> dict[str, str]:
    """A key with token quotas: each generation's prompt tokens are counted at admission."""
    response = server.client.post("/admin/keys", headers=ADMIN, json={
        "name": "quota", "max_tokens": 10_000_000, "tpm": 10_000_000})
    assert response.status_code == 201, response.text
    return bearer(response.json()["secret"])


def scheduler_of(server: LiveServer) -> ModelScheduler:
    client = server.app.state.pool.clients["tiny"]
    assert isinstance(client, InProcessClient)  # the test watches the backend's threads
    return client.scheduler


@dataclass
class Recorder:
    """The threads that called the backend's tokenizer methods, outside `embed` (which
    tokenizes as part of the embedding work, on the engine thread by design)."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    in_embed: threading.local = field(default_factory=threading.local)

    def names(self, method: str | None = None) -> set[str]:
        return {thread for called, thread in self.calls if method in (None, called)}


@pytest.fixture
def recorder(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> Recorder:
    backend = scheduler_of(server).backend
    assert backend is not None
    record = Recorder()
    for name in TOKENIZER_METHODS:
        monkeypatch.setattr(backend, name, _recording(record, name, getattr(backend, name)))
    original_embed = backend.embed

    def embed(texts: list[str]) -> Any:
        record.in_embed.active = True
        try:
            return original_embed(texts)
        finally:
            record.in_embed.active = False

    monkeypatch.setattr(backend, "embed", embed)
    return record


def _recording(record: Recorder, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def recorded(*args: Any, **kwargs: Any) -> Any:
        if not getattr(record.in_embed, "active", False):
            record.calls.append((name, threading.current_thread().name))
        return method(*args, **kwargs)

    return recorded


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def test_the_engine_thread_never_tokenizes(server: LiveServer, recorder: Recorder,
                                           quota_key: dict[str, str]) -> None:
    client, chat = server.client, [{"role": "user", "content": "hello there"}]
    ok(client.post("/generate", headers=quota_key, json={"prompt": "hello", "params": {
        "max_tokens": 4}}))
    ok(client.post("/v1/completions", headers=quota_key, json={
        "model": "tiny", "prompt": ["one", "two"], "max_tokens": 2}))
    ok(client.post("/chat_completion", headers=quota_key, json={
        "job_id": "job-1", "messages": chat, "meta": {"tokens_limit": 4}}))
    ids = ok(client.post("/tokenize", headers=quota_key, json={"text": "hello world"}))
    ok(client.post("/tokenize", headers=quota_key, json={"messages": chat}))
    ok(client.post("/detokenize", headers=quota_key, json={"tokens": ids["tokens"]}))
    ok(client.post("/v1/embeddings", headers=quota_key, json={"model": "tiny",
                                                               "input": ["a b", "c"]}))
    ok(client.post("/v1/embeddings", headers=quota_key, json={"model": "tiny",
                                                               "input": ids["tokens"]}))
    for method in TOKENIZER_METHODS:
        assert recorder.names(method), f"{method} was never called"
    engine = scheduler_of(server)._thread.name
    assert engine not in recorder.names(), recorder.calls
    # One tokenizer thread per model: tokenizing takes at most one core per model.
    assert len(recorder.names()) == 1 and recorder.names().pop().startswith("tokenize-tiny")


def test_the_choices_of_one_prompt_are_tokenized_once(server: LiveServer, recorder: Recorder,
                                                      quota_key: dict[str, str]) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 3,
            "max_tokens": 2}
    assert len(ok(server.client.post("/v1/chat/completions", headers=quota_key,
                                     json=body))["choices"]) == 3
    assert [m for m, _ in recorder.calls] == ["apply_chat_template", "tokenize"]


def test_an_over_long_prompt_is_refused_before_tokenizing(server: LiveServer,
                                                          recorder: Recorder) -> None:
    limit = server.app.state.pool.clients["tiny"].limits.prompt_chars_per_token * N_CTX
    response = server.client.post("/generate", headers=ADMIN,
                                  json={"prompt": "x" * (limit + 1)})
    assert_error(response, 400, "context_length_exceeded",
                 mentions=(str(limit), "server.max_prompt_chars_per_token"))
    assert not recorder.calls


@dataclass
class Gate:
    """Holds a long prompt's tokenization until the test opens it."""

    entered: threading.Event = field(default_factory=threading.Event)
    opened: threading.Event = field(default_factory=threading.Event)
    tokens_when_entered: int = -1


def test_a_stream_runs_while_a_long_prompt_is_tokenized(server: LiveServer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream is admitted and has taken one decode step; the engine then waits (a gate
    in its step) until a long prompt is inside the tokenizer, held there by a second gate.
    The stream must run to its end while that tokenization is still held: on the engine
    thread it could not."""
    scheduler, gate = scheduler_of(server), Gate()
    backend = scheduler.backend
    assert backend is not None
    long_prompt = "word " * 1000
    _hold_long_prompts(monkeypatch, scheduler, backend, gate, len(long_prompt))
    _hold_engine_until(monkeypatch, backend, gate.entered)

    done: list[httpx.Response] = []
    try:
        with server.client.stream("POST", "/agenerate", headers=ADMIN, json={
                "prompt": "Once upon a time", "params": {"max_tokens": 48, "temperature": 1.5,
                                                         "seed": 7, "min_p": 0,
                                                         "top_k": 0}}) as stream:
            assert stream.status_code == 200  # admitted: its first step ran
            sender = threading.Thread(target=lambda: done.append(server.client.post(
                "/generate", headers=ADMIN, json={"prompt": long_prompt,
                                                  "params": {"max_tokens": 1}})))
            sender.start()
            assert gate.entered.wait(WAIT), "the long prompt never reached the tokenizer"
            events = list(parse_sse(stream.iter_lines()))  # to its end, gate still shut
        assert not gate.opened.is_set() and not done
        assert [e for e, _ in events] == ["message"] * len(events) and events
        assert scheduler.stats.tokens_generated > gate.tokens_when_entered
    finally:
        gate.opened.set()
    sender.join(WAIT)
    assert done and done[0].status_code == 200, done and done[0].text


def _hold_long_prompts(monkeypatch: pytest.MonkeyPatch, scheduler: ModelScheduler,
                       backend: Backend, gate: Gate, size: int) -> None:
    tokenize = backend.tokenize

    def held(text: str, add_special: bool = True) -> list[int]:
        if len(text) >= size:
            gate.tokens_when_entered = scheduler.stats.tokens_generated
            gate.entered.set()
            assert gate.opened.wait(WAIT), "the test never opened the gate"
        return tokenize(text, add_special)

    monkeypatch.setattr(backend, "tokenize", held)


def _hold_engine_until(monkeypatch: pytest.MonkeyPatch, backend: Backend,
                       event: threading.Event) -> None:
    """After the engine's first decode step (the stream's prompt and first token, its
    response begun), it waits for `event` before returning: the rest of the stream is
    decoded only once the long prompt is in the tokenizer."""
    engine = backend.batch_engine() if type(backend).__name__ == "LlamaBackend" else None
    cls = type(engine) if engine is not None else _hf_engine_class()
    step = cls.step

    def held_step(self: Any) -> Any:
        produced = step(self)
        event.wait(WAIT / 2)
        return produced

    monkeypatch.setattr(cls, "step", held_step)


def _hf_engine_class() -> type[Any]:
    from backends.hfbatch import HFBatchEngine

    return HFBatchEngine
