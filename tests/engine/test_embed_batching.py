"""Embedding requests queued together are embedded in one backend call, on the serial loop and
on the batch loop; each keeps its own answer and its own error; the queue is bounded by texts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from backends.base import Backend, BatchEngine, Chunk, GenerationRequest, ModelSpec
from backends.errors import ContextLengthExceeded, LLMAPIError
from engine.batching import EMBED_BATCH
from engine.errors import Overloaded
from engine.jobs import END, Job
from engine.scheduler import SERIAL_EMBED_TEXTS, ModelScheduler
from tests.conftest import wait_for

TOO_LONG = "a text longer than the context"


class Collect:
    """A sink keeping every job's items."""

    def __init__(self) -> None:
        self.items: dict[str, list[Any]] = {}
        self.lock = threading.Lock()

    def deliver(self, items: list[tuple[Job, Any]]) -> None:
        with self.lock:
            for job, item in items:
                self.items.setdefault(job.id, []).append(item)

    def ended(self, job: Job) -> bool:
        with self.lock:
            got = self.items.get(job.id, [])
            return bool(got) and (got[-1] is END or isinstance(got[-1], Exception))


class EmbedBackend(Backend):
    """Vectors [len(text), i-th text of its call]; a gate holds the first call, so that the
    jobs submitted meanwhile queue up together."""

    def __init__(self, batch: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batch = batch
        self.seconds = 0.0  # each call takes this long

    @classmethod
    def load(cls, spec: ModelSpec) -> Backend:
        raise NotImplementedError

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        yield Chunk(text="x", finish_reason="stop")

    def embed(self, texts: list[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        self.entered.set()
        self.gate.wait(10)
        time.sleep(self.seconds)
        for i, text in enumerate(texts):
            if text == TOO_LONG:
                raise ContextLengthExceeded(prompt_tokens=99, max_tokens=0, context_length=8,
                                            param=f"text[{i}]" if len(texts) > 1 else "text")
        return [[float(len(text)), float(i)] for i, text in enumerate(texts)]

    def batch_engine(self) -> BatchEngine | None:
        return IdleEngine() if self.batch else None


class IdleEngine(BatchEngine):
    max_sequences = 2

    def admit(self, key: int, request: GenerationRequest) -> Chunk:
        raise NotImplementedError

    def step(self) -> list[tuple[int, Chunk | LLMAPIError]]:
        return []

    def active(self) -> int:
        return 0

    def cancel(self, key: int) -> None:
        pass


@pytest.fixture(params=["serial", "batch"])
def backend(request: pytest.FixtureRequest) -> EmbedBackend:
    return EmbedBackend(batch=request.param == "batch")


def started(backend: EmbedBackend, max_queue: int = 16) -> ModelScheduler:
    scheduler = ModelScheduler("m", lambda: backend, max_queue=max_queue)
    scheduler.start()
    assert scheduler.loaded.wait(10) and scheduler.state == "ready"
    return scheduler


def job(sink: Collect, *texts: str) -> Job:
    return Job(sink=sink, deadline=time.monotonic() + 60, texts=list(texts))


def submit_while_busy(scheduler: ModelScheduler, backend: EmbedBackend, sink: Collect,
                      jobs: list[Job]) -> None:
    """A first job holds the engine; `jobs` queue behind it, then all run."""
    first = job(sink, "first")
    scheduler.submit(first)
    assert backend.entered.wait(10)
    for one in jobs:
        scheduler.submit(one)
    backend.gate.set()
    wait_for(lambda: all(sink.ended(j) for j in [first, *jobs]), what="every job's answer")


def test_queued_requests_are_embedded_in_one_call(backend: EmbedBackend) -> None:
    scheduler, sink = started(backend), Collect()
    jobs = [job(sink, "a"), job(sink, "bb", "ccc"), job(sink, "dddd")]
    try:
        submit_while_busy(scheduler, backend, sink, jobs)
    finally:
        scheduler.stop()
    assert backend.calls == [["first"], ["a", "bb", "ccc", "dddd"]]
    assert sink.items[jobs[0].id] == [[[1.0, 0.0]], END]
    assert sink.items[jobs[1].id] == [[[2.0, 1.0], [3.0, 2.0]], END]
    assert sink.items[jobs[2].id] == [[[4.0, 3.0]], END]
    stats = scheduler.stats
    assert (stats.completed, stats.failed, stats.queued, stats.running) == (4, 0, 0, 0)
    assert (scheduler._embed_jobs, scheduler._embed_texts_waiting) == (0, 0)


def test_a_bad_text_fails_only_its_own_request(backend: EmbedBackend) -> None:
    scheduler, sink = started(backend), Collect()
    jobs = [job(sink, "a"), job(sink, "b"), job(sink, "c", TOO_LONG), job(sink, "d"),
            job(sink, "e")]
    try:
        submit_while_busy(scheduler, backend, sink, jobs)
    finally:
        scheduler.stop()
    bad = sink.items[jobs[2].id]
    assert len(bad) == 1 and isinstance(bad[0], ContextLengthExceeded)
    assert bad[0].param == "text[1]"  # its own index, not the batch's
    for one, text in zip([jobs[0], jobs[1], jobs[3], jobs[4]], "abde", strict=True):
        assert sink.items[one.id][-1] is END and sink.items[one.id][0][0][0] == len(text)
    # the group failed once, then its halves: the bad request alone, the others together
    assert len(backend.calls) <= 2 + 2 * 3
    assert ["c", TOO_LONG] in backend.calls and ["d", "e"] in backend.calls
    assert (scheduler.stats.completed, scheduler.stats.failed) == (5, 1)


def test_a_group_is_bounded_in_texts(backend: EmbedBackend) -> None:
    scheduler, sink = started(backend, max_queue=100), Collect()
    per_call = EMBED_BATCH if backend.batch else SERIAL_EMBED_TEXTS
    jobs = [job(sink, *["t"] * 10) for _ in range(per_call // 10 + 5)]
    try:
        submit_while_busy(scheduler, backend, sink, jobs)
    finally:
        scheduler.stop()
    sizes = [len(call) for call in backend.calls[1:]]
    assert sum(sizes) == 10 * len(jobs) and len(sizes) >= 2
    assert max(sizes) <= per_call + (0 if backend.batch else 10)


def test_the_queue_bound_counts_texts(backend: EmbedBackend) -> None:
    scheduler, sink = started(backend, max_queue=1), Collect()
    bound = (1 + scheduler.capacity) * EMBED_BATCH
    assert scheduler.max_embed_texts == bound
    first = job(sink, "first")
    scheduler.submit(first)
    assert backend.entered.wait(10)
    try:
        waiting = [job(sink, "x") for _ in range(bound)]  # many more requests than max_queue
        for one in waiting:
            scheduler.submit(one)
        with pytest.raises(Overloaded, match=f"bound of {bound}") as refused:
            scheduler.submit(job(sink, "one too many"))
        assert refused.value.retry_after >= 1
        # generations have their own bound: waiting embeddings do not count against it
        scheduler.submit(Job(sink=sink, deadline=time.monotonic() + 60,
                             request=GenerationRequest(prompt="hi")))
    finally:
        backend.gate.set()
    wait_for(lambda: all(sink.ended(j) for j in [first, *waiting]), what="the answers")
    # nothing waits: one request is taken whatever its size
    big = job(sink, *["y"] * (bound + 1))
    scheduler.submit(big)
    wait_for(lambda: sink.ended(big), what="the big request")
    scheduler.stop()
    assert sink.items[big.id][-1] is END
    assert (scheduler._embed_jobs, scheduler._embed_texts_waiting) == (0, 0)


def test_cancelled_requests_release_their_texts(backend: EmbedBackend) -> None:
    scheduler, sink = started(backend), Collect()
    first = job(sink, "first")
    scheduler.submit(first)
    assert backend.entered.wait(10)
    gone = job(sink, "a", "b")
    scheduler.submit(gone)
    assert scheduler._embed_texts_waiting == 2
    gone.cancel()
    backend.gate.set()
    wait_for(lambda: sink.ended(gone) and sink.ended(first), what="the answers")
    scheduler.stop()
    assert (scheduler._embed_jobs, scheduler._embed_texts_waiting) == (0, 0)
    assert scheduler.stats.cancelled == 1 and backend.calls == [["first"]]


def test_a_busy_stream_of_requests_is_waited_for_briefly(backend: EmbedBackend) -> None:
    """After a call of 4 texts, one request arriving alone waits (part of that call's time)
    for the 3 that follow it: they are embedded together."""
    scheduler, sink = started(backend), Collect()
    first = [job(sink, "a"), job(sink, "b"), job(sink, "c"), job(sink, "d")]
    backend.seconds = 1.5  # each call takes 1.5 s: after the call of 4, one may wait 0.75 s
    submit_while_busy(scheduler, backend, sink, first)
    backend.seconds = 0.0
    assert backend.calls[-1] == ["a", "b", "c", "d"]
    later = [job(sink, "e")]
    scheduler.submit(later[0])
    time.sleep(0.1)
    later += [job(sink, "f"), job(sink, "g"), job(sink, "h")]
    for one in later[1:]:
        scheduler.submit(one)
    wait_for(lambda: all(sink.ended(j) for j in later), what="the later four")
    scheduler.stop()
    assert backend.calls[-1] == ["e", "f", "g", "h"]
