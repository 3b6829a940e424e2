"""Continuous batching of the transformers families (backends.hfbatch): in-process engine
checks, then behaviour through HTTP on the tiny fixtures served by a fake hub."""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from backends.base import GenerationParams, GenerationRequest, ModelSpec
from backends.errors import BackendFailure, ContextLengthExceeded
from backends.gptq import GPTQBackend, GPTQParams
from backends.hf import HFBackend, HFParams
from backends.hfbatch import HFBatchEngine
from tests.backends.conftest import HF_REPO, TINY_GPTQ, TINY_HF, start_module_server
from tests.conftest import LiveServer, assert_error, generate, parse_sse, wait_for
from tests.fakehub import FakeHub

PROMPTS = ["Hello there", "the quick brown fox jumps over", "a", "x y z", "numbers 1 2 3",
           "once upon a time in a land far away there was a", "good morning", "why"]
GREEDY = {"temperature": 0, "max_tokens": 24}
SEEDED = {"temperature": 0.9, "seed": 7, "max_tokens": 24, "repeat_penalty": 1.2,
          "presence_penalty": 0.4, "top_k": 0, "min_p": 0}


# -- the engine, in process ----------------------------------------------------------------

@pytest.fixture(scope="module")
def backend() -> Iterator[HFBackend]:
    loaded = HFBackend.load(ModelSpec(name="tiny", path=TINY_HF,
                                      params=HFParams(device_map="cpu", parallel=8)))
    assert isinstance(loaded, HFBackend)
    yield loaded
    loaded.close()


@pytest.fixture
def engine(backend: HFBackend) -> HFBatchEngine:
    made = backend.batch_engine()
    assert isinstance(made, HFBatchEngine) and made.max_sequences == 8
    return made


def request(prompt: str, **params: Any) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, params=GenerationParams(**params))


def serial(backend: HFBackend | GPTQBackend, prompt: str, **params: Any) -> str:
    return "".join(chunk.text for chunk in backend.generate(request(prompt, **params)))


def run_all(engine: HFBatchEngine, requests: list[GenerationRequest]) -> dict[int, Any]:
    """Admit all, step until done: {key: (text, finish chunk or error)}."""
    texts: dict[int, str] = {}
    ends: dict[int, Any] = {}
    for key, req in enumerate(requests):
        assert engine.admit(key, req).prompt_tokens
        texts[key] = ""
    batch_sizes = set()
    while engine.active():
        batch_sizes.add(engine.cached_rows)
        for key, item in engine.step():
            if isinstance(item, Exception) or item.finish_reason:
                ends[key] = item
            else:
                texts[key] += item.text
    assert engine.cached_rows == 0
    if len(requests) > 1:
        assert max(batch_sizes) > 1  # they really were decoded together
    return {key: (texts[key], ends[key]) for key in texts}


def test_batched_greedy_and_seeded_text_equals_the_serial_path(
        backend: HFBackend, engine: HFBatchEngine) -> None:
    for params in (GREEDY, SEEDED):
        done = run_all(engine, [request(p, **params) for p in PROMPTS])
        for key, prompt in enumerate(PROMPTS):
            text, end = done[key]
            assert text == serial(backend, prompt, **params)
            assert end.finish_reason in ("stop", "length") and end.completion_tokens <= 24
        assert run_all(engine, [request(PROMPTS[1], **params)])[0][0] == done[1][0]


def test_a_prefix_a_running_sequence_holds_is_copied_and_gives_the_serial_text(
        backend: HFBackend, engine: HFBatchEngine) -> None:
    context = ("You are the support assistant of a bicycle shop in Lyon; answer briefly. "
               "The shop opens at nine and closes at seven, except on Sundays. ") * 2
    prompts = [context + q for q in ("When do you open?", "Do you rent bikes?",
                                     "Qui êtes-vous ?")]
    before = engine.reused_tokens
    done = run_all(engine, [request(p, **GREEDY) for p in prompts])
    context_tokens = len(backend.tokenize(context))
    assert engine.reused_tokens - before >= 2 * (context_tokens - 2)
    cached = sorted(end.cached_tokens for _, end in done.values())
    assert cached[0] == 0 and cached[1] >= context_tokens - 2
    for key, prompt in enumerate(prompts):
        assert done[key][0] == serial(backend, prompt, **GREEDY)
    engine.share_prefixes = False
    try:
        unshared = run_all(engine, [request(p, **GREEDY) for p in prompts])
        assert [unshared[k][0] for k in range(3)] == [done[k][0] for k in range(3)]
        assert all(end.cached_tokens == 0 for _, end in unshared.values())
    finally:
        engine.share_prefixes = True


