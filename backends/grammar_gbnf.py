"""Writing GBNF (llama.cpp's grammar language) for JSON output: named rules, literals and
character classes of JSON string contents, bounded repetitions and the size they expand to.

Every bounded repetition is written as llama.cpp's `x{m,n}` of one symbol (a rule name or a
character class): llama.cpp expands it into about n copies of x without recursion, so
what the grammar costs to parse and hold grows with the sum of the bounds, which `Rules`
counts against `GrammarLimits.max_bytes`, and every bound is checked against
`GrammarLimits.max_repeat` first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from backends.errors import InvalidRequest

#: Code points a JSON string cannot hold as they are (RFC 8259: the quote, the backslash and
#: controls); DEL may stand raw, but is escaped too, as llama-cpp-python's JSON grammar does.
JSON_ESCAPED = (*range(0x20), 0x22, 0x5C, 0x7F)
_SHORT = {0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x22: '\\"',
          0x5C: "\\\\"}
SURROGATES = (0xD800, 0xDFFF)  # not characters: UTF-8 cannot carry them
MAX_CODE_POINT = 0x10FFFF
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                   " !#$%&'()*+,./:;<=>?@_`{|}~")
_NAME = re.compile(r"[^a-z0-9]+")
_SYMBOL = re.compile(r"[a-z0-9-]+|\[[^\]]*\]")  # a rule name or one character class

PRIMITIVES = {
    "space": '" "?',
    "char": (r'[^"\\\x00-\x1F\x7F] | "\\" ( ["\\/bfnrt] | "u" '
             r'( [0-9a-cA-Ce-fE-F] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2} ) )'),
    "string": r'"\"" char* "\"" space',
    "int-part": '"0" | [1-9] [0-9]{0,15}',
    "number": '"-"? int-part ( "." [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,2} )? space',
    "integer": '"-"? int-part space',
    "boolean": '( "true" | "false" ) space',
    "null": '"null" space',
    "value": "object | array | string | number | boolean | null",
    "object": ('"{" space ( string ":" space value ( "," space string ":" space value )* )? '
               '"}" space'),
    "array": '"[" space ( value ( "," space value )* )? "]" space',
    # `format`s: RFC 3339 dates (each month's days; Feb. 29 left out, it needs the year),
    # times with a required offset, and UUIDs.
    "date": ('[1-9] [0-9]{3} "-" ( ( "0" [13578] | "1" [02] ) "-" ( "0" [1-9] | [12] [0-9] | '
             '"3" [01] ) | ( "0" [469] | "11" ) "-" ( "0" [1-9] | [12] [0-9] | "30" ) | '
             '"02-" ( "0" [1-9] | "1" [0-9] | "2" [0-8] ) )'),
    "time": ('( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,6} )? '
             '( "Z" | [-+] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )'),
    "date-time": 'date "T" time',
    "uuid": ('[0-9a-f]{8} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" '
             '[0-9a-f]{12}'),
}
_USES = {"char": (), "string": ("char", "space"), "number": ("int-part", "space"),
         "integer": ("int-part", "space"), "value": ("object", "array", "string", "number",
                                                     "boolean", "null"),
         "object": ("string", "value", "space"), "array": ("value", "space"),
         "boolean": ("space",), "null": ("space",), "date-time": ("date", "time")}


@dataclass(frozen=True)
class GrammarLimits:
    """How large a grammar a request may ask for (server.max_grammar_repeat and
    server.max_grammar_bytes; the defaults are theirs)."""

    max_repeat: int = 500
    max_bytes: int = 65_536


def refuse(message: str) -> InvalidRequest:
    """The 400 for a schema; the message quotes parts of it, where a lone surrogate (valid
    in a JSON string, not in UTF-8) is written as its escape."""
    text = f"response_format.json_schema: {message}"
    return InvalidRequest(text.encode("utf-8", "backslashreplace").decode("utf-8"),
                          param="response_format")


def json_text(cp: int) -> str:
    """How a JSON string writes the character `cp` (escaped where JSON requires it)."""
    if cp in _SHORT:
        return _SHORT[cp]
    return f"\\u{cp:04x}" if cp < 0x20 or cp == 0x7F else chr(cp)


def _gbnf_char(cp: int) -> str:
    """One code point inside a GBNF literal or character class."""
    char = chr(cp)
    if char in _PLAIN:
        return char
    if cp < 0x100:
        return f"\\x{cp:02X}"
    return f"\\u{cp:04X}" if cp < 0x10000 else f"\\U{cp:08X}"


def literal(text: str) -> str:
    """A GBNF literal producing exactly `text`."""
    return '"' + "".join(_gbnf_char(ord(c)) for c in text) + '"'


def char_choice(ranges: list[tuple[int, int]]) -> str | None:
    """A GBNF expression producing, inside a JSON string, any one character of `ranges`
    (sorted, disjoint, inclusive, no surrogates): raw where JSON allows, escaped where it
    must; None when the ranges hold no character."""
    raw: list[tuple[int, int]] = []
    escaped: list[int] = []
    for low, high in ranges:
        for cp in JSON_ESCAPED:
            if low <= cp <= high:
                escaped.append(cp)
        raw.extend(subtract([(low, high)], [(cp, cp) for cp in JSON_ESCAPED]))
    choices = [literal(json_text(cp)) for cp in escaped]
    if raw:
        spans = "".join(_gbnf_char(a) if a == b else f"{_gbnf_char(a)}-{_gbnf_char(b)}"
                        for a, b in raw)
        choices.insert(0, f"[{spans}]")
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else "( " + " | ".join(choices) + " )"


def normalize(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged ranges."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
        else:
            merged.append((low, high))
    return merged


def subtract(ranges: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`ranges` without the code points of `cut`."""
    out = []
    for low, high in normalize(ranges):
        for a, b in normalize(cut):
            if b < low or a > high:
                continue
            if a > low:
                out.append((low, a - 1))
            low = b + 1
            if low > high:
                break
        if low <= high:
            out.append((low, high))
    return out


def complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return subtract([(0, MAX_CODE_POINT)], ranges)


class Rules:
    """The rules of one grammar being written, deduplicated by body."""

    def __init__(self, limits: GrammarLimits) -> None:
        self.limits = limits
        self._bodies: dict[str, str] = {}
        self._names: dict[str, str] = {}  # body -> name
        self._expanded = 0  # bytes llama.cpp adds by expanding the {m,n} repetitions

    def reserve(self, hint: str) -> str:
        """A new rule name (defined later with `define`: recursive rules need it first)."""
        name = f"{_NAME.sub('-', hint.lower()).strip('-')[:24] or 'r'}-{len(self._bodies)}"
        self._bodies[name] = ""
        return name

    def define(self, name: str, body: str) -> None:
        self._bodies[name] = body
        self._names.setdefault(body, name)

    def add(self, hint: str, body: str) -> str:
        """The name of a rule with this body (an existing one if the body was seen)."""
        name = self._names.get(body)
        if name is None:
            name = self.reserve(hint)
            self.define(name, body)
        return name

    def primitive(self, name: str) -> str:
        """A rule of PRIMITIVES (and those it uses), under its own name."""
        if name not in self._bodies:
            self._bodies[name] = PRIMITIVES[name]
            for used in _USES.get(name, ()):
                self.primitive(used)
        return name

    def check_repeat(self, value: int, what: str) -> None:
        if value > self.limits.max_repeat:
            raise refuse(f"{what} is {value}, more than this server allows in constrained "
                         f"output ({self.limits.max_repeat}, server.max_grammar_repeat).")

    def repeat(self, expr: str, low: int, high: int | None, hint: str) -> str:
        """`expr` repeated low..high times (high None: no upper bound); bounds checked by
        the caller with `check_repeat` (which names the schema keyword)."""
        atom = expr if _SYMBOL.fullmatch(expr) else self.add(hint, expr)
        if high is None:
            suffix = "*" if low == 0 else "+" if low == 1 else f"{{{low},}}"
        else:
            suffix = "?" if (low, high) == (0, 1) else f"{{{low}}}" if low == high else \
                f"{{{low},{high}}}"
        self._expanded += (len(atom) + 1) * (high if high is not None else low)
        return atom + suffix

    def grammar(self, root: str) -> str:
        """The whole grammar with `root` as its root rule's body, within max_bytes."""
        self._bodies["root"] = root
        text = "\n".join(f"{name} ::= {body}" for name, body in self._bodies.items()) + "\n"
        size = len(text.encode()) + self._expanded
        if size > self.limits.max_bytes:
            raise refuse(f"the grammar for this schema would take {size} bytes once its "
                         f"repetitions are expanded, more than this server allows "
                         f"({self.limits.max_bytes}, server.max_grammar_bytes). Lower "
                         "maxLength/maxItems or simplify the schema.")
        return text
