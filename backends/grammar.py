"""JSON output for llama.cpp: a grammar from a JSON schema (or any JSON object), written and
checked before the request reaches the engine.

`prepare_grammar` runs once per request before admission, in a worker thread: it writes the
GBNF (grammar_schema.py; every bound checked against `GrammarLimits`) and has llama.cpp parse
it, so a grammar llama.cpp rejects is a 400 there, never a NULL sampler in the engine (whose
first use dereferenced it and ended the process). The engine then only builds the sampler
from the checked text (`grammar_sampler`, which checks for NULL all the same).

Keywords that constrain values but cannot be enforced are refused: output that looks
constrained but is not would be worse than a clear 400.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from backends.base import GenerationParams
from backends.errors import InvalidRequest
from backends.grammar_gbnf import GrammarLimits, Rules, refuse
from backends.grammar_regex import MAX_PATTERN_CHARS
from backends.grammar_schema import UNENFORCED, SchemaGrammar

__all__ = ["GrammarLimits", "grammar_for", "grammar_sampler", "prepare_grammar",
           "schema_grammar", "unenforced_keywords"]

SUPPORTED = ("type, properties, required, additionalProperties, enum, const, items, "
             "prefixItems, minItems, maxItems, minLength, maxLength, pattern, format, $ref, "
             "$defs, anyOf, oneOf (read as anyOf), allOf")
MAX_SCHEMA_DEPTH = 64  # JSON nesting of the schema document
MAX_SCHEMA_NODES = 20_000  # values in the schema document
_NAMED = ("properties", "$defs", "definitions")  # values are schemas, keys are names
_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_ONE = ("items", "additionalProperties")


def unenforced_keywords(schema: Any, where: str = "schema") -> Iterator[str]:
    """Where the schema uses a keyword the grammar would not enforce."""
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        if key in UNENFORCED:
            yield f"{where}.{key}"
        elif key in _NAMED and isinstance(value, dict):
            for name, sub in value.items():
                yield from unenforced_keywords(sub, f"{where}.{key}.{name}")
        elif key in _LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                yield from unenforced_keywords(sub, f"{where}.{key}[{i}]")
        elif key in _ONE:
            yield from unenforced_keywords(value, f"{where}.{key}")


def _check_size(schema: Any) -> None:
    """Bound the schema document's depth and size, and its patterns' length, before anything
    recurses into it or parses a pattern. Every string under a "pattern" key counts (a $ref
    may point anywhere, even into an enum)."""
    todo, seen, patterns = [(schema, 1)], 0, 0
    while todo:
        value, depth = todo.pop()
        seen += 1
        if depth > MAX_SCHEMA_DEPTH or seen > MAX_SCHEMA_NODES:
            raise refuse(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels or holds "
                         f"more than {MAX_SCHEMA_NODES} values.")
        if isinstance(value, dict) and isinstance(value.get("pattern"), str):
            patterns += len(value["pattern"])
            if patterns > MAX_PATTERN_CHARS:
                raise refuse(f"its `pattern`s hold more than {MAX_PATTERN_CHARS} characters "
                             "together, the most this server converts in one schema; "
                             "shorten them.")
        children = value.values() if isinstance(value, dict) else \
            value if isinstance(value, list) else ()
        todo.extend((child, depth + 1) for child in children)


def schema_grammar(schema: Any, limits: GrammarLimits) -> str:
    """The GBNF of values matching `schema`; InvalidRequest naming what cannot be done."""
    _check_size(schema)
    if found := list(unenforced_keywords(schema)):
        raise refuse(f"uses keywords constrained decoding cannot enforce: "
                     f"{', '.join(found[:10])}. Supported: {SUPPORTED}.")
    rules = Rules(limits)
    try:
        return rules.grammar(SchemaGrammar(schema, rules).root())
    except RecursionError:  # the depth bounds should come first; this is the backstop
        raise refuse("the schema nests too deeply.") from None


def _json_object_grammar(limits: GrammarLimits) -> str:
    rules = Rules(limits)
    return rules.grammar(rules.primitive("object"))


def compile_grammar(params: GenerationParams, limits: GrammarLimits) -> str | None:
    """GBNF for `params`' constrained output (a schema, or any JSON object); None for
    free text."""
    if params.json_schema is not None:
        return schema_grammar(params.json_schema, limits)
    return _json_object_grammar(limits) if params.json_mode else None


def prepare_grammar(params: GenerationParams, limits: GrammarLimits,
                    vocab: Any = None) -> GenerationParams:
    """`params` with its grammar written and (given the model's `vocab`) parsed by llama.cpp
    once, off the engine thread: llama.cpp only reads the vocabulary here."""
    gbnf = compile_grammar(params, limits)
    if gbnf is None:
        return params
    if vocab is not None:
        import llama_cpp

        llama_cpp.llama_sampler_free(grammar_sampler(llama_cpp, vocab, gbnf))
    return replace(params, grammar=gbnf)


def grammar_for(params: GenerationParams) -> str | None:
    """The engine's grammar text: the one checked before admission, else (a direct caller
    of the backend) written now with the default limits."""
    if params.grammar is not None:
        return params.grammar
    return compile_grammar(params, GrammarLimits())


def grammar_sampler(lib: Any, vocab: Any, gbnf: str) -> Any:
    """llama.cpp's grammar sampler for `gbnf`; a 400 when llama.cpp rejects the grammar
    (it returns NULL, and the first sample would dereference it)."""
    sampler = lib.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    if not sampler:
        raise InvalidRequest("response_format: llama.cpp could not use the grammar made "
                             "from this schema (the server log has its reason); simplify "
                             "the schema.", param="response_format")
    return sampler
