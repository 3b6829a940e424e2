"""The main of a local worker process: one model, served over a `multiprocessing` pipe to
the API process that spawned it.

Messages are JSON (`engine.wire`). From the API: `{"op": "job", ...}` (see
`engine.host.ModelHost.open`), `{"op": "cancel", "id"}`, `{"op": "info"}`, `{"op": "stop"}`.
To the API: `{"op": "state", "info"}` when the model's state changes or when asked, and
`{"op": "items", "items"}`: the items of one decode step, of every job it advanced, in one
message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from engine.host import Batch, HostSink, ModelHost
from engine.logctx import RequestIdFilter
from engine.ops import ModelLimits
from engine.wire import dumps, loads

log = logging.getLogger(__name__)


def limits_of(entry: Any) -> ModelLimits:
    """A config entry's (`app.settings.ModelEntry`) serving limits."""
    from backends.grammar import GrammarLimits

    return ModelLimits(max_queue=entry.max_queue, request_timeout=entry.request_timeout,
                       default_max_tokens=entry.default_max_tokens,
                       prompt_chars_per_token=entry.prompt_chars_per_token,
                       grammar=GrammarLimits(entry.max_grammar_repeat, entry.max_grammar_bytes))


def settings_payload(settings: Any, name: str) -> dict[str, Any]:
    """What a worker needs of the server's settings, as plain data (`entry_of` rebuilds
    them): the models and the server's limits, no secrets (keys, database URLs)."""
    payload: dict[str, Any] = settings.model_dump(
        mode="json", exclude_unset=True, include={"models_dir", "server", "models"})
    # only its own model: another one's family may not be importable there (a test's)
    payload["models"] = {name: payload["models"][name]}
    return payload


def entry_of(payload: dict[str, Any], name: str) -> Any:
    """Model `name`'s config entry, resolved in this process (its family's class too)."""
    from app.settings import Settings, model_entries

    settings = Settings(**payload)
    return next(e for e in model_entries(settings) if e.name == name), settings.models_dir


@dataclass(frozen=True)
class Where:
    """The API process's environment, directory and log level, for its worker to take."""

    env: dict[str, str]
    cwd: str
    log_level: int


_FORMAT = logging.Formatter()


class PipeLogHandler(logging.Handler):
    """Sends the worker's log records to the API process, which logs them as its own (one
    log for the server, whatever its handlers and format)."""

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            error = _FORMAT.formatException(record.exc_info) if record.exc_info else None
            self.send({"op": "log", "name": record.name, "level": record.levelno,
                       "message": record.getMessage(), "error": error,
                       "request_id": getattr(record, "request_id", None)})
        except Exception:  # noqa: BLE001 - the API process is gone
            self.handleError(record)


def log_record(model: str, message: dict[str, Any]) -> logging.LogRecord:
    """A log record sent by model `model`'s worker, as the API process logs it."""
    level = int(message.get("level", logging.INFO))
    return logging.makeLogRecord({
        "name": str(message.get("name", "engine")), "levelno": level,
        "levelname": logging.getLevelName(level),
        "msg": f"[worker {model}] {message.get('message', '')}",
        "exc_text": message.get("error"), "request_id": message.get("request_id")})


def local_main(conn: Connection, payload: dict[str, Any], name: str, where: Where) -> None:
    """Serve model `name` over `conn` until told to stop or the API process is gone."""
    os.environ.clear()
    os.environ.update(where.env)
    os.chdir(where.cwd)
    # Ctrl-C reaches the whole process group: the API process decides when this one stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from engine.loading import load_model

    lock = threading.Lock()

    def send(message: dict[str, Any]) -> None:
        data = dumps(message)
        with lock:
            conn.send_bytes(data)

    root = logging.getLogger()
    handler = PipeLogHandler(send)
    handler.addFilter(RequestIdFilter())
    root.handlers[:] = [handler]
    root.setLevel(where.log_level)

    try:
        entry, models_dir = entry_of(payload, name)
    except Exception as exc:  # noqa: BLE001 - the API reports it; restarting will not help
        log.exception("the worker could not read its settings")
        send({"op": "state", "info": {"state": "failed", "error": (
            f"its worker process could not read the settings ({type(exc).__name__})")}})
        with contextlib.suppress(EOFError, OSError):
            conn.recv_bytes()  # until the API process stops it
        return

    def post(batch: Batch) -> None:
        send({"op": "items", "items": batch})

    stopping = threading.Event()

    def on_state(scheduler: Any) -> None:
        send({"op": "state", "info": host.info()})
        if scheduler.state == "stopped" and not stopping.is_set():
            # The engine thread ended on its own (a bug, not a request's error): a worker
            # that cannot serve ends, and its supervisor starts a new one.
            log.error("model %s: its engine stopped; the worker exits", name)
            os._exit(70)

    host = ModelHost(entry.name, lambda: load_model(entry, models_dir), limits_of(entry),
                     on_state=on_state)
    sink = HostSink(host, post)
    host.start()
    try:
        while True:
            try:
                message = loads(conn.recv_bytes())
            except (EOFError, OSError):
                break  # the API process is gone
            op = message.get("op")
            if op == "job":
                host.open(sink, message)
            elif op == "cancel":
                host.cancel(str(message["id"]))
            elif op == "info":
                send({"op": "state", "info": host.info(), "reply": True})
            elif op == "stop":
                break
    finally:
        stopping.set()
        with contextlib.suppress(Exception):
            host.stop()
