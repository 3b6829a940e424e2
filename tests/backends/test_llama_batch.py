"""The llama.cpp batching engine on the tiny GGUF: behaviour, not speed (bench/ has that)."""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from backends import llama_batch
from backends.base import Chunk, GenerationParams, GenerationRequest, ModelSpec
from backends.errors import ContextLengthExceeded, InvalidRequest, LLMAPIError
from backends.llama import LlamaBackend, LlamaParams
from backends.llama_batch import LlamaBatchEngine
from tests.conftest import TINY_GGUF, LiveServer, assert_error, parse_sse, tiny_config, wait_for

N_CTX = 256
GREEDY = GenerationParams(temperature=0, max_tokens=12)
PROMPTS = ["hello world", "the quick brown fox", "once upon a time", "a b c d e f",
           "JSON please", "héllo wörld ✓ 日本", "1 2 3 4", "tell me a story about"]


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaBackend]:
    loaded = LlamaBackend.load(ModelSpec(name="tiny", path=TINY_GGUF, params=LlamaParams(
        n_ctx=N_CTX, n_threads=2, parallel=8, prompt_chunk=16)))
    assert isinstance(loaded, LlamaBackend)
    yield loaded
    loaded.close()


@pytest.fixture
def engine(backend: LlamaBackend) -> LlamaBatchEngine:
    engine = backend.batch_engine()
    assert isinstance(engine, LlamaBatchEngine) and engine.active() == 0
    return engine


def run(engine: LlamaBatchEngine, requests: list[GenerationRequest],
        cancel_after: dict[int, int] | None = None) -> dict[int, str | LLMAPIError | None]:
    """Admit every request (keys 0..n-1) and step until all retire; `cancel_after[key] = n`
    cancels that sequence once it produced n chunks. Cancelled ones map to None."""
    cancel_after = cancel_after or {}
    texts: dict[int, Any] = {}
    chunks: dict[int, int] = {}
    for key, request in enumerate(requests):
        first = engine.admit(key, request)
        assert first.prompt_tokens and first.text == "" and first.finish_reason is None
        texts[key], chunks[key] = "", 0
    while engine.active():
        for key, item in engine.step():
            if texts[key] is None:  # cancelled after this step's chunks were made
                continue
            if isinstance(item, LLMAPIError):
                texts[key] = item
                continue
            assert isinstance(item, Chunk)
            texts[key] += item.text
            chunks[key] += 1
            if chunks[key] == cancel_after.get(key) and item.finish_reason is None:
                engine.cancel(key)
                texts[key] = None
    return texts


def alone(engine: LlamaBatchEngine, request: GenerationRequest) -> str:
    text = run(engine, [request])[0]
    assert isinstance(text, str)
    return text


def assert_clean(engine: LlamaBatchEngine) -> None:
    """Every slot free; the KV cache holds exactly what each slot's bookkeeping says."""
    assert engine.active() == 0
    assert all(slot.seq is None for slot in engine.slots)
    for pos_max, cached_last in engine.kv_positions():
        assert pos_max == cached_last


def test_greedy_output_is_the_same_alone_and_batched(engine: LlamaBatchEngine) -> None:
    requests = [GenerationRequest(prompt=p, params=GREEDY) for p in PROMPTS]
    single = [alone(engine, r) for r in requests]
    batched = run(engine, requests)
    assert [batched[i] for i in range(8)] == single
    assert len(set(single)) > 1  # the prompts lead somewhere different


