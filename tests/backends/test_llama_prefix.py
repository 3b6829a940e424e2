"""Shared prefixes in the llama batching engine (tiny GGUF): a prefix that several sequences
share is computed once and copied, and a copy gives exactly the tokens a recompute gives."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import pytest

from backends.base import Chunk, GenerationParams, GenerationRequest, ModelSpec
from backends.llama import LlamaBackend, LlamaParams
from backends.llama_batch import REUSE_MIN, LlamaBatchEngine
from tests.conftest import TINY_GGUF

GREEDY = GenerationParams(temperature=0, max_tokens=10)
#: A context of the kind many requests share (a RAG passage, an assistant's instructions).
CONTEXT = (
    "You are the support assistant of a small bicycle shop in Lyon. Answer in two sentences "
    "at most, be friendly, and never invent prices. The shop opens at nine and closes at "
    "seven, except on Sundays. Repairs take two days; tubeless conversions take three. "
    "Customers may rent city bikes by the day, with a helmet and a lock included. "
    "Documents: « Le vélo électrique — guide d'entretien », ✓ updated 2026-11-30.\n")
QUESTIONS = ["When do you open?", "How long is a repair?", "Can I rent a bike?",
             "Do you sell helmets?", "Are you open on Sunday?", "What is tubeless?",
             "Is a lock included?", "Qui êtes-vous ?"]


#: Prompts are fed in steps of a few rows (n_batch 1, prompt_chunk 1: up to 1 + parallel
#: tokens a step), so every prompt token goes through the same small-batch kernels whether
#: it was computed by its own sequence or copied from another. llama.cpp's kernels for larger
#: batches round differently (this random-weight model's logits then move by ~0.35, enough to
#: flip its many near-ties), which would compare chunk sizes, not sharing.
@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaBatchEngine]:
    backend = LlamaBackend.load(ModelSpec(name="tiny", path=TINY_GGUF, params=LlamaParams(
        n_ctx=512, n_threads=2, parallel=8, prompt_chunk=1, n_batch=1)))
    assert isinstance(backend, LlamaBackend)
    engine = backend.batch_engine()
    assert isinstance(engine, LlamaBatchEngine)
    yield engine
    backend.close()


@pytest.fixture
def fresh(engine: LlamaBatchEngine) -> Iterator[LlamaBatchEngine]:
    """The engine with nothing cached and sharing on; checked clean afterwards."""
    engine.clear_cache()
    engine.share_prefixes = True
    yield engine
    assert engine.active() == 0
    assert all(pos_max == last for pos_max, last in engine.kv_positions())


def drive(engine: LlamaBatchEngine, admit: dict[int, GenerationRequest],
          cancel: dict[int, int] | None = None) -> dict[int, tuple[str, Chunk | None]]:
    """Admit `admit` (key -> request) and step until all retire; `cancel[key] = n` cancels
    that sequence at step n. Returns key -> (text, final chunk or None when cancelled)."""
    cancel = cancel or {}
    out: dict[int, tuple[str, Chunk | None]] = collections.defaultdict(lambda: ("", None))
    for key, request in admit.items():
        engine.admit(key, request)
        out[key] = ("", None)
    steps = 0
    while engine.active():
        steps += 1
        for key, at in cancel.items():
            if at == steps:
                engine.cancel(key)
        for key, chunk in engine.step():
            assert isinstance(chunk, Chunk)
            text, _ = out[key]
            out[key] = (text + chunk.text, chunk if chunk.finish_reason else None)
    return out


def requests(texts: list[str], params: GenerationParams = GREEDY) -> dict[int, GenerationRequest]:
    return {key: GenerationRequest(prompt=text, params=params) for key, text in enumerate(texts)}


def texts_of(results: dict[int, tuple[str, Chunk | None]]) -> list[str]:
    return [results[key][0] for key in sorted(results)]


def test_eight_arrivals_with_one_context_compute_it_once_and_answer_as_without_sharing(
        fresh: LlamaBatchEngine) -> None:
    engine = fresh
    prompts = [CONTEXT + q for q in QUESTIONS]
    context_tokens = len(engine._backend.tokenize(CONTEXT))
    assert context_tokens > 4 * REUSE_MIN
    before = engine.computed_tokens, engine.copies
    shared = drive(engine, requests(prompts))
    computed = engine.computed_tokens - before[0]
    assert engine.copies - before[1] == 7  # the first computes, seven copy
    full = sum(len(engine._backend.tokenize(p)) for p in prompts)
    assert computed <= full - 7 * (context_tokens - 4)  # each copy saved (nearly) the context
    for _, final in shared.values():
        assert final is not None and final.prompt_tokens
    cached = sorted(final.cached_tokens or 0 for _, final in shared.values() if final)
    assert cached[0] == 0 and cached[1] >= context_tokens - 4

    engine.clear_cache()
    engine.share_prefixes = False
    before = engine.computed_tokens, engine.copies
    alone = drive(engine, requests(prompts))
    assert engine.copies == before[1] and engine.computed_tokens - before[0] == full
    assert texts_of(shared) == texts_of(alone)
    assert len(set(texts_of(alone))) > 1


def test_a_request_arriving_while_another_streams_copies_its_cells_at_once(
        fresh: LlamaBatchEngine) -> None:
    engine = fresh
    first, second = CONTEXT + QUESTIONS[0], CONTEXT + QUESTIONS[1]
    long = GenerationParams(temperature=0, max_tokens=30)
    engine.share_prefixes = False
    expected = drive(engine, {0: GenerationRequest(prompt=second, params=GREEDY)})[0][0]
    engine.clear_cache()
    engine.share_prefixes = True
    engine.admit(0, GenerationRequest(prompt=first, params=long))
    while not (seq := engine._by_key[0].seq) or not seq.count:
        engine.step()  # until the first one streams
    copies = engine.copies
    engine.admit(1, GenerationRequest(prompt=second, params=GREEDY))
    assert engine.copies == copies + 1 and engine._by_key[1].seq is not None
    assert engine._by_key[1].seq.donor is None  # nothing to wait for
    text, final = "", None
    while engine.active():
        for key, chunk in engine.step():
            assert isinstance(chunk, Chunk)
            if key == 1:
                text += chunk.text
                final = chunk if chunk.finish_reason else final
    assert text == expected
    context = len(engine._backend.tokenize(CONTEXT))
    assert final is not None and final.prompt_tokens
    assert context - 4 <= (final.cached_tokens or 0) < final.prompt_tokens


def test_waiting_sequences_compute_for_themselves_when_their_donor_is_cancelled(
        fresh: LlamaBatchEngine) -> None:
    """While another stream generates, prompts are fed a token a step, so the second and
    third requests wait many steps for the first one's context; it is cancelled midway."""
    engine = fresh
    prompts = [CONTEXT + q for q in QUESTIONS[:3]]
    engine.share_prefixes = False
    expected = texts_of(drive(engine, requests(prompts)))
    engine.clear_cache()
    engine.share_prefixes = True
    streaming = GenerationRequest(prompt="hello", params=GenerationParams(temperature=0,
                                                                          max_tokens=60))
    engine.admit(9, streaming)
    engine.step()  # generating now: prompts are fed prompt_chunk tokens a step
    waits: list[int] = []  # per step: how many of the second and third wait for a donor

    def waiting() -> None:
        slots = [engine._by_key.get(key) for key in (1, 2)]
        waits.append(sum(1 for s in slots if s and s.seq and s.seq.donor is not None))

    engine.before_decode = waiting  # type: ignore[method-assign]
    try:
        results = drive(engine, requests(prompts), cancel={0: 3})
    finally:
        del engine.before_decode
    # both wait for the first; once it is cancelled, one computes and the other waits for it
    assert waits[:3] == [2, 2, 1]
    assert [results[1][0], results[2][0]] == expected[1:]
    assert results[0][1] is None  # cancelled


