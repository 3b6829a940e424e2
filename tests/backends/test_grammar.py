"""JSON-schema grammars (backends/grammar*.py): every schema gives output that validates, or
a 400 naming the keyword; what llama.cpp would reject or choke on never reaches it.

Outputs are generated on the tiny GGUF (random weights: only the grammar makes them valid)
and checked with `jsonschema`. The strategies at the end are shared with the HTTP property
test (tests/api/test_grammar_http.py).
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jsonschema
import llama_cpp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.base import GenerationParams, GenerationRequest, ModelSpec
from backends.errors import InvalidRequest
from backends.grammar import GrammarLimits, grammar_sampler, prepare_grammar, schema_grammar
from backends.grammar_gbnf import Rules
from backends.grammar_regex import pattern_grammar
from backends.llama import LlamaBackend, LlamaParams
from tests.conftest import TINY_GGUF

DEFAULTS = GrammarLimits()  # server.max_grammar_repeat and _bytes as shipped


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaBackend]:
    loaded = LlamaBackend.load(ModelSpec(name="tiny", path=TINY_GGUF,
                                         params=LlamaParams(n_ctx=2048, n_threads=2)))
    assert isinstance(loaded, LlamaBackend)
    yield loaded
    loaded.close()


def validate(value: Any, schema: Any) -> None:
    """jsonschema's verdict, formats included (time and date-time by hand: jsonschema's
    checkers of those need a package this project does not install)."""
    validator = jsonschema.Draft202012Validator
    validator(schema, format_checker=validator.FORMAT_CHECKER).validate(value)
    fmt = schema.get("format") if isinstance(schema, dict) else None
    if fmt in ("time", "date-time"):
        parse = datetime.time if fmt == "time" else datetime.datetime
        assert parse.fromisoformat(value).tzinfo is not None, value


def generate(backend: LlamaBackend, schema: Any, seed: int,
             max_tokens: int = 600) -> tuple[str, str | None]:
    """The text and finish reason of a generation constrained by `schema`, its grammar
    prepared as the server prepares it (written, then parsed by llama.cpp)."""
    params = prepare_grammar(GenerationParams(max_tokens=max_tokens, temperature=1.0, seed=seed,
                                              json_mode=True, json_schema=schema),
                             DEFAULTS, backend.vocab)
    chunks = list(backend.generate(GenerationRequest(prompt="JSON:", params=params)))
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


def refused(schema: Any, limits: GrammarLimits = DEFAULTS) -> str:
    with pytest.raises(InvalidRequest) as err:
        schema_grammar(schema, limits)
    assert err.value.param == "response_format"
    err.value.message.encode("utf-8")  # a response can carry it (no lone surrogate)
    return err.value.message


# -- the reproductions of issue #22 -------------------------------------------------------

@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "maxLength": 1500}, ("schema.maxLength", "1500", "500",
                                             "server.max_grammar_repeat")),
    ({"type": "string", "maxLength": 100000}, ("schema.maxLength", "100000")),
    ({"type": "string", "minLength": 501}, ("schema.minLength", "501")),
    ({"type": "array", "maxItems": 5000}, ("schema.maxItems", "5000")),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 600}, ("schema.minItems",)),
    ({"type": "string", "pattern": "a{100000000}"}, ("pattern", "{100000000}", "100000000",
                                                     "server.max_grammar_repeat")),
    ({"type": "string", "pattern": "^(\\d{100}){100}$"}, ("pattern", "10000", "x100")),
    ({"type": "string", "pattern": "^a{99999999999}$"}, ("pattern", "not a valid regular")),
])
def test_oversized_repetitions_are_refused(schema: dict[str, Any],
                                           words: tuple[str, ...]) -> None:
    message = refused(schema)
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("pattern, sample", [
    ("^\\d{5}$", "12345"), ("^\\w{1,6}$", "a_1"), ("^a\\sb$", "a b"),
    ("^\\d{1,4}\\.\\d{2}$", "3.14"), ("^[^\\s@]{1,8}@[^\\s@]{1,8}\\.[a-z]{2,4}$", "x@y.com"),
    ("^\\D\\W\\S$", "a-b"), ("^\\-?\\d{1,3}(,\\d{3}){0,2}$", "-1,234"),
    ("^[A-Z]{2}-\\d{4}/[a-f0-9]{2}$", "AB-1234/0f"),
])
def test_regex_escapes_are_enforced(backend: LlamaBackend, pattern: str, sample: str) -> None:
    """The escapes the old converter passed through (llama.cpp rejected them: NULL, then a
    segfault) now constrain the output."""
    assert re.search(pattern, sample)  # the pattern means what the test thinks
    schema = {"type": "string", "pattern": pattern}
    grammar = schema_grammar(schema, GrammarLimits())
    assert "\\d" not in grammar and "\\w" not in grammar and "\\s" not in grammar
    for seed in range(3):
        text, finish = generate(backend, schema, seed)
        assert finish == "stop", text
        validate(json.loads(text), schema)


@pytest.mark.parametrize("pattern, what", [
    ("(a)\\1", "backreferences"), ("^a(?=b)", "lookahead"), ("(?<!a)b", "lookbehind"),
    ("\\bword\\b", "word boundaries"), ("(?i)abc", "flags"), ("^a++$", "possessive"),
    ("^(?>a)$", "atomic"), ("^(a?){3}$", "can match nothing"), ("^(a|)+$", "can match nothing"),
    ("a^b", "^ or $ inside"), ("[", "not a valid regular expression"),
    ("^\\ud800$", "surrogate"), ("^[^\\x00-\\U0010ffff]$", "matches no character"),
])
def test_unsupported_regex_is_refused_by_name(pattern: str, what: str) -> None:
    message = refused({"type": "string", "pattern": pattern})
    assert what in message and "schema.pattern" in message, message


# -- keywords: output that validates, or a 400 naming the keyword -------------------------

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "id"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "id": {"type": "string", "format": "uuid"},
                         "born": {"type": "string", "format": "date"},
                         "tags": {"type": "array", "items": {"enum": ["a", "é", "日本", 7]},
                                  "minItems": 1, "maxItems": 3}}}
VALID = {
    "pattern": {"type": "string", "pattern": "^[a-z]{2,4}-\\d{3}$"},
    "format date": {"type": "string", "format": "date"},
    "format time": {"type": "string", "format": "time"},
    "format date-time": {"type": "string", "format": "date-time"},
    "format uuid": {"type": "string", "format": "uuid"},
    "$ref/$defs": {"$defs": {"p": PERSON}, "type": "array", "items": {"$ref": "#/$defs/p"},
                   "maxItems": 2},
    "recursive $ref": {"$defs": {"n": {"type": "object", "required": ["v", "next"],
                                       "properties": {"v": {"type": "integer"}, "next": {
                                           "anyOf": [{"$ref": "#/$defs/n"},
                                                     {"type": "null"}]}}}},
                       "$ref": "#/$defs/n"},
    "anyOf": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3},
                        {"type": "null"}]},
    "oneOf of distinct types": {"oneOf": [{"type": "boolean"}, {"type": "null"}]},
    "const": {"const": {"k": ["ü", 1.5, None, True]}},
    "enum with unicode": {"enum": ["日本語", "emoji 😀", "quote \" and \\", "tab\t", 3, None]},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "integer"}, {"const": "x"}],
                    "items": False, "minItems": 1},
    "prefixItems then items": {"type": "array", "prefixItems": [{"type": "boolean"}],
                               "items": {"type": "null"}, "minItems": 3, "maxItems": 4},
    "minItems": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 5},
    "minLength": {"type": "string", "minLength": 3, "maxLength": 5},
    "type list": {"type": ["string", "null"], "maxLength": 2},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}},
                         "required": ["a"]},
                        {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
    "object": PERSON,
    "empty object": {"type": "object", "additionalProperties": False},
    "additionalProperties schema": {"type": "object", "properties": {"a": {"type": "null"}},
                                    "additionalProperties": {"type": "integer"}},
    "JSON escapes in strings": {"type": "string", "pattern": '^["\\\\\\x00-\\x1f/]{3}$'},
}


@pytest.mark.parametrize("name", list(VALID))
def test_output_validates_against_the_schema(backend: LlamaBackend, name: str) -> None:
    schema = VALID[name]
    jsonschema.Draft202012Validator.check_schema(schema)
    for seed in range(3):
        text, finish = generate(backend, schema, seed)
        assert finish == "stop", (seed, text)
        validate(json.loads(text), schema)


def test_unanchored_pattern_allows_text_around_the_match(backend: LlamaBackend) -> None:
    """Like re.search: a pattern without $ may be followed by anything, so a random model
    may run to max_tokens; the text so far is then a string the pattern already matches
    (closing the quote makes it valid)."""
    schema = {"type": "string", "pattern": "^\\d{2}[a-f]"}
    finishes = set()
    for seed in range(3):
        text, finish = generate(backend, schema, seed, max_tokens=100)
        finishes.add(finish)
        if finish == "length":  # cut anywhere, maybe inside an escape: close it before
            text = next(t for t in (text[:len(text) - k] + '"' for k in range(6))
                        if _parses(t))
        validate(json.loads(text), schema)
    assert finishes <= {"stop", "length"}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("schema, words", [
    ({"type": "integer", "minimum": 3}, ("schema.minimum",)),
    ({"x": {"maximum": 3}, "$ref": "#/x"}, ("schema(#/x) uses maximum",)),
    ({"properties": {"\ud800": {"minimum": 1}}}, ("properties.\\ud800.minimum",)),
    ({"allOf": [{"$ref": "#/x"}, {}], "x": {"minProperties": 1}}, ("allOf[0]",)),
    ({"type": "string", "format": "email"}, ("format 'email'", "date, time")),
    ({"type": "string", "pattern": "^a$", "maxLength": 3}, ("pattern", "maxLength")),
    ({"type": "object", "properties": {}, "required": ["a"]}, ("required", "'a'")),
    ({"type": "array", "items": [{"type": "integer"}]}, ("prefixItems",)),
    ({"$ref": "https://example.com/s.json"}, ("$ref",)),
    ({"$ref": "#/$defs/missing"}, ("points to nothing",)),
    ({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}},
      "$ref": "#/$defs/a"}, ("refers to itself",)),
    ({"type": "object", "anyOf": [{"required": ["a"]}]}, ("anyOf beside type",)),
    ({"allOf": [{"type": "string"}, {"maxLength": 2}]}, ("allOf",)),
    ({"enum": [1, 2], "type": "string"}, ("no value of its enum",)),
    ({"const": float("nan")}, ("NaN",)),
    ({"type": "text"}, ("schema.type",)),
    ({"type": "array", "minItems": 3, "maxItems": 2}, ("minItems (3)", "maxItems (2)")),
    ({"type": "array", "prefixItems": [{}], "items": False, "minItems": 2}, ("minItems",)),
    ({"type": "string", "maxLength": -1}, ("non-negative",)),
    ({"properties": {"a": False}, "required": ["a"]}, ("schema.properties.a",)),
])
def test_what_cannot_be_enforced_is_refused_by_name(schema: Any,
                                                    words: tuple[str, ...]) -> None:
    message = refused(schema)
    for word in words:
        assert word in message, (word, message)


def test_schema_depth_and_size_are_bounded() -> None:
    deep: dict[str, Any] = {"type": "integer"}
    for _ in range(100):
        deep = {"type": "array", "items": deep}
    assert "nests deeper than 64" in refused(deep)
    chain = {"$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(40)},
             "$ref": "#/$defs/d0"}
    chain["$defs"]["d40"] = {"type": "integer"}
    assert "counting each $ref" in refused(chain)
    assert "values" in refused({"enum": list(range(30_000))})


def test_grammar_size_is_bounded_by_the_setting() -> None:
    schema = {"enum": [f"{i:0100d}" for i in range(1000)]}  # ~100 kB of literals
    message = refused(schema)
    assert "server.max_grammar_bytes" in message and "65536" in message
    assert schema_grammar(schema, GrammarLimits(max_bytes=200_000))
    # repetitions count as llama.cpp expands them, not as written
    items = {"type": "array", "items": {"type": "string", "maxLength": 400}, "maxItems": 400}
    assert "server.max_grammar_bytes" in refused(items, GrammarLimits(max_bytes=4096))


def test_repeat_limit_is_the_setting() -> None:
    assert "(10, server.max_grammar_repeat)" in refused(
        {"type": "string", "maxLength": 11}, GrammarLimits(max_repeat=10))
    assert schema_grammar({"type": "string", "maxLength": 10}, GrammarLimits(max_repeat=10))


def test_a_grammar_llama_cpp_rejects_is_a_400_not_a_crash(backend: LlamaBackend) -> None:
    """The engine checks llama.cpp's answer for NULL (it used to add it to the chain)."""
    bad = GenerationParams(max_tokens=4, temperature=1.0, json_mode=True,
                           grammar='root ::= "\\d"')
    with pytest.raises(InvalidRequest) as err:
        list(backend.generate(GenerationRequest(prompt="x", params=bad)))
    assert err.value.param == "response_format"
    with pytest.raises(InvalidRequest):  # the same check that runs before admission
        llama_cpp.llama_sampler_free(grammar_sampler(llama_cpp, backend.vocab,
                                                     'root ::= "\\d"'))
    text, finish = generate(backend, {"type": "boolean"}, 0)  # the engine still serves
    assert finish == "stop" and json.loads(text) in (True, False)


