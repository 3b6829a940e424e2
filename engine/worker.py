"""The main of a local worker process: one model, served over a `multiprocessing` pipe to
the API process that spawned it.

Messages are JSON (`engine.wire`). From the API: `{"op": "job", ...}` (see
`engine.host.ModelHost.open`), `{"op": "cancel", "id"}`, `{"op": "stop"}`. To the API:
`{"op": "state", "info"}` when the model's state changes, and `{"op": "items", "items"}`:
the items of one decode step, of every job it advanced, in one message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from engine.host import Batch, HostSink, ModelHost
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


def local_main(conn: Connection, entry: Any, models_dir: Path, log_level: int) -> None:
    """Serve `entry`'s model over `conn` until told to stop or the API process is gone."""
    logging.basicConfig(level=log_level,
                        format=f"%(levelname)s [worker {entry.name} pid {os.getpid()}] "
                               "%(name)s: %(message)s")
    # Ctrl-C reaches the whole process group: the API process decides when this one stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from engine.loading import load_model

    lock = threading.Lock()

    def send(message: dict[str, Any]) -> None:
        data = dumps(message)
        with lock:
            conn.send_bytes(data)

    def post(batch: Batch) -> None:
        send({"op": "items", "items": batch})

    host = ModelHost(entry.name, lambda: load_model(entry, models_dir), limits_of(entry),
                     on_state=lambda s: send({"op": "state", "info": host.info()}))
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
            elif op == "stop":
                break
    finally:
        with contextlib.suppress(Exception):
            host.stop()
