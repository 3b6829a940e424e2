"""A model family whose pace the test sets, so a test never guesses how fast the machine is.

Its `load` waits until the test opens `Gate.loaded`; each generation yields `before_gate`
pieces, sets `Gate.reached` and waits until the test opens `Gate.opened`, then yields the
rest. A test that needs "a request still running" waits for `reached` (an event, not a
sleep), looks at the server, and opens the gate when it is done looking.

Use: `gate = gated_family(request)`, then `gate.model()` as a model's config entry.
Each piece is the text "." (one token); a prompt's tokens are its words.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from backends import registry
from backends.base import (
    GENERATE,
    TOKENIZE,
    Backend,
    Chunk,
    GenerationRequest,
    ModelParams,
    ModelSpec,
)

#: Generous: a gate a test forgot to open fails the request instead of hanging the run.
GATE_TIMEOUT = 120.0
GATES: dict[str, Gate] = {}


@dataclass
class Gate:
    """The events a gated model waits on (`loaded`, `opened`) and the one it sets."""

    name: str = field(default_factory=lambda: f"gate-{uuid.uuid4().hex[:8]}")
    loaded: threading.Event = field(default_factory=threading.Event)
    opened: threading.Event = field(default_factory=threading.Event)
    reached: threading.Event = field(default_factory=threading.Event)

    def model(self, before_gate: int = 1) -> dict[str, Any]:
        """This gate's model, as a `models:` entry of a config."""
        return {"model_family": "gated", "placement": "inprocess",  # the gate is in this process
                "model_params": {"gate": self.name, "before_gate": before_gate}}

    def open_all(self) -> None:
        self.loaded.set()
        self.opened.set()

    def wait_reached(self) -> None:
        assert self.reached.wait(GATE_TIMEOUT), "no generation reached the gate"


def _wait(event: threading.Event, what: str) -> None:
    if not event.wait(GATE_TIMEOUT):
        raise RuntimeError(f"the test never opened the gate ({what})")


class GatedBackend(Backend):
    family = "gated"
    capabilities = frozenset({GENERATE, TOKENIZE})
    weights: ClassVar[str | None] = None

    class Params(ModelParams):
        gate: str
        before_gate: int = 1

    def __init__(self, gate: Gate, before_gate: int) -> None:
        self.gate = gate
        self.before_gate = before_gate

    @classmethod
    def load(cls, spec: ModelSpec) -> Backend:
        params = spec.params
        assert isinstance(params, cls.Params)
        gate = GATES[params.gate]
        _wait(gate.loaded, "load")
        return cls(gate, params.before_gate)

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return list(range(len(text.split())))

    def detokenize(self, ids: list[int]) -> str:
        return " ".join("w" for _ in ids)

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        prompt = len(self.tokenize(request.prompt or ""))
        count = request.params.max_tokens or 16
        yield Chunk(prompt_tokens=prompt)  # accepted
        for i in range(count):
            if i == self.before_gate:
                self.gate.reached.set()
                _wait(self.gate.opened, "generation")
            yield Chunk(text=".")
        yield Chunk(finish_reason="length", prompt_tokens=prompt, completion_tokens=count)


def gated_family(request: pytest.FixtureRequest, loaded: bool = True,
                 opened: bool = False) -> Gate:
    """Make the `gated` family available for this test and return a new gate for it. The
    gate opens when the test ends, so a failing test does not leave its server's engine
    thread waiting (the server's shutdown would wait for it)."""
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setitem(registry.BUILTIN_FAMILIES, "gated", "tests.gated:GatedBackend")
    gate = Gate()
    if loaded:
        gate.loaded.set()
    if opened:
        gate.opened.set()
    monkeypatch.setitem(GATES, gate.name, gate)
    # registered after the test's server fixtures, so it runs before they stop their servers
    request.addfinalizer(gate.open_all)
    return gate
