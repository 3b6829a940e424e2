"""The engine thread's loop for backends that decode many sequences together.

`engine.scheduler.ModelScheduler` runs this instead of its serial loop when the backend offers a
`BatchEngine`. Each turn: take what was queued (generation jobs wait for a free sequence,
other work runs at once, embedding jobs that arrived together go into one bounded
`embed` call), retire cancelled or timed-out sequences, admit waiting generations while
the engine has room, then run one decode step and route its chunks to their jobs.
"""

from __future__ import annotations

import collections
import logging
import queue
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from backends.base import Backend, BatchEngine
from backends.errors import LLMAPIError
from engine.errors import ClientDisconnected, ModelNotReady, RequestTimeout, as_domain_error
from engine.jobs import END, Job, deliver
from engine.logctx import about, log_outcome

if TYPE_CHECKING:
    from engine.scheduler import ModelScheduler

log = logging.getLogger(__name__)

#: Texts embedded together at most, across coalesced /embeddings requests, between two decode
#: steps of the generations this loop runs (an embedding call holds them up).
EMBED_BATCH = 64
#: While embedding requests arrive faster than they are served (the last call held more texts
#: than are queued now) and no generation runs or waits, the loop waits for more, up to this
#: share of the last call's time and at most EMBED_WAIT_MAX seconds: many clients sending one
#: text each then fill one call together instead of trickling into many small ones.
EMBED_WAIT_SHARE = 0.5
EMBED_WAIT_MAX = 1.0


def embed_together(scheduler: ModelScheduler, backend: Backend, group: list[Job],
                   finish: Callable[[Job, str, float], None]) -> None:
    """Embed the jobs' texts in one `backend.embed` call and answer every job at once (one
    delivery). When the call fails the group is halved and each half tried again, down to a
    job run alone: each request gets its own error (its `param` names its own text), and a
    bad request costs the others a few extra calls, not one call each. `finish(job,
    outcome, started)` counts each job's end."""
    started = time.monotonic()
    if len(group) == 1:
        finish(group[0], scheduler.run(group[0], backend), started)
        return
    texts = [text for job in group for text in job.texts or ()]
    try:
        vectors = backend.embed(texts)
    except Exception:  # noqa: BLE001 - retried in halves, each job in the end alone
        half = len(group) // 2
        embed_together(scheduler, backend, group[:half], finish)
        embed_together(scheduler, backend, group[half:], finish)
        return
    items: list[tuple[Job, Any]] = []
    at = 0
    for job in group:
        n = len(job.texts or ())
        items += [(job, vectors[at:at + n]), (job, END)]
        at += n
    deliver(items)
    for job in group:
        finish(job, "completed", started)


