"""The one interface the API has to a model: submit a job, read its items, cancel it, call
the model's tokenizer, and see its state and load.

Three transports implement it: `InProcessClient` (the engine thread in the API process;
plugins under development and tests of the API layer), `LocalClient` (a worker process that
`serve` spawns and supervises) and `RemoteClient` (workers on any host, over Redis Streams).
"""

from __future__ import annotations

import abc
import asyncio
import weakref
from dataclasses import dataclass, field
from typing import Any

from backends.base import GenerationRequest
from engine.errors import EngineRestarted, ModelNotReady
from engine.jobs import END, Job, JobStream, deliver, first_item
from engine.logctx import REQUEST_ID
from engine.ops import ModelLimits, Prepared
from engine.wire import item_in, job_out


@dataclass
class ModelInfo:
    """What the API knows of a model without holding it: its state (`loading`, `ready`,
    `restarting`, `failed`, `stopped`; `waiting` for a remote model without a live worker),
    the last error, what it can do and its load."""

    state: str = "loading"
    error: str | None = None
    capabilities: frozenset[str] = frozenset()
    context_length: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    workers: int | None = None  # live workers (remote models)
    restarts: int = 0
    #: How the load went where the model runs: load_seconds, memory_bytes (the resident
    #: memory of its process once loaded), file, parallel.
    load: dict[str, Any] = field(default_factory=dict)
    heartbeats: dict[str, float] = field(default_factory=dict)  # remote: worker -> age (s)
    tool_format: str = "json"  # how the model writes tool calls (backends.toolcalls)
    reasoning: dict[str, Any] | None = None  # its think markers (Backend.reasoning)

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "error": self.error,
                "capabilities": sorted(self.capabilities),
                "context_length": self.context_length, "stats": dict(self.stats),
                "workers": self.workers, "restarts": self.restarts, "load": dict(self.load),
                "tool_format": self.tool_format, "reasoning": self.reasoning}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(state=data["state"], error=data.get("error"),
                   capabilities=frozenset(data.get("capabilities", ())),
                   context_length=data.get("context_length"),
                   stats=dict(data.get("stats") or {}), workers=data.get("workers"),
                   restarts=int(data.get("restarts", 0)), load=dict(data.get("load") or {}),
                   tool_format=str(data.get("tool_format") or "json"),
                   reasoning=data.get("reasoning"))


class EngineClient(abc.ABC):
    """A model as the API sees it. Subclasses say how a job reaches the engine."""

    placement: str = ""

    def __init__(self, name: str, limits: ModelLimits) -> None:
        self.name = name
        self.limits = limits
        self.info = ModelInfo()
        self._loaded = asyncio.Event()
        self._live: weakref.WeakSet[Job] = weakref.WeakSet()  # jobs read on this loop

    # -- lifecycle (the app's lifespan) ----------------------------------------------------

    @abc.abstractmethod
    def start(self) -> None:
        """Begin loading (or connecting); returns at once. Called on the event loop."""

    async def wait_loaded(self) -> None:
        """Return once the first load ended, ready or failed."""
        await self._loaded.wait()

    @abc.abstractmethod
    async def stop(self) -> None:
        """End every job (they get an error), stop the engine, release the transport."""

    async def refresh(self) -> None:  # noqa: B027 - optional: most clients have it at hand
        """Bring `info` up to date (its stats), when it is kept elsewhere."""

    # -- jobs ------------------------------------------------------------------------------

    @abc.abstractmethod
    def submit(self, job: Job, call: tuple[str, tuple[Any, ...]] | None = None) -> None:
        """Send a job on its way: a generation, an embedding, or (with `call`) a named call
        of `engine.ops.CALLS` and its arguments. Raises domain errors (queue full, not
        ready) when it cannot be accepted."""

    async def _stream(self, call: tuple[str, tuple[Any, ...]] | None = None,
                      **fields: Any) -> JobStream:
        job = Job.on_loop(self.limits.request_timeout, request_id=REQUEST_ID.get(), **fields)
        self.submit(job, call)
        job.arm()
        self._live.add(job)
        return await first_item(job)

    def interrupt_all(self, error: BaseException) -> int:
        """End every job still running with `error` (the server is shutting down); how
        many there were."""
        live = [job for job in self._live if not job.cancelled.is_set()]
        for job in live:
            job.interrupt(error)
        return len(live)

    async def generate(self, request: GenerationRequest) -> JobStream:
        """Stream a generation; returns once the prompt was accepted (the first chunk)."""
        return await self._stream(request=request)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        stream = await self._stream(texts=texts)
        stream.close()
        vectors: list[list[float]] = stream.first
        return vectors

    async def call(self, name: str, *args: Any) -> Any:
        """A named call of `engine.ops.CALLS` (tokenizing and such), run where the model is."""
        stream = await self._stream(call=(name, args))
        stream.close()
        return stream.first

    async def prepare(self, request: GenerationRequest, clamp: bool = False) -> Prepared:
        prepared: Prepared = await self.call("prepare", request, clamp)
        return prepared


