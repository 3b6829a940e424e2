"""Jobs and their streams: one request's work on a model, and the items it produces.

A `Job` is created where a request is accepted and runs where its model's engine is. Items
an engine thread emits go to the job's `sink` in batches (`deliver`): one wake-up of the
reader per decode step, not one per sequence. In the API process the sink puts them into the
job's `Channel`, read on the event loop; in a worker process it sends them to the API.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from backends.base import Backend, GenerationRequest
from engine.errors import RequestTimeout


class _End:
    def __repr__(self) -> str:
        return "END"


#: The item that ends a job's stream.
END = _End()

Work = Callable[[Backend], Iterator[Any]]


class Sink(Protocol):
    def deliver(self, items: list[tuple[Job, Any]]) -> None:
        """Take items emitted for jobs of this sink (called from an engine thread)."""


def deliver(items: list[tuple[Job, Any]]) -> None:
    """Hand emitted items to their jobs' sinks, one batch per sink."""
    sink = items[0][0].sink
    if any(job.sink is not sink for job, _ in items):
        by_sink: dict[int, tuple[Sink, list[tuple[Job, Any]]]] = {}
        for job, item in items:
            by_sink.setdefault(id(job.sink), (job.sink, []))[1].append((job, item))
        for one, batch in by_sink.values():
            one.deliver(batch)
    else:
        sink.deliver(items)


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


class LoopSink:
    """Delivers items into their jobs' channels on one event loop (thread-safe). Made on
    that loop's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.get_ident()

    def deliver(self, items: list[tuple[Job, Any]]) -> None:
        if threading.get_ident() == self.thread:  # a transport's reader on the loop itself
            _put_all(items)
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self.loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[Job, Any]]) -> None:
    for job, item in items:
        if job.out is not None:
            job.out.put_nowait(item)


@dataclass(eq=False)
class Job:
    """One request's work: a generation (`request`), an embedding (`texts`), or a call
    (`work`, e.g. tokenizing), and where its items go.

    `deadline` is on the monotonic clock of the process that runs the job. On the API side
    a job also has its `out` channel and the timer that ends it at the deadline (`arm`)."""

    sink: Sink
    deadline: float
    work: Work | None = None
    request: GenerationRequest | None = None  # a generation
    texts: list[str] | None = None  # an embedding
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    request_id: str | None = None  # the HTTP request's, for log lines (engine.logctx)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0
    seq: int = 0  # items emitted so far (a worker numbers them: a rerun skips those sent)
    out: Channel | None = None
    loop: asyncio.AbstractEventLoop | None = None
    timer: asyncio.TimerHandle | None = None  # the deadline's, on the loop (see `arm`)
    on_cancel: Callable[[Job], None] | None = None  # e.g. tell a worker process

    @classmethod
    def on_loop(cls, timeout: float, **fields: Any) -> Job:
        """A job read on the running event loop, due within `timeout` seconds."""
        loop = asyncio.get_running_loop()
        job = cls(sink=LoopSink(loop), deadline=loop.time() + timeout, **fields)
        job.loop, job.out = loop, Channel(loop)
        return job

    def emit(self, item: Any) -> None:
        deliver([(self, item)])

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.cancelled.set()
            if self.on_cancel is not None:
                self.on_cancel(self)

    def arm(self) -> None:
        """On the loop: at the deadline, cancel the job and end its stream with a timeout
        (one timer per job, not one per item)."""
        assert self.loop is not None
        self.timer = self.loop.call_at(self.deadline, self._expire)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        self.interrupt(RequestTimeout("The request took longer than the server's "
                                      "request_timeout and was cancelled."))

    def interrupt(self, error: BaseException) -> None:
        """On the loop: cancel the job and end its stream with `error` (a timeout, or the
        server shutting down)."""
        self.disarm()
        self.cancel()
        if self.out is not None:
            self.out.put_nowait(error)

    async def next(self) -> Any:
        """The next item; domain errors (a timeout too) re-raised."""
        assert self.out is not None
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
        assert out is not None
        error: BaseException | None = None
        try:
            item = self.first
            while item is not END:
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


async def first_item(job: Job) -> JobStream:
    """Wait for an armed job's first item, so errors before it are plain errors."""
    try:
        first = await job.next()
    except BaseException:
        job.cancel()
        job.disarm()
        raise
    return JobStream(job, first)
