"""Constrained output of the transformers families (backends/hf_grammar.py): the server's GBNF
run by llguidance in the serial loop and the batched engine, in process on the tiny fixture.

The weights are random: only the grammar makes the output valid JSON, so every output is
parsed and validated; the finish reason tells that the grammar, not max_tokens, ended it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import llguidance
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.base import JSON_OUTPUT, GenerationParams, GenerationRequest, ModelSpec
from backends.errors import InvalidRequest
from backends.gptq import GPTQBackend, GPTQParams
from backends.grammar import GrammarLimits, prepare_grammar
from backends.hf import HFBackend
from backends.hf_grammar import to_lark
from backends.hfbatch import HFBatchEngine
from engine.ops import ModelLimits, prepare
from tests.api.test_openai import PERSON
from tests.backends import test_hf_batch
from tests.backends.conftest import TINY_GPTQ
from tests.backends.test_grammar import BOUNDED_PATTERNS, BOUNDED_SCHEMAS, validate

ASK = ({"role": "user", "content": "a person as JSON"},)


# the tiny model's backend (module scope) and its batching engine, as test_hf_batch has them
backend = test_hf_batch.backend
engine = test_hf_batch.engine


def asking(schema: Any = None, **params: Any) -> GenerationRequest:
    values = {"temperature": 1.0, "max_tokens": 400, **params}
    if schema is not None:
        values["json_schema"] = schema
    return GenerationRequest(messages=ASK, params=GenerationParams(**values))


def serial(backend: HFBackend | GPTQBackend, request: GenerationRequest) -> tuple[str, Any]:
    chunks = list(backend.generate(request))
    return "".join(c.text for c in chunks), chunks[-1]


def batched(engine: HFBatchEngine, requests: list[GenerationRequest]) -> list[tuple[str, Any]]:
    texts = dict.fromkeys(range(len(requests)), "")
    ends: dict[int, Any] = {}
    for key, request in enumerate(requests):
        engine.admit(key, request)
    while engine.active():
        for key, item in engine.step():
            if isinstance(item, Exception) or item.finish_reason:
                ends[key] = item
            else:
                texts[key] += item.text
    return [(texts[key], ends[key]) for key in range(len(requests))]


def test_the_family_declares_json_output(backend: HFBackend) -> None:
    assert JSON_OUTPUT in backend.capabilities


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_schema_output_validates_batched_and_serial_alike(
        backend: HFBackend, engine: HFBatchEngine, temperature: float) -> None:
    """Seeds decoded together (each its own mask) and one by one: the same text, each
    valid, each ended by the grammar."""
    requests = [asking(PERSON, seed=seed, temperature=temperature)
                for seed in range(4 if temperature else 2)]
    together = batched(engine, requests)
    for request, (text, end) in zip(requests, together, strict=True):
        assert end.finish_reason == "stop", (text, end)
        validate(json.loads(text), PERSON)
        assert (text, end) == serial(backend, request)
    if temperature:
        assert len({text for text, _ in together}) > 1  # the seeds were used


def test_constrained_and_free_sequences_share_a_batch(backend: HFBackend,
                                                      engine: HFBatchEngine) -> None:
    requests = [asking(PERSON, seed=1), asking(seed=1, max_tokens=20),
                asking(json_mode=True, seed=4, max_tokens=30), asking(seed=2, max_tokens=20)]
    done = batched(engine, requests)
    validate(json.loads(done[0][0]), PERSON)
    assert done[2][0].startswith("{") and done[2][1].finish_reason == "length"
    for request, result in zip(requests, done, strict=True):
        assert result == serial(backend, request)


def test_the_grammar_ending_on_the_last_allowed_token_is_a_stop(
        backend: HFBackend, engine: HFBatchEngine) -> None:
    """An output that ends in the grammar's last optional space allows nothing more: that
    token ends it (no EOS), and with max_tokens just that long it is still a "stop"."""
    for seed in range(16):
        text, end = serial(backend, asking(PERSON, seed=seed))
        if text.endswith(" "):
            break
    else:
        pytest.fail("no seed ended in the grammar's trailing space")
    exact = asking(PERSON, seed=seed, max_tokens=end.completion_tokens)
    assert serial(backend, exact) == (text, end)
    assert batched(engine, [exact]) == [(text, end)]
    short, cut = serial(backend, asking(PERSON, seed=seed, max_tokens=end.completion_tokens - 1))
    assert cut.finish_reason == "length" and text.startswith(short)


@settings(max_examples=30, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(schema=st.one_of(BOUNDED_SCHEMAS, BOUNDED_PATTERNS.map(
    lambda p: {"type": "string", "pattern": p})), seed=st.integers(0, 3))
def test_every_schema_the_server_writes_compiles_and_constrains(backend: HFBackend,
                                                                schema: Any,
                                                                seed: int) -> None:
    try:  # as the server's prepare step does it
        request = prepare(backend, ModelLimits(), asking(schema, seed=seed), clamp=False).request
    except InvalidRequest as err:  # the writer's refusals (tests/backends/test_grammar.py)
        assert err.param == "response_format" and "llguidance" not in err.message
        return
    text, end = serial(backend, request)
    assert end.finish_reason == "stop", (text, end)
    validate(json.loads(text), schema)


@pytest.mark.parametrize(("gbnf", "good", "bad"), [
    ('root ::= "a\\u00E9b"', "aéb", "aeb"),  # the converter wrote \uE9
    ('root ::= [\\u00E0-\\u00FF]{2}', "éà", "ea"),
    ('root ::= "x" [\\U0001F600-\\U0001F64F]', "x😀", "xa"),  # it wrote \U1F600
    ('root ::= "\\x5C" "\\u0022" [\\x5D]', '\\"]', '\\"['),  # ASCII by code
    ('root ::= "[" item{0} "]"\nitem ::= "1"', "[]", "[1]"),  # x{0}: rejected by Lark
    ('root ::= "a" ("b" "c"){0,0} "d"', "ad", "abcd"),
    ('root ::= "a" . "b"', "a\nb", "ab"),  # `.` is any character, a newline too
])
def test_the_converter_reads_gbnf_as_llama_cpp_does(backend: HFBackend, gbnf: str, good: str,
                                                    bad: str) -> None:
    compiler = backend._grammars
    assert compiler is not None
    tokenizer = compiler._llg_tokenizer()

    def accepts(text: str) -> bool:
        matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(
            to_lark(gbnf)), log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        ids = tokenizer.tokenize_str(text)
        return bool(matcher.validate_tokens(ids) == len(ids) and matcher.consume_tokens(ids)
                    and matcher.is_accepting())

    assert accepts(good) and not accepts(bad)


@pytest.mark.parametrize("gbnf", ['root ::= ( "a"', "root ::= missing-rule",
                                  'root ::= "a"{3,1}', "not a grammar at all"])
def test_a_grammar_llguidance_rejects_is_a_400_before_any_chunk(
        backend: HFBackend, engine: HFBatchEngine, gbnf: str) -> None:
    request = GenerationRequest(prompt="x", params=GenerationParams(json_mode=True,
                                                                   grammar=gbnf))
    stream = backend.generate(request)
    with pytest.raises(InvalidRequest, match="constrained decoding") as err:
        next(stream)
    assert err.value.param == "response_format"
    with pytest.raises(InvalidRequest, match="constrained decoding"):
        engine.admit(1, request)
    assert engine.active() == 0


def test_the_prepare_step_compiles_off_the_engine_and_refuses_there(
        backend: HFBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """ops.prepare (the tokenizer thread's step before admission) compiles the grammar, so
    the engine only copies it; a grammar llguidance rejects is the 400 of that step."""
    compiler = backend._grammars
    assert compiler is not None
    schema = {"type": "object", "properties": {"prepared": {"type": "integer"}},
              "required": ["prepared"], "additionalProperties": False}
    prepared = prepare(backend, ModelLimits(), asking(schema), clamp=False).request
    assert prepared.params.grammar in compiler._compiled
    monkeypatch.setattr(llguidance, "LLMatcher", None)  # the engine must not compile again
    text, end = serial(backend, prepared)
    assert end.finish_reason == "stop" and json.loads(text).keys() == {"prepared"}
    monkeypatch.undo()

    def unusable(gbnf: str) -> str:
        return "start: no_such_rule"

    monkeypatch.setattr("backends.hf_grammar.to_lark", unusable)
    with pytest.raises(InvalidRequest, match="constrained decoding") as err:
        prepare(backend, ModelLimits(), asking({"type": "array", "items": {"type": "null"}}),
                clamp=False)
    assert err.value.param == "response_format"
    tools = ({"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}},)
    with pytest.raises(InvalidRequest) as err:
        prepare(backend, ModelLimits(), GenerationRequest(
            messages=ASK, tools=tools, params=GenerationParams(tool_choice=("f",))),
            clamp=False)
    assert err.value.param == "tools" and "tools' parameter schemas" in err.value.message


def test_compiled_grammars_are_kept_by_text_and_bounded(backend: HFBackend) -> None:
    compiler = backend._grammars
    assert compiler is not None
    grammars = [prepare_grammar(GenerationParams(json_schema={"const": i}),
                                GrammarLimits()).grammar for i in range(40)]
    for gbnf in grammars:
        assert gbnf is not None
        compiler.matcher(gbnf, GenerationParams())
    assert len(compiler._compiled) == 32 and grammars[-1] in compiler._compiled
    assert grammars[0] not in compiler._compiled


def test_logits_past_the_tokenizers_vocabulary_are_never_allowed(backend: HFBackend) -> None:
    compiler = backend._grammars
    assert compiler is not None
    gbnf = prepare_grammar(GenerationParams(json_mode=True), GrammarLimits()).grammar
    assert gbnf is not None
    matcher = compiler.matcher(gbnf, GenerationParams())
    logits = torch.zeros((1, compiler.vocab_size + 40))
    masked = matcher.mask(logits)
    assert torch.isinf(masked[0, compiler.vocab_size:]).all()
    allowed = torch.isfinite(masked[0]).nonzero().flatten().tolist()
    assert allowed and all(backend.detokenize([t]).strip().startswith("{")
                           for t in allowed if backend.detokenize([t]).strip())


def test_gptq_inherits_constrained_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
    gptq = GPTQBackend.load(ModelSpec(name="q", path=TINY_GPTQ,
                                      params=GPTQParams(device_map="cpu")))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "color": {"enum": ["red", "green"]}},
              "required": ["ok", "color"], "additionalProperties": False}
    try:
        assert isinstance(gptq, GPTQBackend) and JSON_OUTPUT in gptq.capabilities
        text, end = serial(gptq, asking(schema, seed=0))
        assert end.finish_reason == "stop", (text, end)
        validate(json.loads(text), schema)
    finally:
        gptq.close()
