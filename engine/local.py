"""Local workers: each model runs in a process `serve` spawns and supervises.

A fault in native code (a segfault in llama.cpp, an OOM kill) ends the worker, never the
API process. The supervisor sees the pipe close, reports the model `restarting`, reruns the
jobs that give the same answer again (greedy or seeded generations, embeddings, tokenizer
calls) on the new worker, ends the others with `engine_restarted`, and restarts the worker
with a growing backoff; a worker that keeps dying is marked `failed` with the reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from engine.client import ModelInfo, Pending, TransportClient
from engine.errors import EngineRestarted, ModelNotReady
from engine.jobs import deliver
from engine.ops import ModelLimits
from engine.wire import dumps, loads
from engine.worker import Where, local_main, log_record, settings_payload

log = logging.getLogger(__name__)

#: Seconds before a restart; doubled by each failure within FAILURE_WINDOW, up to BACKOFF_MAX.
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
#: A worker that stops this many times within FAILURE_WINDOW seconds is marked failed.
MAX_FAILURES = 5
FAILURE_WINDOW = 300.0


#: What the fork server of the worker processes imports once; each worker then starts as a
#: fork of it instead of a new interpreter importing them again (seconds for torch).
_PRELOAD = {"engine.worker", "app.settings"}


def preload(modules: Iterable[str]) -> None:
    """Add modules for the fork server to import (before the first worker starts)."""
    _PRELOAD.update(modules)


def _context() -> Any:
    """Workers start from a fork server: a clean process with no threads to fork from (the
    API process has an event loop and engine threads), unlike a plain fork."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(sorted(_PRELOAD))
    return context


def describe_exit(code: int | None) -> str:
    if code is None:
        return "the worker process stopped answering"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"the worker process was killed by {signal.Signals(-code).name}"
        return f"the worker process was killed by signal {-code}"
    return f"the worker process exited with status {code}"