def test_additional_keys_never_repeat_a_declared_one() -> None:
    """A JSON parser keeps the last of two equal keys, so an additional member named like
    a declared property could replace its value: the key grammar excludes those names."""
    grammar = schema_grammar({"type": "object", "properties": {"ab": {"type": "null"}},
                              "additionalProperties": {"type": "integer"}}, GrammarLimits())
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines())
    quote = '"\\x22"'
    name = re.search(re.escape(quote) + r" (key-\d+)", grammar)
    assert name is not None
    start = rules[name[1]].split(" | ")  # after the opening quote
    assert start[0] == quote  # "" is a fine additional key
    assert "a" not in start[1].split("]")[0].replace("\\x", "")  # 'a' goes down the trie:
    after_a = rules[re.search(r'"a" (key-\d+)', rules[name[1]])[1]]  # type: ignore[index]
    assert after_a.startswith(quote)  # "a" is fine too
    after_ab = rules[re.search(r'"b" (key-\d+)', after_a)[1]]  # type: ignore[index]
    assert not after_ab.startswith(quote)  # "ab" is not: the key must go on


# -- converting costs work in proportion to what it writes (issue #22, red team) ----------
# It runs holding the GIL: every other request waits meanwhile. What it costs is counted
# here (characters handed to the rules and literals, schemas visited, pattern characters
# parsed, functions called), not timed. Before the bounds, the schemas below took up to
# 80 s of CPU, or wrote megabytes of rules, before the size check refused them (or never
# were refused: a long pattern under a key of an enum, a part written 300 times).

