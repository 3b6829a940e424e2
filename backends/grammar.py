"""JSON output for llama.cpp: a grammar from a JSON schema (or any JSON object).

llama-cpp-python's schema converter enforces types, enum/const, required and additional
properties, string lengths and patterns, array lengths, $ref and anyOf/oneOf/allOf, but
silently ignores some keywords (numeric bounds, uniqueItems, ...). A schema using one of those
is rejected: output that looks constrained but is not would be worse than a clear 400.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from backends.base import GenerationParams
from backends.errors import InvalidRequest

if TYPE_CHECKING:
    from llama_cpp.llama_grammar import LlamaGrammar

UNENFORCED = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "uniqueItems", "contains", "minContains", "maxContains", "minProperties",
    "maxProperties", "patternProperties", "propertyNames", "dependentRequired",
    "dependentSchemas", "not", "if", "then", "else",
})
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'
_NAMED = ("properties", "$defs", "definitions")  # values are schemas, keys are names
_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_ONE = ("items", "additionalProperties")


def unenforced_keywords(schema: Any, where: str = "schema") -> Iterator[str]:
    """Where the schema uses a keyword the converter would ignore."""
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


def json_grammar(params: GenerationParams) -> LlamaGrammar | None:
    """The grammar for `params`' JSON output, None for free text."""
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf

    if params.json_schema is not None:
        if found := list(unenforced_keywords(params.json_schema)):
            raise InvalidRequest(
                f"response_format.json_schema uses keywords constrained decoding cannot "
                f"enforce: {', '.join(found[:10])}. Supported: type, properties, required, "
                "additionalProperties, enum, const, items, prefixItems, minItems, maxItems, "
                "minLength, maxLength, pattern, format, $ref, anyOf, oneOf, allOf.",
                param="response_format")
        try:
            gbnf = json_schema_to_gbnf(json.dumps(params.json_schema))
        except Exception as exc:  # noqa: BLE001 - the converter raises bare exceptions
            raise InvalidRequest(
                f"response_format.json_schema could not be turned into a grammar "
                f"({type(exc).__name__}); see llama.cpp's json-schema-to-grammar for what "
                "is supported.", param="response_format") from None
        # The converter lets strings hold raw control characters, which JSON forbids.
        return LlamaGrammar.from_string(gbnf.replace(_LOOSE_CHAR, _JSON_CHAR), verbose=False)
    if params.json_mode:
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    return None
