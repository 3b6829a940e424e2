"""The worker side of a transport: one model's scheduler, serving jobs that arrive as
messages and sending their items back, numbered, one message per decode step.

`ModelHost` is what a local worker process and a Redis worker have in common; each gives it
a `post` function that sends a batch of `(job id, sequence number, [kind, payload])` the
way its transport does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from backends.base import Backend
from engine.errors import as_domain_error
from engine.inprocess import bind_call
from engine.jobs import END, Job
from engine.logctx import MAX_REQUEST_ID
from engine.ops import CALLS, ModelLimits
from engine.scheduler import ModelScheduler
from engine.wire import item_out, request_in

log = logging.getLogger(__name__)

Batch = list[tuple[str, int, list[Any]]]


class HostSink:
    """Numbers a job's items and posts each delivered batch as one message."""

    def __init__(self, host: ModelHost, post: Callable[[Batch], None]) -> None:
        self.host = host
        self.post = post

    def deliver(self, items: list[tuple[Job, Any]]) -> None:
        batch: Batch = []
        for job, item in items:
            batch.append((job.id, job.seq, item_out(item)))
            job.seq += 1
            if item is END or isinstance(item, BaseException):
                self.host.forget(job.id)
        try:
            self.post(batch)
        except Exception:  # noqa: BLE001 - the API side is gone; its jobs end by cancel
            log.warning("model %s: could not send results", self.host.name, exc_info=True)


class ModelHost:
    """Runs one model for a transport."""

    def __init__(self, name: str, loader: Callable[[], Backend], limits: ModelLimits,
                 on_state: Callable[[ModelScheduler], None] | None = None) -> None:
        self.name = name
        self.limits = limits
        self.scheduler = ModelScheduler(name, loader, max_queue=limits.max_queue,
                                        on_state=on_state)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    def info(self) -> dict[str, Any]:
        s, backend = self.scheduler, self.scheduler.backend
        return {"state": s.state, "error": s.error,
                "capabilities": sorted(backend.capabilities) if backend else [],
                "context_length": backend.context_length if backend else None,
                "stats": {**s.stats.as_dict(), **(backend.engine_stats() if backend else {})},
                "load": s.load, "tool_format": backend.tool_format if backend else "json",
                "reasoning": backend.reasoning if backend else None}

    def open(self, sink: HostSink, message: dict[str, Any]) -> Job:
        """Start the job a message describes: {"id", "timeout", and "request" (a
        generation), "texts" (an embedding) or "call": [name, args]}. A job that cannot be
        accepted gets its error as its one item."""
        request_id = message.get("request_id")
        job = Job(sink=sink, deadline=time.monotonic() + float(message["timeout"]),
                  id=str(message["id"]),
                  request_id=str(request_id)[:MAX_REQUEST_ID] if request_id else None)
        with self._lock:
            self._jobs[job.id] = job
        try:
            if "call" in message:
                name, args = message["call"]
                if name == "prepare":
                    args = [request_in(args[0]), bool(args[1])]
                self.scheduler.submit_call(job, bind_call(CALLS[name], self.limits, tuple(args)))
            elif "request" in message:
                job.request = request_in(message["request"])
                self.scheduler.submit(job)
            else:
                job.texts = [str(t) for t in message["texts"]]
                self.scheduler.submit(job)
        except Exception as exc:  # noqa: BLE001 - becomes the client's error
            job.emit(as_domain_error(exc))
        return job

    def cancel(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None:
            job.cancel()

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def running(self) -> int:
        with self._lock:
            return len(self._jobs)