def test_stops_max_tokens_and_echo_are_per_sequence(backend: HFBackend,
                                                     engine: HFBatchEngine) -> None:
    whole = serial(backend, "The quick brown fox", **GREEDY)
    stop = whole[6:9]
    requests = [request("The quick brown fox", stop=(stop,), **GREEDY),
                request("The quick brown fox", **{**GREEDY, "max_tokens": 5}),
                request("The quick brown fox", echo=True, **GREEDY),
                request("The quick brown fox", **GREEDY)]
    done = run_all(engine, requests)
    assert done[0][0] == whole[:whole.index(stop)] and done[0][1].finish_reason == "stop"
    assert done[1][1].finish_reason == "length" and done[1][1].completion_tokens == 5
    assert done[1][0] == serial(backend, "The quick brown fox", **{**GREEDY, "max_tokens": 5})
    assert done[2][0] == "The quick brown fox" + whole and done[3][0] == whole
    assert done[3][1].prompt_tokens == len(backend.tokenize("The quick brown fox"))


def test_gptq_batches_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPTQ is serial by default (half precision); with parallel > 1 its models batch too,
    and prompts admitted together decode the serial loop's greedy text."""
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    spec = ModelSpec(name="q", path=TINY_GPTQ, params=GPTQParams(device_map="cpu"))
    gptq = GPTQBackend.load(spec)
    try:
        assert isinstance(gptq, GPTQBackend) and gptq.batch_engine() is None
        gptq._params = GPTQParams(device_map="cpu", parallel=8)
        engine = gptq.batch_engine()
        assert isinstance(engine, HFBatchEngine)
        done = run_all(engine, [request(p, **GREEDY) for p in PROMPTS])
        for key, prompt in enumerate(PROMPTS):
            assert done[key][0] == serial(gptq, prompt, **GREEDY)
    finally:
        gptq.close()


def test_context_limit_is_checked_on_admission(engine: HFBatchEngine,
                                               backend: HFBackend) -> None:
    with pytest.raises(ContextLengthExceeded, match=f"holds {backend.context_length} tokens"):
        engine.admit(0, request("hi", max_tokens=backend.context_length))
    assert engine.active() == 0


class Boom(LogitsProcessor):
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:
        raise RuntimeError("injected failure")


def test_cancel_and_errors_retire_one_sequence_only(backend: HFBackend,
                                                    engine: HFBatchEngine) -> None:
    for key, prompt in enumerate(PROMPTS[:4]):
        engine.admit(key, request(prompt, **GREEDY))
    engine.admit(9, request("long one", temperature=0, max_tokens=200))
    engine._waiting[-1].processors = LogitsProcessorList([Boom()])  # fails on its first token
    first = engine.step()
    assert (9, ) == tuple(k for k, item in first if isinstance(item, BackendFailure))
    texts = dict.fromkeys(range(4), "")

    def collect(produced: list[tuple[int, Any]]) -> None:
        for key, item in produced:
            if key != 9:
                texts[key] += item.text

    collect(first)
    collect(engine.step())
    engine.cancel(2)
    assert engine.active() == 3 and engine.cached_rows == 3
    while engine.active():
        produced = engine.step()
        assert all(key != 2 for key, _ in produced)
        collect(produced)
    for key in (0, 1, 3):
        assert texts[key] == serial(backend, PROMPTS[key], **GREEDY)


def test_many_mixed_requests_leave_nothing_behind(engine: HFBatchEngine) -> None:
    rng = random.Random(3)
    key, live, finished = 0, set(), 0
    for _ in range(300):
        action = rng.random()
        if action < 0.35 and engine.active() < engine.max_sequences:
            params = {"temperature": rng.choice([0, 0.8]), "max_tokens": rng.randint(1, 12),
                      "seed": rng.randint(0, 9), "stop": ("e",) if rng.random() < 0.3 else ()}
            engine.admit(key, request(rng.choice(PROMPTS), **params))
            live.add(key)
            key += 1
        elif action < 0.45 and live:
            engine.cancel(victim := rng.choice(sorted(live)))
            live.discard(victim)
        else:
            for done, item in engine.step():
                if item.finish_reason:
                    live.discard(done)
                    finished += 1
        assert engine.active() == len(live) and engine.cached_rows <= len(live)
    for victim in sorted(live):
        engine.cancel(victim)
    assert engine.active() == 0 and engine.cached_rows == 0 and finished > 20