class Work:
    """What converting one schema did."""

    def __init__(self) -> None:
        self.written = 0  # characters of rule bodies and literals written
        self.visits = 0  # schemas converted (SchemaGrammar.value calls)
        self.parsed = 0  # characters of patterns handed to re's parser
        self.calls = 0  # functions called, Python's and C's (with `counting_calls`)

    @contextmanager
    def counting_calls(self) -> Iterator[None]:
        def profile(_frame: Any, event: str, _arg: Any) -> None:
            if event in ("call", "c_call"):
                self.calls += 1

        sys.setprofile(profile)
        try:
            yield
        finally:
            sys.setprofile(None)


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> Work:
    import backends.grammar_gbnf as gbnf
    import backends.grammar_regex as regex
    import backends.grammar_schema as schema

    seen = Work()
    add, define, value = gbnf.Rules.add, gbnf.Rules.define, schema.SchemaGrammar.value
    parse, literal = regex._parser.parse, gbnf.literal

    def counted_add(rules: gbnf.Rules, hint: str, body: str) -> str:
        seen.written += len(body)
        return add(rules, hint, body)

    def counted_define(rules: gbnf.Rules, name: str, body: str) -> None:
        seen.written += len(body)
        define(rules, name, body)

    def counted_value(grammar: schema.SchemaGrammar, *args: Any) -> str:
        seen.visits += 1
        return value(grammar, *args)

    def counted_parse(pattern: str, *args: Any) -> Any:
        seen.parsed += len(pattern)
        return parse(pattern, *args)

    def counted_literal(text: str) -> str:
        seen.written += len(text)
        return literal(text)

    monkeypatch.setattr(gbnf.Rules, "add", counted_add)
    monkeypatch.setattr(gbnf.Rules, "define", counted_define)
    monkeypatch.setattr(schema.SchemaGrammar, "value", counted_value)
    monkeypatch.setattr(regex._parser, "parse", counted_parse)
    for module in (regex, schema):
        monkeypatch.setattr(module, "literal", counted_literal)
    return seen