def test_a_prefix_shorter_than_reuse_min_is_computed_not_copied(fresh: LlamaBatchEngine) -> None:
    engine = fresh
    copies = engine.copies
    drive(engine, requests(["short shared start, then one", "short shared start, then two"]))
    assert engine.copies == copies


def test_a_finished_requests_cells_serve_the_next_request_with_that_context(
        fresh: LlamaBatchEngine) -> None:
    engine = fresh
    drive(engine, requests([CONTEXT + QUESTIONS[0]]))
    holder = next(slot for slot in engine.slots if slot.cached)
    engine.admit(20, GenerationRequest(prompt="unrelated " * 3, params=GenerationParams(
        temperature=0, max_tokens=40)))
    assert engine._by_key[20] is not holder  # the least recently used slot
    while not (seq := engine._by_key[20].seq) or not seq.count:
        engine.step()  # until it streams
    computed = engine.computed_tokens
    request = GenerationRequest(prompt=CONTEXT + QUESTIONS[1], params=GREEDY)
    engine.admit(21, request)
    placed = engine._by_key[21]
    assert placed is holder  # takes the cached slot itself: nothing to copy
    while engine.active():
        engine.step()
    context = len(engine._backend.tokenize(CONTEXT))
    prompt = len(engine._backend.tokenize(request.prompt or ""))
    assert engine.computed_tokens - computed <= prompt - context + 4


def test_cells_are_shared_only_within_one_cache_scope(fresh: LlamaBatchEngine) -> None:
    engine = fresh
    prompt = CONTEXT + QUESTIONS[0]
    long = GenerationParams(temperature=0, max_tokens=40)
    engine.admit(0, GenerationRequest(prompt=prompt, params=long, cache_scope="key:1"))
    while not (seq := engine._by_key[0].seq) or not seq.count:
        engine.step()
    copies, reused = engine.copies, engine.reused_tokens
    engine.admit(1, GenerationRequest(prompt=prompt, params=GREEDY, cache_scope="key:2"))
    engine.admit(2, GenerationRequest(prompt=prompt, params=GREEDY))  # no scope: auth off
    assert (engine.copies, engine.reused_tokens) == (copies, reused)
    assert all(engine._by_key[k].seq.donor is None for k in (1, 2))  # type: ignore[union-attr]
    engine.admit(3, GenerationRequest(prompt=prompt, params=GREEDY, cache_scope="key:1"))
    assert engine.copies == copies + 1
    while engine.active():
        engine.step()
