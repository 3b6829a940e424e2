"""Remote workers: a model served by `llm-api worker` processes on any host, over Redis Streams.

Keys of model M under `workers.prefix` P (`Keys`):

    P:M:jobs       stream + consumer group: generations and embeddings. A worker reads one
                   only when its engine has a free slot and XDELs it once done, so the
                   stream's length is the backlog (queued + running).
    P:M:calls      stream + consumer group: tokenizer calls, served at once by any worker.
    P:M:cancels    stream every worker reads: ids of cancelled jobs.
    P:M:workers    set of worker ids; P:M:worker:<id> a worker's heartbeat (its model info,
                   expiring after workers.dead_after_seconds).
    P:r:<job>      the job's result stream: one entry per decode step,
                   {"attempt": n, "items": [[job id, seq, [kind, payload]], ...]}.
    P:c:<job>      the job's cancel mark (checked before a worker starts the job).

Each job's results are read by a task of its own (`XREAD BLOCK` on a pooled connection),
started right after the job is queued: no shared blocking read has to learn of a new key,
and a stream keeps what was written before its reader came (pub/sub would lose it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from backends.errors import BackendFailure
from engine.client import ModelInfo, Pending, TransportClient
from engine.errors import EngineRestarted, ModelNotReady, NoWorkers, Overloaded
from engine.jobs import deliver
from engine.ops import ModelLimits
from engine.wire import dumps, loads

log = logging.getLogger(__name__)

GROUP = "workers"
NO_WORKER = "no live worker"
#: Longest a job's reader blocks before it looks whether the job is still wanted.
READ_BLOCK_MS = 1000
#: The cancels stream keeps about this many ids (workers read it as it comes).
CANCELS_MAXLEN = 10_000

# Queue a job unless the stream already holds `bound` (ARGV[1]; -1: no bound): the check and
# the XADD are one step, so API replicas sharing a model cannot overshoot the bound together.
ENQUEUE = """
local bound = tonumber(ARGV[1])
local n = redis.call('XLEN', KEYS[1])
if bound >= 0 and n >= bound then return {0, n} end
return {1, redis.call('XADD', KEYS[1], '*', 'm', ARGV[2])}
"""

# A worker keeps its running jobs claimed (idle time reset, delivery count unchanged) unless
# another worker took one over meanwhile: those are returned, for it to drop.
# KEYS: the stream; ARGV: the group, the worker's consumer name, its entry ids.
TOUCH = """
local lost = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', 0, id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
  else
    table.insert(lost, id)
  end
end
return lost
"""

#: The number of an error that ends a job whatever its reader already has (the reader
#: skips items numbered below what it has passed on).
FINAL = 1 << 40


@dataclass(frozen=True)
class Keys:
    """The Redis keys of one model's workers (see the module docstring)."""

    prefix: str
    model: str

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:{self.model}:jobs"

    @property
    def calls(self) -> str:
        return f"{self.prefix}:{self.model}:calls"

    @property
    def cancels(self) -> str:
        return f"{self.prefix}:{self.model}:cancels"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:{self.model}:workers"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:{self.model}:worker:{worker_id}"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}:r:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:c:{job_id}"