def _fan_out(width: int = 8, depth: int = 6) -> dict[str, Any]:
    """$defs d0..d6, each with `width` properties that all bring the next one by allOf
    (which wrote it out each time: 8**6 times)."""
    defs: dict[str, Any] = {f"d{depth}": {"type": "object",
                                          "properties": {"z": {"type": "integer"}}}}
    for d in range(depth):
        defs[f"d{d}"] = {"type": "object", "properties": {
            f"p{i}": {"allOf": [{"$ref": f"#/$defs/d{d + 1}"}, {"properties": {}}]}
            for i in range(width)}}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def _spellings(count: int) -> list[str]:
    """`count` ways to write "#/$defs/t" (any character may be percent-encoded)."""
    plain = "$defs/t"
    return ["#/" + "".join(f"%{ord(c):02X}" if i >> j & 1 else c
                           for j, c in enumerate(plain)) for i in range(count)]


BIG = {f"k{i}": {"type": "integer"} for i in range(3000)}
COSTLY = {
    # 900 kB of pattern: 3-5 s of parsing and converting before the size check refused it
    "one long pattern": ({"type": "string", "pattern": "(a)" * 300_000}, ("pattern", "4096")),
    "64 patterns": ({"type": "object", "properties": {
        f"p{i}": {"type": "string", "pattern": "(a)" * 5000} for i in range(64)}},
                    ("pattern", "4096")),
    "pattern inside an enum": ({"enum": [{"pattern": "a" * 20_000}]}, ("pattern", "4096")),
    # within the pattern cap, but hundreds of bytes of grammar per character
    "4096 dots": ({"type": "string", "pattern": "." * 4096},
                  ("schema.pattern", "(65536, server.max_grammar_bytes)")),
    "682 classes": ({"type": "string", "pattern": "[^a-z]" * 682},
                    ("schema.pattern", "server.max_grammar_bytes")),
    "1 MB enum": ({"enum": ["x" * 1000 + str(i) for i in range(1000)]},
                  ("(65536, server.max_grammar_bytes)",)),
    "500k-character name, additional keys": (
        {"type": "object", "properties": {"é" * 500_000: {"type": "integer"}},
         "additionalProperties": {"type": "integer"}}, ("server.max_grammar_bytes",)),
    "9000 names, additional keys": (
        {"type": "object", "properties": {"k" * 100 + str(i): {} for i in range(9000)},
         "additionalProperties": {"type": "integer"}}, ("server.max_grammar_bytes",)),
    "allOf of one $def 5000 times": (
        {"$defs": {"a": {"properties": BIG}}, "allOf": [{"$ref": "#/$defs/a"}] * 5000},
        ("server.max_grammar_bytes",)),
    "a part repeated 300 times": ({"anyOf": [{"enum": ["x" * 3000]} for _ in range(300)]},
                                  ("writing the grammar", "(65536, server.max_grammar_bytes)")),
}


