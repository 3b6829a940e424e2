"""Request values must have the JSON types their OpenAPI schema declares.

pydantic's lax mode takes "5" or true for an integer, 0 or "yes" for a boolean and 0 for a
date; the OpenAPI document, which clients and the schemathesis run in the tests read as the
contract, allows none of them. `json_type_error` compares a body's values with the model's
own JSON schema (so the check cannot drift from the document) and says what was expected.
Other constraints (ranges, lengths, enums) stay pydantic's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

#: The largest integer bound a schema should declare: every JSON client (JavaScript's
#: numbers) and float-based validator holds integers up to 2**53 exactly; above it, a value
#: just past a bound can compare equal to the bound and look valid.
MAX_EXACT_INT = 2**53


def json_type_error(model: type[BaseModel], data: dict[str, Any]) -> str | None:
    """What is wrong with the first field of `data` whose JSON type `model`'s schema does
    not allow, else None. Values that are not JSON (a `date` passed by Python code) pass."""
    properties, defs = _json_schema(model)
    for name, value in data.items():
        if not isinstance(value, str | int | float | list | dict | None):
            continue
        mismatch = _mismatch(value, properties.get(name, {}), defs)
        if mismatch is not None:
            expected, item = mismatch
            got = "" if item is not None else f", not {_json_type(value)}"
            return f"'{name}' must be {expected}{got}"
    return None


@functools.cache
def _json_schema(model: type[BaseModel]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A model's JSON-schema properties and definitions, built once per model."""
    schema = model.model_json_schema()
    return schema.get("properties", {}), schema.get("$defs", {})


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    # JSON Schema counts 2.0 as an integer; pydantic takes it as 2 and refuses 2.5 itself.
    "integer": lambda v: type(v) is int or isinstance(v, float) and v.is_integer(),
    "number": lambda v: type(v) in (int, float),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


Mismatch = tuple[str, int | None]  # what was expected; the first wrong item, if only one was


def _mismatch(value: Any, schema: dict[str, Any], defs: dict[str, Any]) -> Mismatch | None:
    if "$ref" in schema:
        target = defs.get(schema["$ref"].rsplit("/", 1)[-1], {})
        if target.get("type") == "object":  # a model: it checks its own fields
            return None if isinstance(value, dict) else ("an object", None)
        return _mismatch(value, target, defs)
    choices = schema.get("anyOf") or schema.get("oneOf")
    if choices:
        options = [_mismatch(value, choice, defs) for choice in choices]
        if None in options:
            return None
        wrong = [o for o in options if o is not None]
        in_items = [o for o in wrong if o[1] is not None]
        if in_items:  # the shape the caller meant: the one whose wrong item came last
            return max(in_items, key=lambda o: o[1] or 0)
        return _either([expected for expected, _ in wrong]), None
    kind = schema.get("type")
    if isinstance(kind, list):  # {"type": ["string", "null"]}: one of several
        return _mismatch(value, {"anyOf": [{**schema, "type": k} for k in kind]}, defs)
    if kind not in _JSON_TYPES:
        return None
    if not _JSON_TYPES[kind](value):
        return {"integer": "an integer", "array": "an array", "object": "an object",
                "null": "null"}.get(kind, f"a {kind}"), None
    inner = schema.get("items") if kind == "array" else schema.get("additionalProperties")
    if isinstance(inner, dict) and isinstance(value, list | dict):
        items = list(value.values()) if isinstance(value, dict) else value
        scalar = inner.get("type") if not {"$ref", "anyOf", "oneOf"} & set(inner) else None
        if scalar in ("string", "boolean", "integer", "number") and \
                all(map(_JSON_TYPES[scalar], items)):  # the common case, e.g. token ids
            return None
        for index, item in enumerate(items):
            if (bad := _mismatch(item, inner, defs)) is not None:
                detail = "" if bad[1] is not None else f" (item {index} is {_json_type(item)})"
                return f"{_json_type(value)} of items each {bad[0]}{detail}", index
    return None


def _json_type(value: Any) -> str:
    """A value's JSON type, with its article ("an integer")."""
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
             (list, "an array"), (dict, "an object"))
    return next((name for cls, name in kinds if isinstance(value, cls)), type(value).__name__)


def _either(options: list[str]) -> str:
    options = list(dict.fromkeys(options))
    return options[0] if len(options) == 1 else \
        f"{', '.join(options[:-1])}{',' if len(options) > 2 else ''} or {options[-1]}"
