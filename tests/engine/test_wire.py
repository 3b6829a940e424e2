"""What crosses a process boundary survives the trip: requests, chunks, results, errors."""

from __future__ import annotations

from typing import Any

import pytest

from app.errors import Overloaded, QuotaExceeded, spec_for
from backends.base import Chunk, GenerationParams, GenerationRequest, TokenLogprob
from backends.errors import BackendFailure, ContextLengthExceeded, LLMAPIError
from engine.errors import EngineRestarted
from engine.jobs import END
from engine.ops import Prepared
from engine.wire import dumps, error_in, item_in, item_out, loads, request_in, request_out


def trip(item: Any) -> Any:
    kind, payload = loads(dumps({"item": item_out(item)}))["item"]
    return item_in(kind, payload)


def test_a_request_with_hostile_values_comes_back_equal() -> None:
    schema = {"$": "error", "class": "x", "type": "object",
              "properties": {"\u0000 é 日本": {"const": "</s><|im_end|>"}}}
    request = GenerationRequest(
        messages=({"role": "user", "content": "héllo \ud7ff ✓"},),
        params=GenerationParams(max_tokens=5, stop=("\n", "</s>"), seed=7, json_schema=schema,
                                grammar='root ::= "x"', logprobs=2),
        prompt_ids=(1, 2, 3))
    assert request_in(loads(dumps(request_out(request)))) == request


def test_items_come_back_equal() -> None:
    chunk = Chunk("ü", "stop", 3, 4, (TokenLogprob(b"\xc3", -0.5, ((b"\xff", -1.0),)),))
    assert trip(chunk) == chunk
    assert trip(END) is END
    vectors = [[0.1, -2.5e-8, 3.0], [1.0, 0.0, -0.0]]
    assert trip(vectors) == vectors
    assert trip([5, 6]) == [5, 6] and trip("text") == "text"
    prepared = Prepared(GenerationRequest(prompt="p", prompt_ids=(1,)), 17, 9)
    assert trip(prepared) == prepared


@pytest.mark.parametrize("error", [
    ContextLengthExceeded(prompt_tokens=9, max_tokens=3, context_length=8, param="messages"),
    Overloaded("busy", retry_after=7),
    EngineRestarted("restarting"),
    QuotaExceeded("over", retry_after=3, headers={"X-RateLimit-Limit": "5"}),
])
def test_domain_errors_keep_their_class_status_and_details(error: LLMAPIError) -> None:
    back = trip(error)
    assert type(back) is type(error) and spec_for(back) == spec_for(error)
    assert (back.message, back.param) == (error.message, error.param)
    assert getattr(back, "retry_after", None) == getattr(error, "retry_after", None)


def test_other_exceptions_and_unknown_classes_become_a_generic_failure() -> None:
    back = trip(RuntimeError("secret /srv/models detail"))
    assert isinstance(back, BackendFailure) and "secret" not in back.message
    assert isinstance(error_in({"class": "os:system", "message": "x"}), BackendFailure)
    assert isinstance(error_in({"class": "builtins:Exception"}), BackendFailure)