@pytest.mark.parametrize("name", list(COSTLY))
def test_costly_schemas_are_refused_after_bounded_work(work: Work, name: str) -> None:
    schema, words = COSTLY[name]
    with work.counting_calls():
        message = refused(schema)
    for word in words:
        assert word in message, (word, message)
    assert work.parsed <= 4096 and work.visits <= 5000, vars(work)
    assert work.written <= 10 * DEFAULTS.max_bytes, vars(work)
    assert work.calls <= 1_000_000, vars(work)  # millions to tens of millions before


def test_patterns_are_bounded_together_before_any_is_parsed(work: Work) -> None:
    assert schema_grammar({"type": "string", "pattern": "a" * 4096}, DEFAULTS)
    two = {"type": "array", "prefixItems": [{"type": "string", "pattern": "a" * 2048},
                                            {"type": "string", "pattern": "b" * 2049}]}
    parsed = work.parsed
    message = refused(two)
    assert "`pattern`s hold more than 4096 characters" in message, message
    assert work.parsed == parsed  # refused before parsing either


def test_a_count_longer_than_int_reads_is_a_400_past_the_cap_too() -> None:
    """The cap refuses such a pattern in a schema before parsing; a direct caller of
    pattern_grammar still gets a 400, not int()'s ValueError."""
    with pytest.raises(InvalidRequest, match="not a valid regular expression"):
        pattern_grammar("^a{" + "9" * 5000 + "}$", Rules(DEFAULTS), "schema.pattern")