# -- through HTTP ---------------------------------------------------------------------------

def model(repo: str, family: str, parallel: int) -> dict[str, Any]:
    return {"model_family": family, "setup_params": {"repo_id": repo},
            "model_params": {"device_map": "cpu", "n_threads": 2, "parallel": parallel}}


@pytest.fixture(scope="module")
def server(hf_hub: FakeHub, module_env: pytest.MonkeyPatch,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("hfbatch")
    config = {"models_dir": str(root / "models"), "models": {
        "tiny": model(HF_REPO, "huggingface", 8),
        "serial": model(HF_REPO, "huggingface", 1)}}
    live = start_module_server(config, Path(root), hf_hub, module_env)
    yield live
    live.stop()


def together(server: LiveServer, jobs: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: generate(server, job[0], job[1], **job[2]), jobs))


def test_a_request_gets_the_same_text_alone_and_with_seven_others(server: LiveServer) -> None:
    for params in (GREEDY, SEEDED):
        alone = [generate(server, p, **params) for p in PROMPTS]
        assert together(server, [(p, "tiny", params) for p in PROMPTS]) == alone
        assert together(server, [(p, "serial", params) for p in PROMPTS]) == alone


def test_streams_run_together(server: LiveServer) -> None:
    """Two streams both deliver their first piece while both are running (a serial model
    would hold the second until the first finished)."""
    body = {"prompt": "Once upon a time", "model": "tiny",
            "params": {"max_tokens": 2000, "temperature": 0}}
    before = server.model_stats("tiny")["cancelled"]
    with server.client.stream("POST", "/agenerate", json=body) as first, \
            server.client.stream("POST", "/agenerate", json=body) as second:
        events = [parse_sse(response.iter_lines()) for response in (first, second)]
        assert [next(stream)[0] for stream in events] == ["message", "message"]
        assert server.model_stats("tiny")["running"] == 2
    wait_for(lambda: server.model_stats("tiny")["running"] == 0, what="cancelled streams")
    assert server.model_stats("tiny")["cancelled"] == before + 2


def test_cancelling_one_stream_leaves_the_others_text_unchanged(server: LiveServer) -> None:
    expected = [generate(server, p, **GREEDY) for p in PROMPTS[:4]]
    body = {"prompt": "cancel me", "model": "tiny",
            "params": {"max_tokens": 2000, "temperature": 0}}
    stats = server.model_stats("tiny")
    with server.client.stream("POST", "/agenerate", json=body) as doomed:
        lines = doomed.iter_lines()  # kept: a dropped iterator would close the stream now
        assert next(parse_sse(lines))[1]
        with ThreadPoolExecutor(4) as pool:
            others = pool.map(lambda p: generate(server, p, **GREEDY), PROMPTS[:4])
            # leaving the block closes the doomed stream while the others run
    assert list(others) == expected
    wait_for(lambda: server.model_stats("tiny")["running"] == 0, what="the cancelled stream")
    after = server.model_stats("tiny")
    assert after["cancelled"] == stats["cancelled"] + 1
    assert after["tokens_generated"] - stats["tokens_generated"] < 2000 + 4 * 24 * 2


def test_mixed_requests_in_a_batch(server: LiveServer) -> None:
    whole = generate(server, "The quick brown fox", **GREEDY)
    stop = whole[6:9]
    client = server.client

    def completion(max_tokens: int) -> dict[str, Any]:
        response = client.post("/v1/completions", json={
            "model": "tiny", "prompt": "The quick brown fox", "max_tokens": max_tokens,
            "temperature": 0})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    with ThreadPoolExecutor(8) as pool:
        stopped = pool.submit(generate, server, "The quick brown fox", stop=stop, **GREEDY)
        short = pool.submit(completion, 5)
        too_long = pool.submit(client.post, "/generate", json={
            "prompt": "hi", "model": "tiny", "params": {"max_tokens": 100_000}})
        rest = [pool.submit(generate, server, p, **GREEDY) for p in PROMPTS[:5]]
    assert stopped.result() == whole[:whole.index(stop)]
    assert short.result()["usage"]["completion_tokens"] == 5
    assert short.result()["choices"][0]["finish_reason"] == "length"
    assert_error(too_long.result(), 400, "context_length_exceeded")
    assert all(f.result() for f in rest)
    stats = server.model_stats("tiny")
    assert stats["running"] == 0 and stats["queued"] == 0