def test_greedy_argmax_picks_what_llama_cpps_greedy_sampler_picks(
        engine: LlamaBatchEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy sequences take the step's numpy argmax instead of a sampler chain: the same
    tokens as a chain ending in llama.cpp's greedy sampler, batched with sampled sequences and
    a long prompt fed in chunks meanwhile (so output rows and batch rows differ)."""
    sampled = GenerationParams(temperature=0.9, seed=7, max_tokens=12)
    requests = [GenerationRequest(prompt=p, params=sampled if i % 3 == 1 else GREEDY)
                for i, p in enumerate(PROMPTS[:7])]
    requests.append(GenerationRequest(prompt=" ".join(["word"] * 40), params=GREEDY))
    fast = run(engine, requests)
    assert all(slot.seq is None for slot in engine.slots)
    # neutral penalties make `admit` build a chain (penalties that change nothing, greedy)
    monkeypatch.setattr(llama_batch, "_penalised", lambda params: True)
    engine.admit(0, requests[0])
    assert engine.slots[0].seq is not None and engine.slots[0].seq.sampler is not None
    engine.cancel(0)
    assert run(engine, requests) == fast
    assert_clean(engine)


@pytest.mark.parametrize("penalty", [{"repeat_penalty": 1.5}, {"frequency_penalty": 2.0},
                                     {"presence_penalty": 2.0}])
def test_penalties_steer_greedy_away_from_repeats(engine: LlamaBatchEngine,
                                                  penalty: dict[str, float]) -> None:
    plain = GenerationParams(temperature=0, max_tokens=24)
    request = GenerationRequest(prompt="hello world", params=plain)
    text = alone(engine, request)
    penalised = alone(engine, GenerationRequest(prompt="hello world",
                                                params=dataclasses.replace(plain, **penalty)))
    assert text.count("ring") >= 3  # the tiny model's greedy text repeats a piece
    assert penalised != text and penalised.count("ring") < text.count("ring")
    assert_clean(engine)


def test_before_decode_runs_once_per_step_ahead_of_its_sampling(engine: LlamaBatchEngine) -> None:
    """The scheduler's hand-over hook: once per step, after the batch is filled and before
    the decode (so before this step's token is sampled)."""
    sampled: list[int] = []
    engine.before_decode = lambda: sampled.extend(  # type: ignore[method-assign]
        s.seq.count for s in engine.slots if s.seq is not None)
    try:
        engine.admit(0, GenerationRequest(prompt="hello world", params=GREEDY))
        steps = 0
        while engine.active():
            engine.step()
            steps += 1
    finally:
        del engine.before_decode
    assert steps == GREEDY.max_tokens
    assert sampled == list(range(steps))
    assert_clean(engine)


def test_seeded_sampling_is_reproducible_per_request(engine: LlamaBatchEngine) -> None:
    seeded = [GenerationRequest(prompt=p, params=GenerationParams(
        temperature=1.0, seed=100 + i, max_tokens=10)) for i, p in enumerate(PROMPTS)]
    single = [alone(engine, r) for r in seeded]
    shuffled = list(reversed(seeded))  # other neighbours, other slots
    batched = run(engine, shuffled)
    assert [batched[7 - i] for i in range(8)] == single
    other_seed = GenerationRequest(prompt=PROMPTS[0], params=GenerationParams(
        temperature=1.0, seed=999, max_tokens=10))
    assert alone(engine, other_seed) != single[0]


def test_sequences_ending_out_of_order_are_moved_to_keep_running_ids_consecutive(
        engine: LlamaBatchEngine) -> None:
    """Short requests at low ids end first; the long ones left behind are moved into the
    gaps (a gap splits llama.cpp's batch), with exactly the text they get alone."""
    lengths = [2, 20, 3, 16, 5, 18, 4, 14]
    requests = [GenerationRequest(prompt=p, params=GenerationParams(temperature=0,
                                                                    max_tokens=n))
                for p, n in zip(PROMPTS, lengths, strict=True)]
    single = [alone(engine, r) for r in requests]
    layouts: list[list[int]] = []
    engine.before_decode = lambda: layouts.append(  # type: ignore[method-assign]
        [s.id for s in engine.slots if s.seq is not None])
    before = engine.moves
    try:
        batched = run(engine, requests)
    finally:
        del engine.before_decode
    assert [batched[i] for i in range(8)] == single
    assert engine.move_steps == 1  # the tiny model: copying a stream costs less than a step
    assert engine.moves - before >= 3
    assert all(ids == list(range(ids[0], ids[0] + len(ids))) for ids in layouts)
    assert layouts[0] == list(range(8)) and len(layouts[-1]) == 1
    assert_clean(engine)


def test_a_new_sequence_fills_a_gap_or_extends_the_running_block(
        engine: LlamaBatchEngine) -> None:
    for key in range(8):
        engine.admit(key, GenerationRequest(prompt=f"p{key}", params=GREEDY))
    for slot in (0, 1, 2, 5):
        seq = engine.slots[slot].seq
        assert seq is not None
        engine.cancel(seq.key)  # running: slots 3, 4, 6, 7
    engine.admit(8, GenerationRequest(prompt="fills the gap", params=GREEDY))
    engine.admit(9, GenerationRequest(prompt="just below", params=GREEDY))
    assert engine._by_key[8].id == 5 and engine._by_key[9].id == 2
    for key in list(engine._by_key):
        engine.cancel(key)
    assert_clean(engine)


def test_cancelling_one_stream_leaves_the_others_alone(engine: LlamaBatchEngine) -> None:
    params = GenerationParams(temperature=0, max_tokens=20)
    requests = [GenerationRequest(prompt=p, params=params) for p in PROMPTS]
    undisturbed = run(engine, requests)
    texts = run(engine, requests, cancel_after={3: 4})
    assert texts[3] is None
    assert {k: v for k, v in texts.items() if k != 3} == \
        {k: v for k, v in undisturbed.items() if k != 3}
    # its cells went with it (slot 3 then took over a sequence moved into the gap)
    prompt3 = engine._backend.tokenize(PROMPTS[3])
    assert not any(slot.cached[:len(prompt3)] == prompt3 for slot in engine.slots)
    assert_clean(engine)


def test_per_sequence_context_limit(engine: LlamaBatchEngine) -> None:
    assert engine.context_length == N_CTX
    too_long = GenerationRequest(prompt="hello " * 100, params=GenerationParams(
        max_tokens=N_CTX - 50))
    with pytest.raises(ContextLengthExceeded, match="256 tokens per sequence"):
        engine.admit(0, too_long)
    assert_clean(engine)


def test_prefix_reuse_returns_the_cold_text(engine: LlamaBatchEngine) -> None:
    turn1 = "user: tell me about the weather in the mountains today\nassistant:"
    turn2 = turn1 + " it is sunny\nuser: and tomorrow?\nassistant:"
    request = GenerationRequest(prompt=turn2, params=GREEDY)
    for key in range(8):  # a cold cache: every slot empty
        engine.admit(key, GenerationRequest(prompt="x", params=GREEDY))
        engine.cancel(key)
    cold = alone(engine, request)
    alone(engine, GenerationRequest(prompt=turn1, params=GREEDY))
    before = engine.reused_tokens
    warm = alone(engine, request)
    assert engine.reused_tokens - before >= len(engine._backend.tokenize(turn1)) - 1
    assert warm == cold
    assert_clean(engine)


def test_a_cached_slot_is_taken_only_for_a_long_shared_prefix(engine: LlamaBatchEngine) -> None:
    """A new sequence takes the least recently used free slot that keeps the running ids
    consecutive, unless another free slot's cache shares REUSE_MIN more leading tokens."""
    from backends.llama_batch import REUSE_MIN

    story = " ".join(f"w{i}" for i in range(60))  # well over REUSE_MIN tokens
    assert len(engine._backend.tokenize(story)) > REUSE_MIN + 8
    engine.clear_cache()
    alone(engine, GenerationRequest(prompt=story, params=GREEDY))
    holder = next(slot for slot in engine.slots if slot.cached)
    short = GenerationRequest(prompt=story.split()[0] + " w1 zebra", params=GREEDY)
    lru = min(engine.slots, key=lambda slot: (slot.used, slot.id))
    engine.admit(10, short)  # shares a few tokens with the holder: not worth its slot
    assert engine._by_key[10] is lru is not holder
    before = engine.reused_tokens
    engine.admit(11, GenerationRequest(prompt=story + " and more", params=GREEDY))
    assert engine._by_key[11] is holder
    assert engine.reused_tokens - before >= len(engine._backend.tokenize(story)) - 1
    for key in (10, 11):
        engine.cancel(key)
    assert_clean(engine)


def test_a_thousand_mixed_requests_leave_no_orphans(engine: LlamaBatchEngine) -> None:
    rng = random.Random(8)
    requests: list[GenerationRequest] = []
    cancel_after: dict[int, int] = {}
    refused = 0
    key = 0
    waiting = 0
    while key < 1000:
        kind = rng.random()
        prompt = rng.choice(PROMPTS) + " " + str(rng.randrange(1000))
        params = GenerationParams(temperature=rng.choice([0, 0.8]), max_tokens=rng.randint(1, 4),
                                  stop=("e",) if kind < 0.2 else ())
        if kind > 0.9:  # over-long, or a JSON schema constrained decoding cannot enforce
            bad = GenerationParams(max_tokens=N_CTX) if kind > 0.95 else \
                GenerationParams(json_schema={"type": "integer", "minimum": 3})
            with pytest.raises(InvalidRequest):
                engine.admit(10_000 + key, GenerationRequest(prompt=prompt, params=bad))
            refused += 1
        else:
            requests.append(GenerationRequest(prompt=prompt, params=params))
            if kind > 0.75:
                cancel_after[waiting] = 1
            waiting += 1
        key += 1
        if waiting == 8 or key == 1000:
            texts = run(engine, requests, cancel_after)
            assert all(t is None or isinstance(t, str) for t in texts.values())
            requests, cancel_after, waiting = [], {}, 0
    assert refused > 50
    assert_clean(engine)


# -- through HTTP ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    config = {"server": {"placement": "inprocess"},  # tests reach into its engine
              "models": {"tiny": {**tiny_config(n_ctx=512, parallel=4, prompt_chunk=32),
                                  "default_max_tokens": 16}}}
    live = LiveServer(config, tmp_path_factory.mktemp("batch")).start()
    yield live
    live.stop()


def server_engine(server: LiveServer) -> LlamaBatchEngine:
    backend = server.app.state.pool.clients["tiny"].backend
    engine = backend.batch_engine()
    assert isinstance(engine, LlamaBatchEngine)
    return engine


def test_http_context_limit_is_a_clear_400(server: LiveServer) -> None:
    response = server.client.post("/v1/completions", json={
        "model": "tiny", "prompt": "hello", "max_tokens": 600})
    assert_error(response, 400, "context_length_exceeded",
                 ("512 tokens per sequence", "4 sequences run in parallel"))
    card = server.client.get("/v1/models/tiny").json()
    assert card["context_length"] == 512


def test_http_openai_penalties_change_the_completion(server: LiveServer) -> None:
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 24, "temperature": 0}
    texts = []
    for extra in ({}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                  {"repeat_penalty": 1.5}):
        response = server.client.post("/v1/completions", json={**body, **extra})
        assert response.status_code == 200, response.text
        texts.append(response.json()["choices"][0]["text"])
    assert all(text != texts[0] for text in texts[1:])


