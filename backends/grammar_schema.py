"""A JSON schema → GBNF whose every output validates against the schema, or a 400 that names
the keyword that cannot be enforced.

Written here rather than taken from llama-cpp-python's converter, which passes regex escapes
through to llama.cpp (a NULL grammar, then a crash), writes `maxLength: n` as n nested groups,
drops `maxLength` beside a type list and `minItems` without `items`, and lets strings hold
raw control characters.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from backends.grammar_gbnf import (
    JSON_ESCAPED,
    SURROGATES,
    Rules,
    char_choice,
    complement,
    literal,
    refuse,
    subtract,
)
from backends.grammar_regex import pattern_grammar

MAX_DEPTH = 32  # schemas inside schemas (each $ref counts as one more)
FORMATS = ("date", "time", "date-time", "uuid")
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
#: Keywords that constrain a type's values, when the schema has no "type".
_TYPE_KEYWORDS = {
    "string": ("minLength", "maxLength", "pattern", "format"),
    "array": ("items", "prefixItems", "minItems", "maxItems"),
    "object": ("properties", "required", "additionalProperties"),
}
#: Keywords that constrain values but that a grammar does not enforce.
UNENFORCED = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "uniqueItems", "contains", "minContains", "maxContains", "minProperties",
    "maxProperties", "patternProperties", "propertyNames", "dependentRequired",
    "dependentSchemas", "not", "if", "then", "else", "unevaluatedItems",
    "unevaluatedProperties", "dependencies", "additionalItems", "$dynamicRef",
    "$recursiveRef",
})
#: Every keyword that constrains a value (the rest are annotations: title, description...).
CONSTRAINING = UNENFORCED | {
    "type", "enum", "const", "$ref", "anyOf", "oneOf", "allOf", *_TYPE_KEYWORDS["string"],
    *_TYPE_KEYWORDS["array"], *_TYPE_KEYWORDS["object"],
}
_JSON_TYPES = {bool: "boolean", str: "string", type(None): "null", list: "array",
               dict: "object"}
Pointer = tuple[str | int, ...]  # a path into the schema document


def json_type(value: Any) -> set[str]:
    """The JSON schema types a JSON value has (an integral number is both)."""
    if isinstance(value, bool) or type(value) in _JSON_TYPES:
        return {_JSON_TYPES[type(value)]}
    if isinstance(value, int) or isinstance(value, float) and value.is_integer():
        return {"integer", "number"}
    return {"number"}


class SchemaGrammar:
    """The rules of one schema's grammar (`root` returns the root rule's body)."""

    def __init__(self, schema: Any, rules: Rules) -> None:
        self.schema = schema
        self.rules = rules
        # $ref target (the path it resolves to, however the $ref spells it) -> its rule
        self._refs: dict[Pointer, str] = {}
        # $refs being resolved since the last object or array began: meeting one of them
        # again would make a rule that starts with itself (left recursion).
        self._bare: list[set[Pointer]] = [set()]
        # The rules of the schemas met first in an object or array (properties, items...),
        # by id (each held): whatever comes before, one such schema's rule is the same, so
        # a part that allOf, or a $ref into it, brings again is not written again.
        self._member_rules: dict[int, tuple[Any, str]] = {}

    def root(self) -> str:
        return self.value(self.schema, "schema", 0)

    def value(self, schema: Any, where: str, depth: int) -> str:
        """A rule name (or symbol) producing the values `schema` accepts."""
        if depth > MAX_DEPTH:
            raise refuse(f"{where}: schemas nest more than {MAX_DEPTH} levels deep "
                         "(counting each $ref).")
        if not isinstance(schema, dict) and schema is not True:
            raise refuse(f"{where} must be a schema (an object or true); it is "
                         f"{json.dumps(schema)[:40]}.")
        if schema is True or not set(schema) & CONSTRAINING:  # only annotations
            return self.rules.primitive("value")
        if unenforced := sorted(set(schema) & UNENFORCED):  # reached through a $ref
            raise refuse(f"{where} uses {', '.join(unenforced)}, which constrained decoding "
                         "cannot enforce.")
        if "$ref" in schema:
            return self._ref(schema, where, depth)
        if "anyOf" in schema or "oneOf" in schema:
            return self._union(schema, where, depth)
        if "allOf" in schema:
            return self.value(self._all_of(schema, where), f"{where}.allOf", depth + 1)
        if "const" in schema or "enum" in schema:
            return self._constants(schema, where)
        types = self._types(schema, where)
        if len(types) == 1:
            return self._typed(types[0], schema, where, depth)
        return self.rules.add(where, " | ".join(self._typed(t, schema, f"{where}({t})", depth)
                                                for t in types))

    def _others(self, schema: dict[str, Any], keyword: str, where: str,
                allowed: tuple[str, ...] = ()) -> None:
        """Refuse constraining keywords beside `keyword` (other than `allowed`)."""
        others = sorted(set(schema) & CONSTRAINING - {keyword, *allowed})
        if others:
            raise refuse(f"{where}: {keyword} beside {', '.join(others)} is not supported; "
                         f"move them into the {keyword} schemas.")

    def _ref(self, schema: dict[str, Any], where: str, depth: int) -> str:
        self._others(schema, "$ref", where)
        ref = schema["$ref"]
        target, pointer = self._resolve(ref, where)
        if pointer in self._bare[-1]:
            raise refuse(f"{where}: $ref '{ref[:80]}' refers to itself without an object or "
                         "array in between, which no finite value can satisfy.")
        name = self._refs.get(pointer)
        if name is None:
            name = self._refs[pointer] = self.rules.reserve(ref.rsplit("/", 1)[-1])
            self._bare[-1].add(pointer)
            self.rules.define(name, self.value(target, f"{where}({ref[:80]})", depth + 1))
            self._bare[-1].discard(pointer)
        return name

    def _resolve(self, ref: Any, where: str) -> tuple[Any, Pointer]:
        """What `ref` points to, and the path to it (the same for every spelling)."""
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise refuse(f"{where}.$ref must point into this schema ('#/$defs/...').")
        target: Any = self.schema
        pointer: list[str | int] = []
        for part in ref[1:].split("/")[1:]:
            key = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and key in target:
                target = target[key]
                pointer.append(key)
            elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
                target = target[int(key)]
                pointer.append(int(key))
            else:
                raise refuse(f"{where}.$ref '{ref[:80]}' points to nothing in the schema.")
        return target, tuple(pointer)

    def _member(self, schema: Any, where: str, depth: int) -> str:
        """`value` of a schema met first in an object or array (no $ref being resolved in
        between), written once however often it is met."""
        known = self._member_rules.get(id(schema))
        if known is None:
            known = self._member_rules[id(schema)] = (schema, self.value(schema, where, depth))
        return known[1]

    def _union(self, schema: dict[str, Any], where: str, depth: int) -> str:
        """anyOf, and oneOf read as anyOf (a value may match several alternatives)."""
        keyword = "anyOf" if "anyOf" in schema else "oneOf"
        self._others(schema, keyword, where)
        options = schema[keyword]
        if not isinstance(options, list) or not options:
            raise refuse(f"{where}.{keyword} must be a non-empty list of schemas.")
        return self.rules.add(where, " | ".join(
            self.value(option, f"{where}.{keyword}[{i}]", depth + 1)
            for i, option in enumerate(options)))

    def _all_of(self, schema: dict[str, Any], where: str) -> Any:
        """allOf of one schema is that schema; of several, their objects merged (each may
        have properties and required only: they must all hold of one object)."""
        parts = schema["allOf"]
        if not isinstance(parts, list) or not parts:
            raise refuse(f"{where}.allOf must be a non-empty list of schemas.")
        rest = {k: v for k, v in schema.items() if k != "allOf" and k in CONSTRAINING}
        if len(parts) == 1 and not rest:
            return parts[0]
        merged: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
        seen: set[int] = set()  # a part that comes again (by $ref) merges nothing new
        for i, part in enumerate([*parts, rest]):
            part = self._resolve(part["$ref"], where)[0] if isinstance(part, dict) and \
                "$ref" in part else part
            if id(part) in seen:
                continue
            seen.add(id(part))
            extra = set(part) & CONSTRAINING - {"properties", "required", "type"} \
                if isinstance(part, dict) else {"?"}
            if extra or part.get("type", "object") != "object":
                raise refuse(f"{where}.allOf[{i}]: allOf is supported for object schemas "
                             "with properties and required only.")
            for name, sub in part.get("properties", {}).items():
                if merged["properties"].setdefault(name, sub) != sub:
                    raise refuse(f"{where}.allOf: property '{name[:40]}' has two schemas.")
            merged["required"] += list(part.get("required", []))
        return merged

    def _constants(self, schema: dict[str, Any], where: str) -> str:
        """const or enum: the values that also have the schema's type, written as JSON."""
        keyword = "const" if "const" in schema else "enum"
        self._others(schema, keyword, where, ("type", "enum"))
        if not isinstance(schema.get("enum", []), list):
            raise refuse(f"{where}.enum must be a list of values.")
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if "const" in schema and values[0] not in schema.get("enum", values):
            values = []
        types = set(self._types(schema, where))
        kept = [v for v in values if json_type(v) & types]
        if not kept:
            raise refuse(f"{where}: no value of its {keyword} has its type, so nothing can "
                         "match it.")
        try:
            texts = [json.dumps(v, allow_nan=False, separators=(",", ":")) for v in kept]
        except ValueError:
            raise refuse(f"{where}.{keyword} holds NaN or Infinity, which JSON cannot "
                         "write.") from None
        self.rules.afford(sum(len(text) + 5 for text in texts))  # '"text" | ' at least
        return self.rules.add(where, "( " + " | ".join(map(literal, texts)) + " ) " +
                              self.rules.primitive("space"))

    def _types(self, schema: dict[str, Any], where: str) -> list[str]:
        """The schema's types, in order: "type" (one or a list), else the types whose
        keywords it uses, else all of them."""
        given = schema.get("type")
        if given is None:
            used = [t for t, keys in _TYPE_KEYWORDS.items() if set(keys) & set(schema)]
            return used or list(TYPES)
        types = given if isinstance(given, list) else [given]
        unknown = [t for t in types if t not in TYPES]
        if unknown or not types:
            raise refuse(f"{where}.type must be one of {', '.join(TYPES)} (or a list of "
                         f"them), not {json.dumps(given)[:60]}.")
        return list(dict.fromkeys(types))

    def _typed(self, kind: str, schema: dict[str, Any], where: str, depth: int) -> str:
        if kind == "object":
            return self._object(schema, where, depth)
        if kind == "array":
            return self._array(schema, where, depth)
        if kind == "string":
            return self._string(schema, where)
        return self.rules.primitive(kind)

    def _count(self, schema: dict[str, Any], keyword: str, where: str) -> int | None:
        value = schema.get(keyword)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise refuse(f"{where}.{keyword} must be a non-negative integer.")
        self.rules.check_repeat(value, f"{where}.{keyword}")
        return value

    def _bounds(self, schema: dict[str, Any], low: str, high: str,
                where: str) -> tuple[int, int | None]:
        least, most = self._count(schema, low, where), self._count(schema, high, where)
        if most is not None and (least or 0) > most:
            raise refuse(f"{where}: {low} ({least}) is more than {high} ({most}).")
        return least or 0, most

    def _string(self, schema: dict[str, Any], where: str) -> str:
        quote = literal('"')
        pattern, fmt = schema.get("pattern"), schema.get("format")
        lengths = "minLength" in schema or "maxLength" in schema
        if (pattern is not None) + (fmt is not None) + lengths > 1:
            raise refuse(f"{where}: use one of pattern, format and minLength/maxLength; "
                         "together they cannot be enforced (a length can go into the "
                         "pattern: ^[a-z]{1,20}$).")
        if fmt is not None:
            if fmt not in FORMATS:
                raise refuse(f"{where}.format '{str(fmt)[:40]}' cannot be enforced; "
                             f"supported formats: {', '.join(FORMATS)}.")
            body = self.rules.primitive(fmt)
        elif pattern is not None:
            if not isinstance(pattern, str):
                raise refuse(f"{where}.pattern must be a string.")
            body = pattern_grammar(pattern, self.rules, f"{where}.pattern")
        elif lengths:
            least, most = self._bounds(schema, "minLength", "maxLength", where)
            body = self.rules.repeat(self.rules.primitive("char"), least, most, "chars")
        else:
            return self.rules.primitive("string")
        return self.rules.add(where, f"{quote} {body} {quote} {self.rules.primitive('space')}")

    def _object(self, schema: dict[str, Any], where: str, depth: int) -> str:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties")
        if not isinstance(properties, dict) or not isinstance(required, list) or \
                not all(isinstance(r, str) for r in required):
            raise refuse(f"{where}: properties must be an object and required a list of "
                         "names.")
        if missing := [r for r in required if r not in properties]:
            raise refuse(f"{where}.required names '{missing[0][:40]}', which is not in "
                         "properties.")
        if not properties and extra in (None, True):
            return self.rules.primitive("object")
        # each name is written (quoted) at least once: bound them before writing any
        self.rules.afford(sum(len(name) + 4 for name in properties))
        self._bare.append(set())
        try:
            pairs = {name: self._pair(literal(json.dumps(name)), sub,
                                      f"{where}.properties.{name[:40]}", depth)
                     for name, sub in properties.items()}
            more = None if extra in (None, False) else self._pair(
                self._other_key(list(properties)), extra, f"{where}.additionalProperties",
                depth)
        finally:
            self._bare.pop()
        wanted = dict.fromkeys(required)
        members = self._members([pairs[r] for r in wanted],
                                [pairs[n] for n in pairs if n not in wanted], more, where)
        space = self.rules.primitive("space")
        return self.rules.add(where, f'"{{" {space} {members} "}}" {space}')

    def _pair(self, key: str, schema: Any, where: str, depth: int) -> str:
        space = self.rules.primitive("space")
        return self.rules.add(f"{where}-kv", f'{key} {space} ":" {space} '
                                             f'{self._member(schema, where, depth + 1)}')

    def _members(self, required: list[str], optional: list[str], more: str | None,
                 where: str) -> str:
        """Object members: the required ones in order, then each optional one, then any
        number of additional ones; commas only between members."""
        comma = f'"," {self.rules.primitive("space")}'
        tail = [f"( {comma} {kv} )?" for kv in optional]
        if more is not None:
            tail.append(self.rules.repeat(f"{comma} {more}", 0, None, f"{where}-more"))
        if required:
            return " ".join([required[0], *(f"{comma} {kv}" for kv in required[1:]), *tail])
        # No required member: whichever comes first has no comma before it; follow[i] is
        # what may come after tail[i - 1].
        follow = ['""'] * (len(tail) + 1)
        for i in range(len(tail) - 1, -1, -1):
            follow[i] = self.rules.add(f"{where}-rest", f"{tail[i]} {follow[i + 1]}")
        firsts = [f"{kv} {follow[i + 1]}" for i, kv in enumerate(optional)]
        if more is not None:
            firsts.append(f"{more} {follow[len(optional)]}")
        return "( " + " | ".join(firsts) + " )?" if firsts else '""'

    def _other_key(self, names: list[str]) -> str:
        """A quoted key that is none of `names`, so that an additional member can never
        repeat a declared one (a JSON parser keeps the last of two equal keys). Its
        characters are written unescaped, so the key's text is what the rules see: one
        rule per node of the names' trie, written without recursion (names may be long)."""
        quote = literal('"')
        plain = complement([(cp, cp) for cp in JSON_ESCAPED] + [SURROGATES])
        free = self.rules.repeat(char_choice(plain) or '""', 0, None, "key-char")
        trie: dict[str, Any] = {}
        for name in names:
            node = trie
            for char in name:
                node = node.setdefault(char, {})
            node[""] = {}  # a name ends here
        root = self.rules.reserve("key")
        todo = [(trie, root)]
        while todo:
            node, name = todo.pop()
            options = [] if "" in node else [quote]
            other = char_choice(subtract(plain, [(ord(c), ord(c)) for c in node if c]))
            if other is not None:
                options.append(f"{other} {free} {quote}")
            for char, child in node.items():
                if char:
                    todo.append((child, self.rules.reserve("key")))
                    options.append(f"{literal(char)} {todo[-1][1]}")
            self.rules.define(name, " | ".join(options))
        return f"{quote} {root}"

    def _array(self, schema: dict[str, Any], where: str, depth: int) -> str:
        """prefixItems (each optional unless minItems asks for it), then `items` (any
        value when absent, none when false) up to maxItems."""
        prefix, items = schema.get("prefixItems", []), schema.get("items", True)
        if not isinstance(prefix, list) or isinstance(items, list):
            raise refuse(f"{where}: prefixItems must be a list of schemas and items one "
                         "schema (a list of items is the old tuple form: use prefixItems).")
        least, most = self._bounds(schema, "minItems", "maxItems", where)
        if items is False and least > len(prefix):
            raise refuse(f"{where}: minItems ({least}) asks for more items than "
                         "prefixItems allows (items is false).")
        n = len(prefix) if most is None else min(len(prefix), most)
        self._bare.append(set())
        try:
            heads = [self._member(p, f"{where}.prefixItems[{i}]", depth + 1)
                     for i, p in enumerate(prefix[:n])]
            more = None if items is False or n < len(prefix) or most == n else \
                self._member(items, f"{where}.items", depth + 1)
        finally:
            self._bare.pop()
        space = self.rules.primitive("space")
        comma = f'"," {space}'
        low, high = max(0, least - n), None if most is None else most - n
        if more is not None and n == 0:  # the first item has no comma before it
            others = self.rules.repeat(f"{comma} {more}", max(0, low - 1),
                                       None if high is None else high - 1, f"{where}-items")
            first = f"{more} {others}"
            elements = first if low else f"( {first} )?"
        else:
            follow = '""' if more is None else \
                self.rules.repeat(f"{comma} {more}", low, high, f"{where}-items")
            for i in range(n - 1, 0, -1):
                step = f"{comma} {heads[i]} {follow}"
                follow = self.rules.add(f"{where}-next", step if i < least else f"( {step} )?")
            first = f"{heads[0]} {follow}" if n else '""'
            elements = first if least or not n else f"( {first} )?"
        return self.rules.add(where, f'"[" {space} {elements} "]" {space}')
