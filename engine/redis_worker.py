"""`llm-api worker`: serve models for API processes anywhere, taking their jobs from Redis
Streams (keys: `engine.remote.Keys`).

Per model, threads of one process: a puller reads a job (XREADGROUP) only when the engine
has a free slot, or takes over one a dead worker left (XAUTOCLAIM, after
workers.dead_after_seconds idle) and reruns it under the next attempt number; a call reader
serves tokenizer calls at once; a cancel reader marks cancelled jobs, which the engine drops
at its next step. The engine's thread writes each decode step's items, one XADD per job,
pipelined, and acks (XACK + XDEL) a job only after its last item is written. One heartbeat
thread says the worker is alive, keeps its running jobs from looking idle, and removes dead
consumers.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.errors import EngineRestarted
from engine.host import Batch, HostSink, ModelHost
from engine.remote import FINAL, GROUP, TOUCH, Keys, safe_url
from engine.wire import dumps, item_out, loads
from engine.worker import limits_of

log = logging.getLogger(__name__)

UNREACHABLE = (RedisConnectionError, RedisTimeoutError)


class WorkerError(Exception):
    """The worker cannot start; the message says why."""


@dataclass
class Origin:
    """Where a running job came from: its stream entry and the attempt it is."""

    stream: str
    entry: str
    attempt: int
    lost: bool = False  # another worker took it over: never ack it here


class Node:
    """What a worker process's models share: its id, Redis, settings and stop flag."""

    def __init__(self, client: redis.Redis, cfg: Any) -> None:
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.redis = client
        self.cfg = cfg
        self.stopping = threading.Event()
        self.draining = threading.Event()  # stop taking jobs; finish the running ones
        self.touch = client.register_script(TOUCH)

    def repeat(self, name: str, body: Callable[[], None], once: bool = False) -> None:
        """Run `body` until the worker stops (`once`: until it succeeds); while Redis is
        unreachable (it was reachable when the worker started), wait with a growing backoff."""
        delay = 0.5
        while not self.stopping.is_set():
            try:
                body()
                if once:
                    return
                delay = 0.5
            except UNREACHABLE as exc:
                log.warning("%s: Redis unreachable (%s); retrying in %.1f s", name,
                            type(exc).__name__, delay)
                self.stopping.wait(delay)
                delay = min(30.0, delay * 2)
            except Exception:  # noqa: BLE001 - keep serving; the log says what failed
                if once:
                    raise
                log.exception("%s failed; retrying", name)
                self.stopping.wait(1.0)

    def forever(self, name: str, body: Callable[[], None]) -> None:
        threading.Thread(target=self.repeat, args=(name, body), name=name, daemon=True).start()