def test_http_concurrent_streams_and_cancellations_free_every_slot(server: LiveServer) -> None:
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 24, "temperature": 0}
    expected = server.client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    results: list[str] = []

    def full() -> None:
        results.append(httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
                       .json()["choices"][0]["text"])

    def cancelled() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                          json={**body, "stream": True, "max_tokens": 200}) as response:
            next(parse_sse(response.iter_lines()))

    threads = [threading.Thread(target=fn) for fn in [full, cancelled] * 5]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == [expected] * 5
    wait_for(lambda: server.model_stats("tiny")["running"] == 0, what="idle engine")
    stats = server.model_stats("tiny")
    assert stats["cancelled"] >= 5 and stats["queued"] == 0
    assert_clean(server_engine(server))


def test_http_mixed_lengths_together_match_alone(server: LiveServer) -> None:
    """Requests of different lengths end out of order (the engine may move sequences to
    close the gaps): each text is the one it gets alone."""
    bodies = [{"model": "tiny", "prompt": p, "max_tokens": n, "temperature": 0}
              for p, n in zip(PROMPTS[:4], (3, 30, 6, 24), strict=True)]
    expected = [server.client.post("/v1/completions", json=b).json()["choices"][0]["text"]
                for b in bodies]
    results: dict[int, str] = {}

    def complete(i: int) -> None:
        results[i] = httpx.post(f"{server.url}/v1/completions", json=bodies[i],
                                timeout=120).json()["choices"][0]["text"]

    threads = [threading.Thread(target=complete, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [results[i] for i in range(4)] == expected
    wait_for(lambda: server.model_stats("tiny")["running"] == 0, what="idle engine")
    assert_clean(server_engine(server))


def test_http_embeddings_arriving_together_match_alone(server: LiveServer) -> None:
    texts = [f"text number {i}" for i in range(6)]
    alone_vectors = [server.client.post("/v1/embeddings", json={
        "model": "tiny", "input": t}).json()["data"][0]["embedding"] for t in texts]
    together: dict[int, list[float]] = {}

    def embed(i: int) -> None:
        together[i] = httpx.post(f"{server.url}/v1/embeddings", timeout=120, json={
            "model": "tiny", "input": texts[i]}).json()["data"][0]["embedding"]

    threads = [threading.Thread(target=embed, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for i, vector in enumerate(alone_vectors):
        assert together[i] == pytest.approx(vector, abs=1e-4)


def test_a_long_prompt_is_fed_in_capped_chunks_while_others_stream(
        engine: LlamaBatchEngine) -> None:
    """Among seven streams, a new prompt gets its share of the batch (one of eight
    sequences), at least prompt_chunk tokens a step; every stream gets its token each step."""
    for key in range(7):
        engine.admit(key, GenerationRequest(prompt=f"hello {key}", params=GenerationParams(
            temperature=0, max_tokens=60)))
    engine.step()
    long_prompt = GenerationRequest(prompt="one two three four five six seven " * 30,
                                    params=GenerationParams(temperature=0, max_tokens=2))
    prompt_tokens = engine.admit(7, long_prompt).prompt_tokens
    budget = max(engine.prompt_chunk, engine._batch_size // 8)
    assert engine._prompt_budget(engine._running) == budget
    assert prompt_tokens is not None and prompt_tokens > 3 * budget
    steps = 0
    while True:
        produced = engine.step()
        steps += 1
        assert {key for key, _ in produced} >= set(range(7))  # every stream got its token
        if any(key == 7 and isinstance(c, Chunk) and c.text for key, c in produced):
            break
    assert steps >= prompt_tokens // budget
    for key in range(8):
        engine.cancel(key)
    assert_clean(engine)


def test_a_burst_of_prompts_behind_one_stream_gets_most_of_the_batch(
        engine: LlamaBatchEngine) -> None:
    engine.admit(0, GenerationRequest(prompt="hello", params=GenerationParams(
        temperature=0, max_tokens=60)))
    engine.step()
    for key in range(1, 8):
        engine.admit(key, GenerationRequest(prompt=f"prompt {key} " * 30, params=GREEDY))
    assert engine._prompt_budget(engine._running) == engine._batch_size * 7 // 8
    for key in range(8):
        engine.cancel(key)
    assert_clean(engine)


def test_a_long_prompt_alone_is_fed_in_one_step(engine: LlamaBatchEngine) -> None:
    """With nothing generating, the prompt_chunk cap (which protects running streams) does
    not apply: the whole prompt is decoded at once and its first token comes out."""
    long_prompt = GenerationRequest(prompt="one two three four five six seven " * 8,
                                    params=GenerationParams(temperature=0, max_tokens=2))
    prompt_tokens = engine.admit(0, long_prompt).prompt_tokens
    assert prompt_tokens is not None and prompt_tokens > 3 * engine.prompt_chunk
    produced = engine.step()
    assert [c.text != "" for key, c in produced if isinstance(c, Chunk)] == [True]
    while engine.active():
        engine.step()
    assert_clean(engine)


def test_http_an_overlong_embedding_fails_alone_among_coalesced_ones(server: LiveServer) -> None:
    inputs = ["fine one", "hello " * 700, "fine two", "fine three"]
    answers: dict[int, httpx.Response] = {}

    def embed(i: int) -> None:
        answers[i] = httpx.post(f"{server.url}/v1/embeddings", timeout=120,
                                json={"model": "tiny", "input": inputs[i]})

    threads = [threading.Thread(target=embed, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert_error(answers[1], 400, "context_length_exceeded")
    assert all(answers[i].status_code == 200 for i in (0, 2, 3))