#: A request whose worker died is rerun at most this many times.
MAX_ATTEMPTS = 3


@dataclass(eq=False)
class Pending:
    """A job sent to a worker: what it takes to rerun it, and what its reader already got."""

    job: Job
    message: dict[str, Any]
    delivered: int = 0  # items passed on; a rerun's first `delivered` items are skipped
    attempts: int = 1

    @property
    def rerunnable(self) -> bool:
        """A rerun gives the same items: a greedy or seeded generation, or any other job
        (an embedding, a tokenizer call) that has not answered yet."""
        request = self.job.request
        if request is None:
            return True
        return request.params.temperature == 0 or request.params.seed is not None


class TransportClient(EngineClient):
    """A model that runs in another process: a job goes out as a message (`send_job`), its
    items come back in batches (`route`), numbered, so a job rerun after its worker died
    reaches its reader exactly once."""

    def __init__(self, name: str, limits: ModelLimits) -> None:
        super().__init__(name, limits)
        self._pending: dict[str, Pending] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    @abc.abstractmethod
    def send_job(self, message: dict[str, Any]) -> None:
        """Send a job's message to the model's worker(s); raise a domain error when none
        can take it."""

    @abc.abstractmethod
    def send_cancel(self, job_id: str) -> None:
        """Tell the worker running the job to stop it."""

    def check_available(self) -> None:
        """Raise the domain error that says why no job can be sent now."""
        state = self.info.state
        if state == "ready":
            return
        if state == "loading":
            raise ModelNotReady(f"Model '{self.name}' is still loading; retry shortly.")
        if state == "restarting":
            raise EngineRestarted(f"Model '{self.name}' is restarting after its worker "
                                  "process stopped; retry shortly.")
        detail = f": {self.info.error}" if self.info.error else ""
        raise ModelNotReady(f"Model '{self.name}' is not available ({state}{detail}).")

    def submit(self, job: Job, call: tuple[str, tuple[Any, ...]] | None = None) -> None:
        self.check_available()
        pending = Pending(job, job_out(job, call, self.limits.request_timeout))
        self._pending[job.id] = pending
        job.on_cancel = self._cancelled
        try:
            self.send_job(pending.message)
        except BaseException:
            self._pending.pop(job.id, None)
            job.on_cancel = None
            raise

    def _cancelled(self, job: Job) -> None:
        if self._pending.pop(job.id, None) is not None:
            self.send_cancel(job.id)

    def route(self, batch: list[Any]) -> None:
        """Items from a worker, `[job id, sequence number, [kind, payload]]` each, to their
        jobs' readers (one wake-up of the event loop per batch). Any thread."""
        out: list[tuple[Job, Any]] = []
        for job_id, seq, (kind, payload) in batch:
            pending = self._pending.get(job_id)
            if pending is None or seq < pending.delivered:
                continue  # cancelled, or a rerun's repeat of what the reader has
            item = item_in(kind, payload)
            pending.delivered = seq + 1
            if item is END or isinstance(item, BaseException):
                self._pending.pop(job_id, None)
            out.append((pending.job, item))
        if out:
            deliver(out)

    def lost(self, job_ids: list[str] | None, why: str) -> list[Pending]:
        """Jobs whose worker died: those that may be rerun are returned (to send again when
        a worker can take them); the others end with EngineRestarted."""
        ids = list(self._pending) if job_ids is None else job_ids
        again: list[Pending] = []
        failed: list[tuple[Job, Any]] = []
        for job_id in ids:
            pending = self._pending.get(job_id)
            if pending is None:
                continue
            if pending.rerunnable and pending.attempts < MAX_ATTEMPTS:
                pending.attempts += 1
                again.append(pending)
                continue
            self._pending.pop(job_id, None)
            failed.append((pending.job, EngineRestarted(
                f"Model '{self.name}' stopped while running the request ({why}); "
                "it is being restarted. Retry the request.")))
        if failed:
            deliver(failed)
        return again

    def resend(self, again: list[Pending]) -> None:
        """Send rerunnable jobs again (to a new worker); those that cannot be sent end."""
        for pending in again:
            if pending.job.id not in self._pending:
                continue  # cancelled meanwhile
            try:
                self.send_job(pending.message)
            except Exception as exc:  # noqa: BLE001 - the job's reader gets the error
                self._pending.pop(pending.job.id, None)
                deliver([(pending.job, exc)])

    def in_flight(self) -> int:
        return len(self._pending)
