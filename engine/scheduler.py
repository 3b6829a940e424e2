"""Per-model scheduling: one engine thread, a bounded queue, cancellation.

The engine (llama.cpp, transformers, ...) is blocking and usually not thread-safe, so every
call into a model's backend happens on that model's engine thread. Jobs are submitted from
any thread; the engine thread runs them and emits their items to the jobs' sinks. A cancel
flag set anywhere is checked before every item: a queued job is dropped, a running one
stops at its next token.

Tokenizing, detokenizing and chat templating run on the model's one tokenizer thread instead
(`submit_call`), when the backend allows it: a long prompt being tokenized never holds up
the streams being decoded, and tokenizing takes at most one core per model.

When the backend offers a `BatchEngine`, the engine thread runs `engine.batching.BatchLoop`
instead of the serial loop: generations are decoded together, and `running` counts
sequences. Either loop embeds the /embeddings requests that are queued together in one
backend call (the backend batches their texts): many one-text requests cost about what one
request with all their texts costs.

The queue bound: generations and calls count as requests (`max_queue` may wait beyond what
runs). Embedding requests are bounded by texts instead, since one request may hold one text
or hundreds: `(max_queue + capacity) x EMBED_BATCH` texts may wait (1,088 at the defaults, 17 x
64), each text at most the model's context long; a request that would pass that gets the same
503 (Overloaded) unless no embedding is waiting (one request is always taken, whatever its
size: `server.max_embedding_inputs` bounds it). Waiting embeddings do not count against the
generations' bound, nor generations against theirs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from backends.base import Backend, BatchEngine, Chunk
from backends.errors import LLMAPIError, ModelLoadError
from engine.batching import (
    EMBED_BATCH,
    EMBED_WAIT_MAX,
    EMBED_WAIT_SHARE,
    BatchLoop,
    embed_together,
)
from engine.errors import ClientDisconnected, ModelNotReady, Overloaded, as_domain_error
from engine.jobs import END, Job
from engine.logctx import about, log_outcome

log = logging.getLogger(__name__)

#: Texts the serial loop embeds in one backend call at most, across queued requests (it has no
#: generations to hold up; the backend splits them into forward passes of its own size).
SERIAL_EMBED_TEXTS = 4 * EMBED_BATCH
# The serial loop waits for more embedding requests as the batch loop does: see
# engine.batching.EMBED_WAIT_SHARE.


@dataclass
class SchedulerStats:
    queued: int = 0
    running: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens_generated: int = 0
    busy_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), e.g. a worker's once its model is loaded."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _yield_cpu() -> None:
    """Lower the calling thread's priority (a tokenizer thread): when the CPU is short, the
    engine's decode threads get it first, and tokenizing waits."""
    with contextlib.suppress(AttributeError, OSError):  # Linux sets a nice value per thread
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class ModelScheduler:
    """Owns one model's backend and the single thread that may touch it."""

    def __init__(self, name: str, loader: Callable[[], Backend], *, max_queue: int,
                 on_state: Callable[[ModelScheduler], None] | None = None) -> None:
        self.name = name
        self.max_queue = max_queue
        self.state = "loading"
        self.error: str | None = None
        self.stats = SchedulerStats()
        self.load: dict[str, Any] = {}  # how the load went (engine.client.ModelInfo.load)
        self.backend: Backend | None = None
        self._loader = loader
        self._on_state = on_state
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self.capacity = 1  # sequences running at once (the batch engine's max_sequences)
        self._current: Job | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        # Embedding requests in the queue (their texts) and queued or running (jobs); see
        # the module's docstring for the bound. Changed under `_lock`.
        self._embed_texts_waiting = 0
        self._embed_jobs = 0
        self._last_embed = (0, 0.0)  # the serial loop's last call: texts, seconds
        self.loaded = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"engine-{name}", daemon=True)
        # One worker: requests tokenize one after another, on at most one core per model.
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tokenize-{name}",
                                             initializer=_yield_cpu)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the running job, fail the queued ones, release the engine."""
        self._stopping.set()
        if (current := self._current) is not None:
            current.cancel()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _set_state(self, state: str, error: str | None = None) -> None:
        self.state, self.error = state, error
        if self._on_state is not None:
            self._on_state(self)

    def _main(self) -> None:
        started = time.monotonic()
        try:
            backend, engine = self._load()
        except Exception as exc:  # noqa: BLE001 - reported through state and the log
            if not isinstance(exc, ModelLoadError):
                log.exception("model %s failed to load", self.name)
            self._set_state("failed", exc.message if isinstance(exc, LLMAPIError) else
                            f"loading failed ({type(exc).__name__}); see the server log")
            self.loaded.set()
            self._drain("the model failed to load")
            return
        self.backend = backend
        self.capacity = engine.max_sequences if engine is not None else 1
        self.load = {"load_seconds": round(time.monotonic() - started, 3),
                     "memory_bytes": resident_bytes(), "parallel": self.capacity}
        self._set_state("ready")
        self.loaded.set()
        log.info("model %s is ready", self.name)
        try:
            if engine is None:
                self._serve_jobs(backend)
            else:
                BatchLoop(self, backend, engine).run()
        finally:
            self._set_state("stopped")
            self._drain("the server is shutting down")
            # A tokenization still running reads the engine's vocabulary: let it end first.
            self._tokenizer.shutdown(wait=True, cancel_futures=True)
            backend.close()

    def _load(self) -> tuple[Backend, BatchEngine | None]:
        """The backend and its batching engine (None: serve it serially), both ready."""
        backend = self._loader()
        try:
            return backend, backend.batch_engine()
        except BaseException:
            backend.close()
            raise

    def _drain(self, why: str) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.emit(ModelNotReady(f"Model '{self.name}' is unavailable: {why}."))

    # -- the engine loop -------------------------------------------------------------------

    def _serve_jobs(self, backend: Backend) -> None:
        held: list[Job | None] = []  # taken from the queue while gathering embeddings
        while True:
            job = held.pop() if held else self._jobs.get()
            if job is None:
                return
            if job.texts is None:
                self._serve_one(job, backend)
                continue
            group = [job]
            held += self._gather_embeds(group)
            started = time.monotonic()
            self._serve_embeds(group, backend)
            self._last_embed = (sum(len(j.texts or ()) for j in group),
                                time.monotonic() - started)

    def _gather_embeds(self, group: list[Job]) -> list[Job | None]:
        """Add queued embedding jobs to `group` (up to SERIAL_EMBED_TEXTS texts), waiting a
        little for more while the last call held more texts than this one would (see
        EMBED_WAIT_SHARE); returns the job that ended the gathering (not an embedding, or
        None to stop), if any."""
        texts = sum(len(j.texts or ()) for j in group)
        last_texts, last_seconds = self._last_embed
        want = min(SERIAL_EMBED_TEXTS, last_texts)
        deadline = time.monotonic() + min(EMBED_WAIT_MAX, EMBED_WAIT_SHARE * last_seconds)
        while texts < SERIAL_EMBED_TEXTS:
            wait = deadline - time.monotonic() if texts < want else 0.0
            try:
                more = self._jobs.get(timeout=wait) if wait > 0 else self._jobs.get_nowait()
            except queue.Empty:
                break
            if more is None or more.texts is None:
                return [more]  # served next, in its turn
            group.append(more)
            texts += len(more.texts)
        return []

    def _dequeue(self, job: Job) -> bool:
        """Count a job out of the queue (under `_lock`); False (and answered) when it was
        cancelled or the model is stopping."""
        self.stats.queued -= 1
        if job.texts is not None:
            self._embed_texts_waiting -= len(job.texts)
        if job.cancelled.is_set() or self._stopping.is_set():
            self.stats.cancelled += 1
            if job.texts is not None:
                self._embed_jobs -= 1
            job.emit(ModelNotReady(f"Model '{self.name}' is shutting down."))
            return False
        self.stats.running += 1
        return True

    def _serve_one(self, job: Job, backend: Backend) -> None:
        with self._lock:
            if not self._dequeue(job):
                return
            self._current = job
        started = time.monotonic()
        outcome = self.run(job, backend)
        with self._lock:
            self._current = None
            self.count(job, outcome, started)

    def _serve_embeds(self, group: list[Job], backend: Backend) -> None:
        with self._lock:
            live = [job for job in group if self._dequeue(job)]
        if live:
            embed_together(self, backend, live, self._count)

    def _count(self, job: Job, outcome: str, started: float) -> None:
        with self._lock:
            self.count(job, outcome, started)

    def count(self, job: Job, outcome: str, started: float) -> None:
        """A job ran (under `_lock`): requests are counted by outcome; a call (tokenizing
        on the engine thread, for a backend that must) only as busy time."""
        self.stats.running -= 1
        self.stats.busy_seconds += time.monotonic() - started
        if job.texts is not None:
            self._embed_jobs -= 1
        log_outcome(job, outcome, started)
        if job.request is not None or job.texts is not None:
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)

    def run(self, job: Job, backend: Backend) -> str:
        """Run a job's work to its end on this thread; its outcome's stats name."""
        with about(job.request_id):
            return self._run(job, backend)

    def _run(self, job: Job, backend: Backend) -> str:
        items: Iterator[Any] = iter(())
        try:
            items = work_of(job)(backend)  # in the try: a backend may fail before its first item
            for item in items:
                if job.cancelled.is_set():
                    job.emit(ClientDisconnected("The request was cancelled."))
                    return "cancelled"
                if isinstance(item, Chunk) and item.finish_reason is None \
                        and item.prompt_tokens is None:
                    self.stats.tokens_generated += 1
                job.emit(item)
            job.emit(END)
            return "completed"
        except Exception as exc:  # noqa: BLE001 - becomes the client's error
            job.emit(as_domain_error(exc))
            return "failed"
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    # -- the request side (any thread) -----------------------------------------------------

    def check_ready(self) -> Backend:
        if self.state != "ready" or self.backend is None:
            if self.state == "loading":
                raise ModelNotReady(f"Model '{self.name}' is still loading; retry shortly.")
            raise ModelNotReady(f"Model '{self.name}' is not available ({self.state}).")
        return self.backend

    def submit(self, job: Job) -> None:
        """Queue a job for the engine thread; Overloaded when the queue is full (for an
        embedding, when its texts would pass the texts' bound: see the module's docstring)."""
        self.check_ready()
        with self._lock:
            if job.texts is not None:
                self._admit_embedding(len(job.texts))
            elif self.stats.queued + self.stats.running - self._embed_jobs \
                    > self.max_queue + self.capacity - 1:
                raise Overloaded(
                    f"Model '{self.name}' is busy: {self.stats.running} requests are running "
                    f"and {self.stats.queued} waiting; it takes {self.capacity} at once plus "
                    f"max_queue={self.max_queue} waiting. Retry later.", self.retry_after())
            self.stats.queued += 1
        self._jobs.put(job)

    @property
    def max_embed_texts(self) -> int:
        """Texts of embedding requests that may wait at once."""
        return (self.max_queue + self.capacity) * EMBED_BATCH

    def _admit_embedding(self, texts: int) -> None:
        """Count an embedding request's texts in (under `_lock`), or refuse it."""
        waiting, bound = self._embed_texts_waiting, self.max_embed_texts
        if waiting and waiting + texts > bound:
            raise Overloaded(
                f"Model '{self.name}' is busy: embedding requests with {waiting} texts are "
                f"waiting, {texts} more would pass its bound of {bound} ((max_queue="
                f"{self.max_queue} + {self.capacity}) x {EMBED_BATCH} texts). Retry later.",
                self.retry_after())
        self._embed_texts_waiting += texts
        self._embed_jobs += 1

    def has_room(self) -> bool:
        """True when a generation submitted now would start without waiting."""
        with self._lock:
            return self.stats.queued + self.stats.running < self.capacity

    def retry_after(self) -> int:
        done = self.stats.completed + self.stats.failed
        average = self.stats.busy_seconds / done if done else 1.0
        return max(1, min(60, round(average * (self.stats.queued + 1))))

    def submit_call(self, job: Job, fn: Callable[[Backend], Any]) -> None:
        """Run `fn` (tokenizing, detokenizing, templating) on the model's tokenizer thread,
        one call at a time, and emit its result then END; on the engine thread for a backend
        that does not allow that."""
        backend = self.check_ready()
        if not backend.tokenizes_off_engine:
            job.work = lambda b: _once(fn, b)
            self.submit(job)
            return

        def run() -> None:
            if job.cancelled.is_set():  # its reader is gone; the end frees the job's entry
                job.emit(ClientDisconnected("The request was cancelled before it ran."))
                return
            try:
                result = fn(backend)
            except Exception as exc:  # noqa: BLE001 - becomes the client's error
                job.emit(as_domain_error(exc))
                return
            job.emit(result)
            job.emit(END)

        try:
            self._tokenizer.submit(run)
        except RuntimeError:  # shut down: the model is stopping
            raise ModelNotReady(f"Model '{self.name}' is shutting down.") from None


def work_of(job: Job) -> Callable[[Backend], Iterator[Any]]:
    """What the engine thread runs for a job on the serial path."""
    if job.work is not None:
        return job.work
    if job.request is not None:
        request = job.request
        return lambda backend: backend.generate(request)
    texts = job.texts or []
    return lambda backend: _once(backend.embed, texts)


def _once(fn: Callable[..., Any], *args: Any) -> Iterator[Any]:
    """`fn(*args)` as a job's one item, called when the engine thread asks for it."""
    yield fn(*args)
