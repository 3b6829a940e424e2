"""Per-model scheduling: one engine thread, a bounded queue, cancellation and timeouts.

The engine (llama.cpp, transformers, ...) is blocking and usually not thread-safe, so every
call into a model's backend happens on that model's engine thread. Requests submit *work*
(a function of the backend that yields items); items cross back to the event loop through an
asyncio queue. A disconnect or a timeout sets the job's cancel flag, which the engine thread
checks before every item: a queued job is dropped, a running one stops at its next token.

Tokenizing, detokenizing and chat templating run on the model's one tokenizer thread instead
(`call_tokenizer`), when the backend allows it: a long prompt being tokenized for admission
never holds up the streams being decoded, and tokenizing takes at most one core per model.

Routes reach a scheduler through `generate`, `embed`, `call` and `call_tokenizer` only. When
the backend offers a `BatchEngine`, the engine thread runs `app.batching.BatchLoop` instead of
the serial loop: generations are decoded together, and `running` counts sequences.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.batching import BatchLoop, deliver
from app.errors import (
    ClientDisconnected,
    ModelNotReady,
    Overloaded,
    RequestTimeout,
    as_domain_error,
)
from backends.base import Backend, BatchEngine, Chunk, GenerationRequest
from backends.errors import LLMAPIError, ModelLoadError
from backends.grammar import GrammarLimits

log = logging.getLogger(__name__)

Work = Callable[[Backend], Iterator[Any]]
T = TypeVar("T")
_END = object()


@dataclass
class SchedulerStats:
    queued: int = 0
    running: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens_generated: int = 0
    busy_seconds: float = 0.0


class Channel:
    """A job's items on their way to its one reader, on the event loop: an `asyncio.Queue`
    without what one reader does not need (task counting, a list of getters, a running-loop
    lookup per `get`); it is on the path of every streamed token."""

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


@dataclass
class Job:
    """One request's work and the channel its results travel back on."""

    work: Work
    loop: asyncio.AbstractEventLoop
    deadline: float
    out: Channel = field(init=False)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # What a batching loop needs to know besides `work` (which serves the serial loop).
    request: GenerationRequest | None = None  # a generation
    texts: list[str] | None = None  # an embedding
    started: float = 0.0
    timer: asyncio.TimerHandle | None = None  # the deadline's, on the loop (see `arm`)

    def __post_init__(self) -> None:
        self.out = Channel(self.loop)

    def emit(self, item: Any) -> None:
        deliver([(self, item)])

    def cancel(self) -> None:
        self.cancelled.set()

    def arm(self) -> None:
        """On the loop: at the deadline, cancel the job and end its stream with a timeout
        (one timer per job, not one per item)."""
        self.timer = self.loop.call_at(self.deadline, self._expire)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        self.timer = None
        self.cancel()
        self.out.put_nowait(RequestTimeout("The request took longer than the server's "
                                           "request_timeout and was cancelled."))

    async def next(self) -> Any:
        """The next item; domain errors (a timeout too) re-raised."""
        item = await self.out.get()
        if isinstance(item, BaseException):
            raise item
        return item


class JobStream:
    """Async iteration over a running job; `close()` cancels it (idempotent).

    A subclass that needs to see every item and the end (the meter does) overrides
    `observe` and `ended` rather than wrapping the iteration in another generator: this
    loop runs once per streamed token."""

    def __init__(self, job: Job, first: Any) -> None:
        self._job = job
        self.first = first

    async def __aiter__(self) -> AsyncIterator[Any]:
        out, observe = self._job.out, self.observe
        error: BaseException | None = None
        try:
            item = self.first
            while item is not _END:
                observe(item)
                yield item
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.close()
            await self.ended(error)

    def observe(self, item: Any) -> None:
        """Called with each item before it is yielded."""

    async def ended(self, error: BaseException | None) -> None:
        """Called once the iteration ends: `error` is what ended it, None at the end."""

    def close(self) -> None:
        self._job.cancel()
        self._job.disarm()