def test_a_part_brought_by_allof_many_times_is_written_once(work: Work) -> None:
    schema = _fan_out()
    grammar = schema_grammar(schema, DEFAULTS)
    assert work.visits < 200, vars(work)  # 861,330 before (6 s)
    assert grammar.count('"\\x22z\\x22"') == 1  # d6's only property, written once
    validate({"p0": {"p7": {"p2": {"p3": {"p4": {"p5": {"z": 1}}}}}}}, schema)


def test_a_ref_spelled_many_ways_is_written_once(work: Work) -> None:
    """A $ref names its target however it spells the path: "#/%24defs/%74" is "#/$defs/t"."""
    spellings = _spellings(8)
    schema = {"$defs": {"t": {"anyOf": [{"type": "integer"}, {"type": "null"}] * 1000}},
              "anyOf": [{"$ref": ref} for ref in spellings]}
    grammar = schema_grammar(schema, DEFAULTS)
    assert work.visits < 2100, vars(work)  # 8 x 2000 before: once per spelling
    assert len(re.findall(r"^t-\d+ ::=", grammar, re.MULTILINE)) == 1, grammar[:2000]


# -- strategies (also used by tests/api/test_grammar_http.py) -----------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=5)
SCALARS = st.none() | st.booleans() | st.integers(-10**6, 10**6) | TEXT | st.floats(
    allow_nan=False, allow_infinity=False, width=32)
#: Pieces of patterns: every escape and class JSON-schema users write, literals a JSON
#: string must escape, and non-ASCII.
ATOM_TEXTS = (
    "\\d", "\\w", "\\s", "\\D", "\\W", "\\S", "\\.", "\\-", "\\/", '"', "\\\\", ".", "[a-z]",
    "[^a-z]", '[^"\\\\]', "[\\d_-]", "[^\\s\\d]", "[A-F0-9]", "x", "é", "日", "\\u00e9", " ",
    "-", "/", "\\t", "\\n", "[\\x00-\\x1f]", "\\$",
)
ATOMS = st.sampled_from(ATOM_TEXTS)
QUANTIFIERS = st.sampled_from(["", "", "?", "{2}", "{0,2}", "{1,3}"])


def _quantify(part: str, quantifier: str) -> str:
    """`part` with `quantifier`, grouped unless it is a single atom."""
    atom = len(part) == 1 or part in ATOM_TEXTS or part.startswith("(") and part.endswith(")")
    return (part if atom or not quantifier else f"({part})") + quantifier