class ModelWorker:
    """One model served from its streams."""

    def __init__(self, node: Node, entry: Any, models_dir: Path) -> None:
        from engine.loading import load_model

        self.node, self.name = node, entry.name
        self.keys = Keys(node.cfg.prefix, entry.name)
        self.host = ModelHost(entry.name, partial(load_model, entry, models_dir),
                              limits_of(entry))
        self.sink = HostSink(self.host, self._post)
        self._origins: dict[str, Origin] = {}
        self._lock = threading.Lock()
        self._room = threading.Event()
        self._closed = False
        self._block_ms = max(10, min(1000, int(node.cfg.heartbeat_seconds * 1000)))
        self._last_claim: dict[str, float] = {}

    def load(self) -> None:
        self.host.start()
        self.host.scheduler.loaded.wait()
        if self.host.scheduler.state != "ready":
            raise WorkerError(f"model {self.name} could not be loaded: "
                              f"{self.host.scheduler.error}")

    def join_groups(self) -> None:
        for stream in (self.keys.jobs, self.keys.calls):
            try:  # from id 0: jobs queued before any worker existed are served too
                self.node.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def start(self) -> None:
        forever = self.node.forever
        last: Any = self.node.redis.xrevrange(self.keys.cancels, count=1)
        cancels: list[bytes] = [last[0][0] if last else b"0-0"]  # only cancels from now on
        forever(f"jobs-{self.name}", self._pull_job)
        forever(f"calls-{self.name}", self._pull_call)
        forever(f"cancels-{self.name}", partial(self._read_cancels, cancels))

    # -- taking jobs -----------------------------------------------------------------------

    def _free_slot(self) -> bool:
        """The engine has room for another job. Counted here rather than by the scheduler's
        `has_room()`, which counts a job out only after its last item was sent: the puller
        woken by that item would find no room and wait a whole period."""
        with self._lock:
            held = sum(1 for o in self._origins.values() if o.stream == self.keys.jobs)
        return held < self.host.scheduler.capacity

    def _pull_job(self) -> None:
        self._room.clear()
        if self.node.draining.is_set() or not self._free_slot():
            self._room.wait(0.2)  # set when a job ends
            return
        if self._claim(self.keys.jobs):
            return
        self._read_group(self.keys.jobs)

    def _pull_call(self) -> None:
        if self.node.draining.is_set():
            self.node.stopping.wait(0.2)
        elif not self._claim(self.keys.calls):
            self._read_group(self.keys.calls)

    def _read_group(self, stream: str) -> None:
        reply: Any
        try:
            reply = self.node.redis.xreadgroup(GROUP, self.node.id, {stream: ">"}, count=1,
                                               block=self._block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.join_groups()  # Redis lost its data (restarted without persistence)
            return
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self._open(stream, entry_id.decode(), fields, 1)

    def _claim(self, stream: str) -> bool:
        """Take over one job idle past dead_after_seconds (its worker died), at most once a
        heartbeat per stream; True when one was taken."""
        now = time.monotonic()
        if now - self._last_claim.get(stream, 0.0) < self.node.cfg.heartbeat_seconds / 2:
            return False
        self._last_claim[stream] = now
        r, idle_ms = self.node.redis, int(self.node.cfg.dead_after_seconds * 1000)
        reply: Any = r.xautoclaim(stream, GROUP, self.node.id, idle_ms,
                             start_id="0-0", count=1)
        claimed = reply[1]
        for entry_id, fields in claimed:
            entry = entry_id.decode()
            pending: Any = r.xpending_range(stream, GROUP, min=entry, max=entry, count=1)
            attempt = int(pending[0]["times_delivered"]) if pending else 2
            log.warning("model %s: taking over job entry %s (attempt %d)", self.name, entry,
                        attempt)
            self._open(stream, entry, fields, attempt)
        return bool(claimed)

    def _open(self, stream: str, entry: str, fields: dict[bytes, bytes], attempt: int) -> None:
        try:
            message = loads(fields[b"m"])
            job_id = str(message["id"])
        except (KeyError, ValueError, TypeError):
            log.error("model %s: dropping unreadable job entry %s", self.name, entry)
            self._ack(stream, entry)
            return
        # (not for a call: short and served at once, it is not worth a round trip)
        if stream == self.keys.jobs and self.node.redis.exists(self.keys.cancel(job_id)):
            self._ack(stream, entry)  # cancelled before it started
            return
        with self._lock:
            self._origins[job_id] = Origin(stream, entry, attempt)
        if attempt > self.node.cfg.max_attempts:
            self._post([(job_id, FINAL, item_out(EngineRestarted(
                f"Model '{self.name}': the workers running the request stopped {attempt - 1} "
                "times; it is not run again.")))])
            return
        try:
            self.host.open(self.sink, message)
        except Exception as exc:  # noqa: BLE001 - a malformed message: the client's error
            log.error("model %s: bad job %s (%s)", self.name, job_id, type(exc).__name__)
            self._post([(job_id, FINAL, item_out(exc))])

    def _ack(self, stream: str, entry: str) -> None:
        pipe = self.node.redis.pipeline(transaction=False)
        pipe.xack(stream, GROUP, entry)
        pipe.xdel(stream, entry)
        pipe.execute()

    def _read_cancels(self, last: list[bytes]) -> None:
        reply: Any = self.node.redis.xread({self.keys.cancels: last[0]}, count=100,
                                      block=self._block_ms)
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                last[0] = entry_id
                self.host.cancel(fields.get(b"id", b"").decode())

    # -- results ---------------------------------------------------------------------------

    def _post(self, batch: Batch) -> None:
        """From the engine's threads: a decode step's items, one round trip, written before
        the engine decodes the next step (as the local transport writes its pipe). A writer
        thread instead would run during the decode, competing with llama.cpp's compute
        threads for the cores at every step."""
        if self._closed:
            return  # stopping: jobs still running stay pending, for another worker
        by_job: dict[str, list[Any]] = {}
        for job_id, seq, item in batch:
            by_job.setdefault(job_id, []).append([job_id, seq, item])
        self._send(by_job)

    def _send(self, by_job: dict[str, list[Any]]) -> None:
        ttl = int(self.node.cfg.result_ttl_seconds)
        pipe = self.node.redis.pipeline(transaction=False)
        done: list[str] = []
        for job_id, items in by_job.items():
            with self._lock:
                origin = self._origins.get(job_id)
            key = self.keys.result(job_id)
            attempt = origin.attempt if origin else 1
            pipe.xadd(key, {"m": dumps({"attempt": attempt, "items": items})})
            pipe.expire(key, ttl)
            if items[-1][2][0] in ("end", "error"):
                done.append(job_id)
                if origin is not None and not origin.lost:
                    pipe.xack(origin.stream, GROUP, origin.entry)
                    pipe.xdel(origin.stream, origin.entry)
        delay = 0.2
        while True:  # a repeat is harmless: items are numbered, acks idempotent
            try:
                pipe.execute()
                break
            except UNREACHABLE as exc:
                if self.node.stopping.is_set():
                    return
                log.warning("model %s: cannot write results (%s); retrying", self.name,
                            type(exc).__name__)
                time.sleep(delay)
                delay = min(5.0, delay * 2)
        if done:
            with self._lock:
                for job_id in done:
                    self._origins.pop(job_id, None)
            self._room.set()

    # -- heartbeat -------------------------------------------------------------------------

    def beat(self, pipe: Any) -> None:
        info = {**self.host.info(), "worker": self.node.id, "host": socket.gethostname(),
                "pid": os.getpid(), "capacity": self.host.scheduler.capacity,
                "running": self.host.running()}
        if self.node.draining.is_set():
            info["state"] = "draining"  # the API sends it no more jobs
        ttl_ms = int(self.node.cfg.dead_after_seconds * 1000)
        pipe.set(self.keys.worker(self.node.id), dumps(info), px=ttl_ms)
        pipe.sadd(self.keys.workers, self.node.id)

    def touch(self) -> None:
        """Keep this worker's running jobs from looking idle; drop those taken over."""
        with self._lock:
            held: dict[str, list[str]] = {}
            ids: dict[str, str] = {}
            for job_id, origin in self._origins.items():
                if not origin.lost:
                    held.setdefault(origin.stream, []).append(origin.entry)
                    ids[origin.entry] = job_id
        for stream, entries in held.items():
            lost: Any = self.node.touch(keys=[stream], args=[GROUP, self.node.id, *entries])
            for entry in lost:
                job_id = ids[entry.decode()]
                log.warning("model %s: job %s was taken over by another worker", self.name,
                            job_id)
                with self._lock:
                    if (taken := self._origins.get(job_id)) is not None:
                        taken.lost = True
                self.host.cancel(job_id)

    def sweep(self) -> None:
        """Remove dead workers: their heartbeat expired and no job of theirs is pending
        (those are taken over first, else deleting the consumer would drop them)."""
        r = self.node.redis
        found: Any = r.smembers(self.keys.workers)
        members = {m.decode() for m in found}
        alive = {m for m in members if r.exists(self.keys.worker(m))}
        r_gone = members - alive
        if r_gone:
            r.srem(self.keys.workers, *r_gone)
        for stream in (self.keys.jobs, self.keys.calls):
            consumers: Any = r.xinfo_consumers(stream, GROUP)
            for consumer in consumers:
                name = consumer["name"]
                name = name.decode() if isinstance(name, bytes) else str(name)
                if name != self.node.id and name not in alive and not consumer["pending"]:
                    r.xgroup_delconsumer(stream, GROUP, name)
                    log.info("model %s: removed dead worker %s", self.name, name)

    def close(self) -> None:
        self._closed = True

    def leave(self) -> None:
        r = self.node.redis
        r.delete(self.keys.worker(self.node.id))
        r.srem(self.keys.workers, self.node.id)


def _heartbeat(node: Node, workers: list[ModelWorker], last_sweep: list[float]) -> None:
    pipe = node.redis.pipeline(transaction=False)
    for worker in workers:
        worker.beat(pipe)
    pipe.execute()
    for worker in workers:
        worker.touch()
    if time.monotonic() - last_sweep[0] >= node.cfg.dead_after_seconds:
        last_sweep[0] = time.monotonic()
        for worker in workers:
            worker.sweep()
    node.stopping.wait(node.cfg.heartbeat_seconds)


def connect(url: str | None) -> redis.Redis:
    """Redis, reachable now, or a WorkerError that says why not."""
    if not url:
        raise WorkerError("a worker needs redis_url (in the config file, or the environment "
                          "variable LLM_API_REDIS_URL)")
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_keepalive=True,
                                      health_check_interval=30)
        client.ping()
    except (RedisError, ValueError) as exc:
        raise WorkerError(f"Redis at {safe_url(url)} is unreachable: {exc}") from None
    return client