class LocalClient(TransportClient):
    placement = "local"

    def __init__(self, name: str, limits: ModelLimits, settings: Any) -> None:
        super().__init__(name, limits)
        self.payload = settings_payload(settings, name)
        self.process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._stopping = False
        self._again: list[Pending] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._asked: list[asyncio.Future[None]] = []  # refresh() calls awaiting an answer

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._supervisor = self.loop.create_task(self._supervise())

    async def stop(self) -> None:
        self._stopping = True
        conn, process = self._conn, self.process
        if conn is not None:
            with contextlib.suppress(OSError, ValueError), self._send_lock:
                conn.send_bytes(dumps({"op": "stop"}))
        if process is not None:
            await asyncio.to_thread(process.join, 30)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, 5)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self._fail_pending(ModelNotReady(f"Model '{self.name}' is shutting down."))
        self.info.state = "stopped"

    async def refresh(self) -> None:
        """Ask the worker for its state and stats (it answers from its reader thread, never
        behind a generation); give up after a second and keep what is known."""
        if self.info.state not in ("ready", "loading"):
            return
        answered = asyncio.get_running_loop().create_future()
        self._asked.append(answered)
        try:
            self._send({"op": "info"})
            await asyncio.wait_for(answered, 1.0)
        except (EngineRestarted, TimeoutError):
            pass
        finally:
            with contextlib.suppress(ValueError):
                self._asked.remove(answered)

    # -- supervision -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        failures: collections.deque[float] = collections.deque()
        while not self._stopping:
            loop = asyncio.get_running_loop()
            ended = loop.create_future()
            try:
                await asyncio.to_thread(self._spawn, ended)
            except Exception as exc:  # noqa: BLE001 - reported through /ready and the log
                log.exception("model %s: the worker process could not be started", self.name)
                self.info.state = "failed"
                self.info.error = f"its worker process could not be started ({type(exc).__name__})"
                self._loaded.set()
                return
            await ended
            process = self.process
            assert process is not None
            await asyncio.to_thread(process.join, 10)
            if process.is_alive():  # its pipe failed, not the process: end it all the same
                process.kill()
                await asyncio.to_thread(process.join, 5)
            self._conn = None
            if self._stopping:
                return
            why = describe_exit(process.exitcode)
            log.error("model %s: %s", self.name, why)
            now = time.monotonic()
            failures.append(now)
            while failures and failures[0] < now - FAILURE_WINDOW:
                failures.popleft()
            self.info.restarts += 1
            again = self.lost(None, why)
            if self.info.state == "failed" or len(failures) >= MAX_FAILURES:
                self.info.state = "failed"
                self.info.error = (f"{why}; it stopped {len(failures)} times in "
                                   f"{FAILURE_WINDOW:.0f} s and is not restarted again"
                                   if len(failures) >= MAX_FAILURES else self.info.error or why)
                self._fail_pending(EngineRestarted(f"Model '{self.name}' failed: {why}."))
                self._loaded.set()
                return
            self.info.state, self.info.error = "restarting", why
            self._again = again
            # doubled by each recent failure
            await asyncio.sleep(min(BACKOFF_MAX, BACKOFF_START * 2 ** (len(failures) - 1)))

    def _spawn(self, ended: asyncio.Future[None]) -> None:
        """Start a worker and the thread that reads it (in a thread: spawning takes a while).

        A thread, not the event loop's `add_reader`: uvloop (libuv) makes a watched file
        descriptor non-blocking, and a large message then fails half-sent or half-read."""
        context = _context()
        pipe: tuple[Connection, Connection] = context.Pipe(duplex=True)
        ours, theirs = pipe
        # The fork server started with the environment and directory of its time: the
        # worker takes this process's current ones (HF_ENDPOINT, relative models_dir, ...).
        where = Where(dict(os.environ), os.getcwd(), logging.getLogger().getEffectiveLevel())
        process = context.Process(target=local_main, name=f"llm-api-worker-{self.name}",
                                  daemon=True, args=(theirs, self.payload, self.name, where))
        process.start()
        theirs.close()
        self.process, self._conn = process, ours
        threading.Thread(target=self._read, args=(ours, ended), daemon=True,
                         name=f"worker-reader-{self.name}").start()

    def _read(self, conn: Connection, ended: asyncio.Future[None]) -> None:
        """The reader thread: every message of the worker until its pipe ends."""
        loop = self.loop
        assert loop is not None
        try:
            while True:
                try:
                    message = loads(conn.recv_bytes())
                except (EOFError, OSError):
                    break
                if message.get("op") == "items":
                    self.route(message["items"])  # delivered to the loop in one wake-up
                else:
                    loop.call_soon_threadsafe(self._handle, message)
        finally:
            conn.close()
            with contextlib.suppress(RuntimeError):  # the loop is closed: we are exiting
                loop.call_soon_threadsafe(_finish, ended)

    def _handle(self, message: dict[str, Any]) -> None:
        """A message other than items, on the loop."""
        if message.get("op") == "items":
            self.route(message["items"])
        elif message.get("op") == "log":
            record = log_record(self.name, message)
            logging.getLogger(record.name).handle(record)
        elif message.get("op") == "state":
            self._state(ModelInfo.from_dict(message["info"]))
            if message.get("reply"):
                self._answered()

    def _state(self, reported: ModelInfo) -> None:
        """A state message from the worker (on the loop)."""
        restarts = self.info.restarts
        if reported.state == "stopped" and self._stopping:
            return
        self.info = reported
        self.info.restarts = restarts
        if reported.state == "failed":
            log.error("model %s could not be loaded: %s", self.name, reported.error)
        if reported.state in ("ready", "failed"):
            self._loaded.set()
        if reported.state == "ready" and self._again:
            again, self._again = self._again, []
            self.resend(again)

    def _answered(self) -> None:
        for future in self._asked:
            if not future.done():
                future.set_result(None)

    # -- sending ---------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        conn = self._conn
        if conn is None:
            raise EngineRestarted(f"Model '{self.name}' is restarting; retry shortly.")
        try:
            with self._send_lock:
                conn.send_bytes(dumps(message))
        except (OSError, ValueError):
            raise EngineRestarted(f"Model '{self.name}' is restarting; retry shortly.") from None

    def send_job(self, message: dict[str, Any]) -> None:
        self._send({"op": "job", **message})

    def send_cancel(self, job_id: str) -> None:
        with contextlib.suppress(EngineRestarted):
            self._send({"op": "cancel", "id": job_id})

    def _fail_pending(self, error: Exception) -> None:
        failed = [(p.job, error) for p in self._pending.values()]
        self._pending.clear()
        self._again = []
        if failed:
            deliver(failed)


def _finish(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
