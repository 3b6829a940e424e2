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

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from backends.base import GenerationParams
from backends.errors import InvalidRequest
from backends.grammar_gbnf import GrammarLimits, Rules, literal, refuse
from backends.grammar_regex import MAX_PATTERN_CHARS
from backends.grammar_schema import UNENFORCED, SchemaGrammar

__all__ = ["GrammarLimits", "grammar_for", "grammar_sampler", "prepare_grammar",
           "schema_grammar", "tool_grammar", "unenforced_keywords"]

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


def tool_grammar(tools: Sequence[dict[str, Any]], names: Sequence[str], tool_format: str,
                 parallel: bool, limits: GrammarLimits) -> str:
    """GBNF of output that is only calls of the tools `names`, written as `tool_format`
    writes them (backends.toolcalls): one call, or with `parallel` one or more, each a
    JSON object with the tool's name and arguments that match its parameter schema."""
    try:
        return _tool_grammar(tools, names, tool_format, parallel, limits)
    except InvalidRequest as exc:  # name the tools, not response_format
        raise InvalidRequest(exc.message.replace(
            "response_format.json_schema: ", "tools (a forced tool_choice enforces their "
            "parameter schemas): ", 1), param="tools") from None


def _tool_grammar(tools: Sequence[dict[str, Any]], names: Sequence[str], tool_format: str,
                  parallel: bool, limits: GrammarLimits) -> str:
    from backends.toolcalls import FORMATS

    fmt = FORMATS[tool_format]
    by_name = {t.get("function", {}).get("name"): t.get("function", {}) for t in tools}
    options = []
    for name in names:
        parameters = by_name[name].get("parameters") or {"type": "object"}
        where = f"tools[{list(by_name).index(name)}].function.parameters"
        _check_size(parameters)
        if found := list(unenforced_keywords(parameters, where)):
            raise refuse(f"uses keywords constrained decoding cannot enforce: "
                         f"{', '.join(found[:10])}. Supported: {SUPPORTED}.")
        options.append({"type": "object", "properties": {
            "name": {"const": name}, fmt.args_key: parameters},
            "required": ["name", fmt.args_key], "additionalProperties": False})
    rules = Rules(limits)
    try:
        body = SchemaGrammar({"anyOf": options} if len(options) > 1 else options[0],
                             rules).root()
    except RecursionError:
        raise refuse("the tools' parameter schemas nest too deeply.") from None
    call = rules.add("call", _joined(fmt.call_open, body, fmt.call_close))
    calls = f"{call} ({literal(fmt.separator)} {call})*" if parallel and fmt.separator \
        else f"{call}+" if parallel else call
    return rules.grammar(_joined(fmt.block_open, f"({calls})", fmt.block_close))


def _joined(before: str, middle: str, after: str) -> str:
    return " ".join(part for part in (literal(before) if before else "", middle,
                                      literal(after) if after else "") if part)


def compile_grammar(params: GenerationParams, limits: GrammarLimits,
                    tools: Sequence[dict[str, Any]] | None = None,
                    tool_format: str = "json") -> str | None:
    """GBNF for `params`' constrained output (tool calls, a schema, or any JSON object);
    None for free text."""
    if params.tool_choice is not None:
        return tool_grammar(tools or (), params.tool_choice, tool_format,
                            params.parallel_tool_calls, limits)
    if params.json_schema is not None:
        return schema_grammar(params.json_schema, limits)
    return _json_object_grammar(limits) if params.json_mode else None


def prepare_grammar(params: GenerationParams, limits: GrammarLimits,
                    vocab: Any = None, tools: Sequence[dict[str, Any]] | None = None,
                    tool_format: str = "json") -> GenerationParams:
    """`params` with its grammar written and (given the model's `vocab`) parsed by llama.cpp
    once, off the engine thread: llama.cpp only reads the vocabulary here."""
    gbnf = compile_grammar(params, limits, tools, tool_format)
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
