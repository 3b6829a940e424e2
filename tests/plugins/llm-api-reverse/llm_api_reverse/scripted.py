"""A test family whose prompt is a script of what the engine does, so tests can make an engine
fail after a stream began, or keep a stream running until the server cancels it, without
depending on what a real model generates or how fast.

The script is the prompt (for chat: the last message's content):

- `pieces then fail`: yields the pieces "one" and " two", then the engine fails;
- `endless`: yields "tick " every `pace` seconds (model_params, default 0.02) up to
  max_tokens; when the stream is closed before that, the log says so (a test's server-side
  evidence that a cancellation reached the engine);
- `crash after N`: yields "tick " N times, then the process dies of SIGSEGV, as a fault in
  native code would end it, unless the file `model_params.crash_marker` exists (the
  script crashes once per marker: a rerun completes). Only for a model in a worker process;
- anything else: the text itself, as one piece.

`model_params.crash_on_load: true` makes loading end the process the same way.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable, Iterator
from typing import ClassVar

from pydantic import Field

from backends.base import (
    CHAT,
    GENERATE,
    Backend,
    Chunk,
    GenerationRequest,
    ModelParams,
    ModelSpec,
)

log = logging.getLogger(__name__)

PIECES_THEN_FAIL = "pieces then fail"
ENDLESS = "endless"
#: What `pieces then fail` streams before the engine fails.
PIECES = ("one", " two")
#: The failure's message: internal detail that must never reach a client.
SECRET = "secret internal detail at /srv/models"
#: The log line (a %-format) when an `endless` stream is closed before max_tokens.
CLOSED_EARLY = "scripted stream closed after %d of %d pieces"


CRASH_AFTER = "crash after "


class ScriptedParams(ModelParams):
    pace: float = Field(0.02, gt=0, le=1, description="Seconds between `endless` pieces.")
    crash_on_load: bool = False
    crash_marker: str | None = None


def _crash() -> None:
    """End this process the way a segfault in native code does."""
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(10)  # the signal is on its way


class ScriptedBackend(Backend):
    family = "scripted"
    Params: ClassVar[type[ModelParams]] = ScriptedParams
    weights: ClassVar[str | None] = None
    capabilities = frozenset({GENERATE, CHAT})

    def __init__(self, pace: float, crash_marker: str | None = None) -> None:
        self.pace = pace
        self.crash_marker = crash_marker

    @classmethod
    def load(cls, spec: ModelSpec) -> Backend:
        assert isinstance(spec.params, ScriptedParams)
        if spec.params.crash_on_load:
            _crash()
        return cls(spec.params.pace, spec.params.crash_marker)

    def apply_chat_template(self, messages: Iterable[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages)

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        script = request.messages[-1]["content"] if request.messages else request.prompt or ""
        yield Chunk()  # accepted: the response may start
        if script == PIECES_THEN_FAIL:
            for piece in PIECES:
                yield Chunk(text=piece)
            raise RuntimeError(SECRET)
        if script == ENDLESS:
            yield from self._endless(request.params.max_tokens or 1_000_000)
            return
        if script.startswith(CRASH_AFTER):
            yield from self._crash_after(int(script.removeprefix(CRASH_AFTER)))
            return
        yield Chunk(text=script)
        yield Chunk(finish_reason="stop", prompt_tokens=0, completion_tokens=1)

    def _crash_after(self, count: int) -> Iterator[Chunk]:
        for _ in range(count):
            yield Chunk(text="tick ")
            time.sleep(self.pace)
        marker = self.crash_marker
        if marker is None or not os.path.exists(marker):
            if marker is not None:
                open(marker, "w").close()  # noqa: SIM115 - the next run completes
            _crash()
        yield Chunk(text="done")
        yield Chunk(finish_reason="stop", prompt_tokens=0, completion_tokens=count + 1)

    def _endless(self, limit: int) -> Iterator[Chunk]:
        sent = 0
        try:
            while sent < limit:
                yield Chunk(text="tick ")
                sent += 1
                time.sleep(self.pace)
        except GeneratorExit:  # the scheduler closes a cancelled job's stream
            log.warning(CLOSED_EARLY, sent, limit)
            raise
        yield Chunk(finish_reason="length", prompt_tokens=0, completion_tokens=sent)