def run_worker(url: str | None, cfg: Any, models_dir: Path, entries: list[Any],
               graceful_seconds: float) -> None:
    """Serve `entries` until SIGTERM or SIGINT (a second one stops at once)."""
    node = Node(connect(url), cfg)
    names = ", ".join(e.name for e in entries)
    log.info("worker %s: serving %s from Redis %s (prefix %r)", node.id, names,
             safe_url(url or ""), cfg.prefix)

    def on_signal(_signum: int, _frame: Any) -> None:
        (node.stopping if node.draining.is_set() else node.draining).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    workers = [ModelWorker(node, entry, models_dir) for entry in entries]
    try:
        for worker in workers:
            worker.load()
        for worker in workers:
            node.repeat(f"joining {worker.name}", worker.join_groups, once=True)
            node.repeat(f"starting {worker.name}", worker.start, once=True)
        node.forever("heartbeat", partial(_heartbeat, node, workers, [0.0]))
        log.info("worker %s: ready", node.id)
        while not node.draining.wait(0.5):
            pass
        log.info("worker %s: stopping; running jobs may finish within %.0f s", node.id,
                 graceful_seconds)
        deadline = time.monotonic() + graceful_seconds
        while any(w.host.running() for w in workers) and time.monotonic() < deadline \
                and not node.stopping.wait(0.1):
            pass
    finally:
        _shut_down(node, workers)


def _shut_down(node: Node, workers: list[ModelWorker]) -> None:
    """Jobs still running stay pending in their streams: other workers take them over."""
    node.stopping.set()
    for worker in workers:
        worker.close()  # first: the errors stopping the engine gives are not sent
        worker.host.stop()
        try:
            worker.leave()
        except RedisError:
            pass
    log.info("worker %s: stopped", node.id)