def _yield_cpu() -> None:
    """Lower the calling thread's priority (a tokenizer thread): when the CPU is short, the
    engine's decode threads get it first, and tokenizing waits."""
    with contextlib.suppress(AttributeError, OSError):  # Linux sets a nice value per thread
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class ModelScheduler:
    """Owns one model's backend and the single thread that may touch it."""

    def __init__(self, name: str, loader: Callable[[], Backend], *, max_queue: int,
                 request_timeout: float, default_max_tokens: int | None = None,
                 prompt_chars_per_token: int = 8,
                 grammar_limits: GrammarLimits | None = None) -> None:
        self.name = name
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.default_max_tokens = default_max_tokens
        self.prompt_chars_per_token = prompt_chars_per_token  # server.max_prompt_chars_per_token
        self.grammar_limits = grammar_limits or GrammarLimits()  # server.max_grammar_*
        self.state = "loading"
        self.error: str | None = None
        self.stats = SchedulerStats()
        self.backend: Backend | None = None
        self._loader = loader
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._capacity = 1  # sequences running at once (the batch engine's max_sequences)
        self._current: Job | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"engine-{name}", daemon=True)
        # One worker: requests tokenize one after another, on at most one core per model.
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tokenize-{name}",
                                             initializer=_yield_cpu)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    async def wait_loaded(self) -> None:
        await asyncio.to_thread(self._loaded.wait)

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the running job, fail the queued ones, release the engine."""
        self._stopping.set()
        if (current := self._current) is not None:
            current.cancel()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _main(self) -> None:
        try:
            backend, engine = self._load()
        except Exception as exc:  # noqa: BLE001 - reported through state and the log
            self.state = "failed"
            self.error = exc.message if isinstance(exc, LLMAPIError) else \
                f"loading failed ({type(exc).__name__}); see the server log"
            if not isinstance(exc, ModelLoadError):
                log.exception("model %s failed to load", self.name)
            self._loaded.set()
            self._drain("the model failed to load")
            return
        self.backend = backend
        self._capacity = engine.max_sequences if engine is not None else 1
        self.state = "ready"
        self._loaded.set()
        log.info("model %s is ready", self.name)
        try:
            if engine is None:
                self._serve_jobs(backend)
            else:
                BatchLoop(self, backend, engine, _END).run()
        finally:
            self.state = "stopped"
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
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self.stats.queued -= 1
                if job.cancelled.is_set() or self._stopping.is_set():
                    self.stats.cancelled += 1
                    job.emit(ModelNotReady(f"Model '{self.name}' is shutting down."))
                    continue
                self.stats.running += 1
                self._current = job
            started = time.monotonic()
            outcome = self._run(job, backend)
            with self._lock:
                self._current = None
                self.stats.running -= 1
                self.stats.busy_seconds += time.monotonic() - started
                setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)

    def _run(self, job: Job, backend: Backend) -> str:
        items = job.work(backend)
        try:
            for item in items:
                if job.cancelled.is_set():
                    job.emit(ClientDisconnected("The request was cancelled."))
                    return "cancelled"
                if isinstance(item, Chunk) and item.finish_reason is None \
                        and item.prompt_tokens is None:
                    self.stats.tokens_generated += 1
                job.emit(item)
            job.emit(_END)
            return "completed"
        except Exception as exc:  # noqa: BLE001 - becomes the client's error
            job.emit(as_domain_error(exc))
            return "failed"
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    # -- the request side ------------------------------------------------------------------

    def _check_ready(self) -> Backend:
        if self.state != "ready" or self.backend is None:
            if self.state == "loading":
                raise ModelNotReady(f"Model '{self.name}' is still loading; retry shortly.")
            raise ModelNotReady(f"Model '{self.name}' is not available ({self.state}).")
        return self.backend

    def _admit(self, work: Work, request: GenerationRequest | None = None,
               texts: list[str] | None = None) -> Job:
        self._check_ready()
        loop = asyncio.get_running_loop()
        job = Job(work=work, loop=loop, deadline=loop.time() + self.request_timeout,
                  request=request, texts=texts)
        with self._lock:
            if self.stats.queued + self.stats.running > self.max_queue + self._capacity - 1:
                raise Overloaded(
                    f"Model '{self.name}' is busy: {self.stats.queued} requests are waiting "
                    f"(max_queue={self.max_queue}). Retry later.", self._retry_after())
            self.stats.queued += 1
        job.arm()
        self._jobs.put(job)
        return job

    def _retry_after(self) -> int:
        done = self.stats.completed + self.stats.failed
        average = self.stats.busy_seconds / done if done else 1.0
        return max(1, min(60, round(average * (self.stats.queued + 1))))

    async def open_stream(self, work: Work, request: GenerationRequest | None = None,
                          texts: list[str] | None = None) -> JobStream:
        """Admit `work` and wait for its first item, so errors before it are plain errors."""
        job = self._admit(work, request, texts)
        try:
            first = await job.next()
        except BaseException:
            job.cancel()
            job.disarm()
            raise
        return JobStream(job, first)

    # The request-facing API: a batching scheduler overrides these two.

    async def generate(self, request: GenerationRequest) -> JobStream:
        """Stream a generation; returns once the prompt was accepted (first chunk)."""
        return await self.open_stream(lambda backend: backend.generate(request), request=request)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        def work(backend: Backend) -> Iterator[Any]:
            yield backend.embed(texts)

        stream = await self.open_stream(work, texts=texts)
        stream.close()
        vectors: list[list[float]] = stream.first
        return vectors

    async def call(self, fn: Callable[[Backend], Any]) -> Any:
        """Run one blocking call on the engine thread and return its result."""
        def work(backend: Backend) -> Iterator[Any]:
            yield fn(backend)

        stream = await self.open_stream(work)
        stream.close()
        return stream.first

    async def call_tokenizer(self, fn: Callable[[Backend], T]) -> T:
        """Run `fn` (tokenizing, detokenizing, templating) on the model's tokenizer thread,
        one call at a time; on the engine thread for a backend that does not allow that."""
        backend = self._check_ready()
        if not backend.tokenizes_off_engine:
            result: T = await self.call(fn)
            return result
        try:
            future = self._tokenizer.submit(fn, backend)
        except RuntimeError:  # shut down: the model is stopping
            raise ModelNotReady(f"Model '{self.name}' is shutting down.") from None
        try:  # cancelling this await (a client that left) drops a call not yet started
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and task is not None and not task.cancelling():
                raise ModelNotReady(f"Model '{self.name}' is shutting down.") from None
            raise