def _regex_parts(parts: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    quantified = st.tuples(parts, QUANTIFIERS).map(lambda pq: _quantify(*pq))
    return st.one_of(
        st.lists(quantified, min_size=1, max_size=4).map("".join),
        st.lists(quantified, min_size=2, max_size=3).map(lambda alts: f"({'|'.join(alts)})"),
    )


BOUNDED_PATTERNS = st.recursive(ATOMS, _regex_parts, max_leaves=6).map(lambda p: f"^{p}$")


def _leaves() -> st.SearchStrategy[Any]:
    lengths = st.integers(0, 12).flatmap(lambda hi: st.tuples(st.integers(0, hi), st.just(hi)))
    return st.one_of(
        st.sampled_from([{"type": t} for t in ("integer", "number", "boolean", "null")]),
        lengths.map(lambda b: {"type": "string", "minLength": b[0], "maxLength": b[1]}),
        BOUNDED_PATTERNS.map(lambda p: {"type": "string", "pattern": p}),
        st.sampled_from(["date", "time", "date-time", "uuid"]).map(
            lambda f: {"type": "string", "format": f}),
        SCALARS.map(lambda v: {"const": v}),
        st.lists(SCALARS, min_size=1, max_size=4).map(lambda vs: {"enum": vs}),
    )


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    def obj(props: dict[str, Any], required: list[bool]) -> dict[str, Any]:
        names = [n for n, keep in zip(props, required, strict=False) if keep]
        return {"type": "object", "properties": props, "required": names,
                "additionalProperties": False}

    counts = st.integers(0, 3).flatmap(lambda hi: st.tuples(st.integers(0, hi), st.just(hi)))
    return st.one_of(
        st.builds(obj, st.dictionaries(TEXT, children, max_size=3),
                  st.lists(st.booleans(), max_size=3)),
        st.builds(lambda item, c: {"type": "array", "items": item, "minItems": c[0],
                                   "maxItems": c[1]}, children, counts),
        st.lists(children, min_size=1, max_size=3).map(
            lambda items: {"type": "array", "prefixItems": items, "items": False}),
        st.lists(children, min_size=2, max_size=3).map(lambda alts: {"anyOf": alts}),
    )


#: Schemas whose every output is short: bounded strings, arrays and objects only.
BOUNDED_SCHEMAS = st.recursive(_leaves(), _containers, max_leaves=6).flatmap(
    lambda s: st.sampled_from([s, {"$defs": {"d": s}, "$ref": "#/$defs/d"}]))
#: Schemas the server must refuse: oversized bounds, regex it cannot enforce.
HOSTILE_SCHEMAS = st.one_of(
    st.integers(501, 10**9).flatmap(lambda n: st.sampled_from([
        {"type": "string", "maxLength": n}, {"type": "array", "maxItems": n},
        {"type": "string", "pattern": f"^a{{{n}}}$"},
        {"type": "string", "pattern": f"^(ab{{2,{n}}})?x$"}])),
    st.sampled_from(["(a)\\1", "(?=a)", "(?<=a)b", "\\bx", "(?i)x", "(a?)+", "(a*){2}",
                     "a++", "x{3,2}", "\\p{L}"]).map(lambda p: {"type": "string",
                                                               "pattern": p}),
)


@settings(max_examples=300, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(schema=st.one_of(BOUNDED_SCHEMAS, HOSTILE_SCHEMAS,
                        st.recursive(ATOMS, _regex_parts, max_leaves=8).map(
                            lambda p: {"type": "string", "pattern": p + "+"})))
def test_every_schema_is_a_400_or_a_grammar_llama_cpp_parses(backend: LlamaBackend,
                                                              schema: Any) -> None:
    try:
        params = prepare_grammar(GenerationParams(json_schema=schema), GrammarLimits(),
                                 backend.vocab)
    except InvalidRequest as err:
        assert err.param == "response_format" and err.message.startswith("response_format")
        return
    assert params.grammar and len(params.grammar.encode()) <= GrammarLimits().max_bytes