def safe_url(url: str) -> str:
    """A Redis URL without its credentials, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rsplit('@', 1)[-1]}" if sep else url.rsplit("@", 1)[-1]


def merge_workers(live: list[dict[str, Any]]) -> tuple[frozenset[str], int | None,
                                                       dict[str, Any], int]:
    """What live workers' heartbeats say together: capabilities (those every worker has),
    context length (the smallest), summed stats, and their slots (sequences at once)."""
    capabilities = frozenset.intersection(*(frozenset(w.get("capabilities") or ())
                                            for w in live))
    contexts = [int(w["context_length"]) for w in live if w.get("context_length")]
    stats: dict[str, Any] = {}
    for worker in live:
        for key, value in (worker.get("stats") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                stats[key] = stats.get(key, 0) + value
    slots = sum(max(1, int(w.get("capacity") or 1)) for w in live)
    return capabilities, min(contexts) if contexts else None, stats, slots


class RemoteClient(TransportClient):
    """A model served by remote workers; its state and load come from their heartbeats."""

    placement = "remote"

    def __init__(self, name: str, limits: ModelLimits, settings: Any) -> None:
        super().__init__(name, limits)
        self.url: str | None = settings.redis_url
        self.cfg = settings.workers
        self.keys = Keys(self.cfg.prefix, name)
        self.redis: aioredis.Redis | None = None
        self.info = ModelInfo(state="waiting", workers=0)
        self._slots = 0
        self._entries: dict[str, tuple[str, str]] = {}  # job id -> (stream, entry id)
        self._readers: set[asyncio.Task[None]] = set()
        self._cancels: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._enqueue: Any = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if not self.url:
            self.info.state = "failed"
            self.info.error = "placement 'remote' needs redis_url (where its workers are)"
            self._loaded.set()
            return
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=self.cfg.max_connections, timeout=None,
            socket_connect_timeout=5, socket_keepalive=True)
        self.redis = aioredis.Redis(connection_pool=pool)
        self._enqueue = self.redis.register_script(ENQUEUE)
        self._watch = self.loop.create_task(self._watch_workers())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        ids = list(self._pending)
        failed = [(p.job, ModelNotReady(f"Model '{self.name}' is shutting down."))
                  for p in self._pending.values()]
        self._pending.clear()
        if failed:
            deliver(failed)
        for job_id in ids:  # their workers need not finish them
            self.send_cancel(job_id)
        if self._cancels:
            await asyncio.wait(set(self._cancels), timeout=2)
        for task in list(self._readers):
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        if self.redis is not None:
            await self.redis.aclose()
        self.info.state = "stopped"

    # -- workers' heartbeats ---------------------------------------------------------------

    async def _watch_workers(self) -> None:
        while True:
            try:
                await self._refresh()
            except RedisError as exc:
                self._set_live([], f"Redis is unreachable ({type(exc).__name__})")
            self._loaded.set()
            await asyncio.sleep(self.cfg.heartbeat_seconds)

    async def _refresh(self) -> None:
        assert self.redis is not None
        found: Any = await self.redis.smembers(self.keys.workers)
        ids = sorted(i.decode() for i in found)
        values: Any = []
        ttls: Any = []
        if ids:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.mget([self.keys.worker(i) for i in ids])
                for i in ids:
                    pipe.pttl(self.keys.worker(i))
                values, *ttls = await pipe.execute()
        live: list[dict[str, Any]] = []
        # A heartbeat resets its key's time to live: the age needs no clock of the worker's.
        self.info.heartbeats = {i: max(0.0, self.cfg.dead_after_seconds - ttl / 1000)
                                for i, ttl in zip(ids, ttls, strict=True) if ttl >= 0}
        for value in values:
            with contextlib.suppress(ValueError, TypeError):
                if value and (info := loads(value)).get("state") == "ready":
                    live.append(info)
        self._set_live(live, None)

    def _set_live(self, live: list[dict[str, Any]], why: str | None) -> None:
        info = self.info
        info.workers = len(live)
        if not live:
            info.state, info.error = "waiting", why or NO_WORKER
            return
        info.capabilities, info.context_length, info.stats, self._slots = merge_workers(live)
        info.tool_format = str(live[0].get("tool_format") or "json")
        info.reasoning = live[0].get("reasoning")
        info.state, info.error = "ready", None

    def check_available(self) -> None:
        if self.info.state == "ready":
            return
        if self.info.state in ("failed", "stopped"):
            raise ModelNotReady(f"Model '{self.name}' is not available ({self.info.state}: "
                                f"{self.info.error}).")
        why = "" if self.info.error in (None, NO_WORKER) else f" ({self.info.error})"
        raise NoWorkers(f"Model '{self.name}' has no live worker{why}; start one with "
                        "`llm-api worker`, or retry shortly.")

    # -- jobs ------------------------------------------------------------------------------

    def _bound(self) -> int:
        if self.cfg.max_backlog is not None:
            return int(self.cfg.max_backlog)
        return self.limits.max_queue + self._slots

    def _overloaded(self, backlog: int, bound: int) -> Overloaded:
        stats = self.info.stats
        done = stats.get("completed", 0) + stats.get("failed", 0)
        average = stats.get("busy_seconds", 0.0) / done if done else 1.0
        waves = backlog / max(1, self._slots) + 1
        return Overloaded(
            f"Model '{self.name}' is busy: {backlog} requests are queued or running on its "
            f"{self.info.workers} worker(s) (at most {bound}). Retry later.",
            max(1, min(60, round(average * waves))))

    def send_job(self, message: dict[str, Any]) -> None:
        if self.redis is None:
            raise NoWorkers(f"Model '{self.name}' has no live worker ({self.info.error}).")
        stream, bound = (self.keys.calls, -1) if "call" in message else \
            (self.keys.jobs, self._bound())
        self._task(self._readers, self._serve(str(message["id"]), stream, bound, dumps(message)))

    def _task(self, tasks: set[asyncio.Task[None]], work: Coroutine[Any, Any, None]) -> None:
        assert self.loop is not None
        task = self.loop.create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _end(self, job_id: str, error: Exception) -> None:
        pending = self._pending.pop(job_id, None)
        if pending is not None:
            deliver([(pending.job, error)])

    async def _serve(self, job_id: str, stream: str, bound: int, data: bytes) -> None:
        """Queue the job, then pass its results on until it ends or is cancelled."""
        assert self.redis is not None
        pending = self._pending.get(job_id)
        if pending is None:
            return
        try:
            added, value = await self._enqueue(keys=[stream], args=[bound, data])
        except RedisError as exc:
            self._end(job_id, NoWorkers(f"Model '{self.name}' cannot reach its workers: "
                                        f"Redis is unreachable ({type(exc).__name__})."))
            return
        if not added:
            self._end(job_id, self._overloaded(int(value), bound))
            return
        entry = value.decode()
        if job_id not in self._pending:  # cancelled while it was being queued
            with contextlib.suppress(RedisError):
                await self.redis.xdel(stream, entry)
            return
        self._entries[job_id] = (stream, entry)
        try:
            await self._read(pending)
        finally:
            self._entries.pop(job_id, None)
            if job_id not in self._pending:  # ended: nobody reads its results again
                with contextlib.suppress(RedisError):
                    await self.redis.delete(self.keys.result(job_id))

    async def _read(self, pending: Pending) -> None:
        assert self.redis is not None
        job_id = pending.job.id
        key, last, attempt = self.keys.result(job_id), "0-0", 0
        failing_since: float | None = None
        while job_id in self._pending:
            reply: Any
            try:
                reply = await self.redis.xread({key: last}, count=256, block=READ_BLOCK_MS)
            except RedisError as exc:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.cfg.dead_after_seconds:
                    self._end(job_id, EngineRestarted(
                        f"Model '{self.name}': the connection to its workers was lost "
                        f"({type(exc).__name__}). Retry the request."))
                    return
                await asyncio.sleep(0.2)
                continue
            failing_since = None
            for _key, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id
                    attempt = self._take(pending, attempt, fields)
                    if attempt < 0:
                        return

    def _take(self, pending: Pending, attempt: int, fields: dict[bytes, bytes]) -> int:
        """Route one result entry; the attempt now read, or -1 when the job ended here.

        A worker that took over a job from a dead one reruns it from its first item, under
        a higher attempt number: `route` skips what the reader already has, which is the
        same text for a rerunnable job; any other job that already sent items ends."""
        job_id = pending.job.id
        try:
            message = loads(fields[b"m"])
            now, items = int(message["attempt"]), list(message["items"])
        except (KeyError, ValueError, TypeError):
            log.error("model %s: unreadable result entry for job %s", self.name, job_id)
            self._end(job_id, BackendFailure())
            return -1
        if now < attempt:
            return attempt  # a worker that lost the job to another, still writing
        if now > attempt and pending.delivered and not pending.rerunnable:
            self._end(job_id, EngineRestarted(
                f"Model '{self.name}': the worker running the request stopped and the "
                "request cannot be rerun with the same output (it samples). Retry it."))
            self.send_cancel(job_id)
            return -1
        self.route(items)
        return now

    def send_cancel(self, job_id: str) -> None:
        """Write the job's cancel mark. `on_cancel` runs where a stream is being closed,
        often inside a cancelled scope where any await would itself be cancelled: the write
        runs in a task of its own, outside that scope, and is awaited by `stop`."""
        if self.redis is None or self.loop is None:
            return
        entry = self._entries.pop(job_id, None)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._task(self._cancels, self._write_cancel(job_id, entry))
        else:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(
                    self._task, self._cancels, self._write_cancel(job_id, entry))

    async def _write_cancel(self, job_id: str, entry: tuple[str, str] | None) -> None:
        assert self.redis is not None
        ttl = int(self.limits.request_timeout + self.cfg.result_ttl_seconds)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(self.keys.cancel(job_id), b"1", ex=ttl)
                pipe.xadd(self.keys.cancels, {"id": job_id}, maxlen=CANCELS_MAXLEN,
                          approximate=True)
                if entry is not None:  # not started yet: out of the backlog at once
                    pipe.xdel(*entry)
                await pipe.execute()
        except RedisError as exc:
            log.warning("model %s: could not cancel job %s (%s)", self.name, job_id,
                        type(exc).__name__)