class BatchLoop:
    """Drives one model's BatchEngine; every method runs on the engine thread."""

    def __init__(self, scheduler: ModelScheduler, backend: Backend, engine: BatchEngine) -> None:
        self.s = scheduler
        self.backend = backend
        self.engine = engine
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[int, Job] = {}
        self._next_key = 0
        self._outbox: list[tuple[Job, Any]] = []  # what this turn emitted to running jobs
        self._last_embed = (0, 0.0)  # texts and seconds of the last embedding turn
        # An engine that says so hands the outbox over right before its decode (which
        # releases the GIL); the loop then flushes only when nothing runs (it may block next).
        self._deferred = engine.calls_before_decode
        if self._deferred:
            engine.before_decode = self._flush  # type: ignore[method-assign]

    def _emit(self, job: Job, item: Any) -> None:
        self._outbox.append((job, item))

    def _flush(self) -> None:
        """Send the turn's items to their jobs: one wake-up of the event loop per turn."""
        if self._outbox:
            deliver(self._outbox)
            self._outbox = []

    def run(self) -> None:
        try:
            while not self.s._stopping.is_set():
                if not self._take_jobs():
                    break
                self._retire_cancelled()
                self._admit_waiting()
                if not self._deferred:
                    self._flush()  # accepted prompts: their responses start during the step
                if self.running:
                    self._step()
                if not self._deferred or not self.running:
                    self._flush()
        finally:
            self._flush()
            self._shut_down()

    # -- intake ----------------------------------------------------------------------------

    def _take_jobs(self) -> bool:
        """Move queued jobs to `waiting` or run them; False once the scheduler stops."""
        if (self.running or self.waiting) and not self.s._jobs.queue:
            return True  # mid-batch and nothing queued (the common case): no lock, no lists
        idle = not self.running and not self.waiting
        others: list[Job] = []
        while True:
            block = idle and not others
            if not block and not self.s._jobs.queue:
                break  # nothing queued (the common case mid-batch): no lock, no queue.Empty
            try:
                job = self.s._jobs.get(block=block)
            except queue.Empty:
                break
            if job is None:
                return False
            idle = False
            if job.request is not None:
                self.waiting.append(job)
            else:
                others.append(job)
        embeds = [j for j in others if j.texts is not None]
        for job in others:
            if job.texts is None:
                self._run_other(job)
        if embeds:
            self._embed(embeds)
        return True

    def _begin(self, job: Job) -> bool:
        """Count a job out of the queue; False (and answered) when it was cancelled."""
        with self.s._lock:
            self.s.stats.queued -= 1
            if job.texts is not None:
                self.s._embed_texts_waiting -= len(job.texts)
            if job.cancelled.is_set():
                self.s.stats.cancelled += 1
                if job.texts is not None:
                    self.s._embed_jobs -= 1
                job.emit(ClientDisconnected("The request was cancelled before it ran."))
                return False
            self.s.stats.running += 1
            return True

    def _finish(self, job: Job, outcome: str, started: float) -> None:
        log_outcome(job, outcome, started)
        with self.s._lock:
            self.s.stats.running -= 1
            if job.texts is not None:
                self.s._embed_jobs -= 1
            self.s.stats.busy_seconds += time.monotonic() - started
            setattr(self.s.stats, outcome, getattr(self.s.stats, outcome) + 1)

    def _run_other(self, job: Job) -> None:
        if self._begin(job):
            started = time.monotonic()
            self._finish(job, self.s.run(job, self.backend), started)

    def _embed(self, jobs: list[Job]) -> None:
        """Embed jobs together in groups of up to EMBED_BATCH texts (`embed_together`: a
        group that fails is retried in halves, so each request gets its own error)."""
        live = [job for job in jobs if self._begin(job)]
        if not self.running and not self.waiting:
            live += self._gather_embeds(sum(len(job.texts or ()) for job in live))
        started = time.monotonic()
        group: list[Job] = []
        for job in live:
            assert job.texts is not None
            if group and sum(len(j.texts or ()) for j in group) + len(job.texts) > EMBED_BATCH:
                self._embed_group(group)
                group = []
            group.append(job)
        if group:
            self._embed_group(group)
        self._last_embed = (sum(len(job.texts or ()) for job in live),
                            time.monotonic() - started)

    def _gather_embeds(self, texts: int) -> list[Job]:
        """More embedding jobs (begun), waited for while fewer than the last turn's texts
        are at hand (see EMBED_WAIT_SHARE); a generation arriving ends the wait."""
        last_texts, last_seconds = self._last_embed
        want = min(EMBED_BATCH, last_texts)
        deadline = time.monotonic() + min(EMBED_WAIT_MAX, EMBED_WAIT_SHARE * last_seconds)
        more: list[Job] = []
        while texts < want and (wait := deadline - time.monotonic()) > 0:
            try:
                job = self.s._jobs.get(timeout=wait)
            except queue.Empty:
                break
            if job is None:
                self.s._jobs.put(None)  # stopping: the next turn sees it
                break
            if job.request is not None:
                self.waiting.append(job)
                break
            if job.texts is None:
                self._run_other(job)
            elif self._begin(job):
                more.append(job)
                texts += len(job.texts)
        return more

    def _embed_group(self, group: list[Job]) -> None:
        embed_together(self.s, self.backend, group, self._finish)

    # -- sequences -------------------------------------------------------------------------

    def _retire_cancelled(self) -> None:
        now = time.monotonic()
        for key, job in list(self.running.items()):
            if job.cancelled.is_set() or now > job.deadline:
                self.engine.cancel(key)
                del self.running[key]
                why = "was cancelled" if job.cancelled.is_set() else \
                    "took longer than the server's request_timeout and was cancelled"
                error = ClientDisconnected if job.cancelled.is_set() else RequestTimeout
                self._emit(job, error(f"The request {why}."))
                self._finish(job, "cancelled", job.started)

    def _admit_waiting(self) -> None:
        while self.waiting and self.engine.active() < self.engine.max_sequences:
            job = self.waiting.popleft()
            if not self._begin(job):
                continue
            job.started = time.monotonic()
            key, self._next_key = self._next_key, self._next_key + 1
            assert job.request is not None
            try:
                accepted = self.engine.admit(key, job.request)
            except Exception as exc:  # noqa: BLE001 - becomes the client's error
                with about(job.request_id):
                    self._emit(job, as_domain_error(exc))
                self._finish(job, "failed", job.started)
                continue
            self.running[key] = job
            self._emit(job, accepted)

    def _step(self) -> None:
        try:
            produced = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - the whole step failed: fail its sequences
            error = as_domain_error(exc)
            for key, job in list(self.running.items()):
                self.engine.cancel(key)
                self._emit(job, error)
                self._finish(job, "failed", job.started)
            self.running.clear()
            return
        running, outbox, stats = self.running, self._outbox, self.s.stats
        for key, item in produced:
            owner = running.get(key)
            if owner is None:
                continue
            if isinstance(item, LLMAPIError):
                del running[key]
                outbox.append((owner, item))
                self._finish(owner, "failed", owner.started)
                continue
            outbox.append((owner, item))
            if item.finish_reason is not None:
                del running[key]
                outbox.append((owner, END))
                self._finish(owner, "completed", owner.started)
            elif item.prompt_tokens is None:
                stats.tokens_generated += 1

    def _shut_down(self) -> None:
        for key, job in list(self.running.items()):
            self.engine.cancel(key)
            job.emit(ModelNotReady(f"Model '{self.s.name}' is shutting down."))
            self._finish(job, "cancelled", job.started)
        self.running.clear()
        while self.waiting:
            job = self.waiting.popleft()
            with self.s._lock:
                self.s.stats.queued -= 1
            job.emit(ModelNotReady(f"Model '{self.s.name}' is shutting down."))
