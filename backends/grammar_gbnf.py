"""Writing GBNF (llama.cpp's grammar language) for JSON output: named rules, literals and
character classes of JSON string contents, bounded repetitions and the size they expand to.

Every bounded repetition is written as llama.cpp's `x{m,n}` of one symbol (a rule name or a
character class): llama.cpp expands it into about n copies of x without recursion, so
what the grammar costs to parse and hold grows with the sum of the bounds, which `Rules`
counts against `GrammarLimits.max_bytes`, and every bound is checked against
`GrammarLimits.max_repeat` first.

Writing a grammar is bounded as well, while it is written (it holds the GIL, so it stalls
every other request meanwhile): `Rules` refuses as soon as the rules written so far pass
`max_bytes`, or the text written in all (counting a rule each time it is written, even when
an earlier equal one is kept) passes `WORK_FACTOR` times it; the converters check what they
are about to write against both before writing it (`Rules.afford`).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache

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
_PLAIN_TEXT = re.compile("[" + re.escape("".join(sorted(_PLAIN))) + "]*")
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


#: Text written while writing a grammar, as a multiple of max_bytes: rules written again
#: and merged with an equal one count each time (a schema that repeats a part, or reaches
#: one part by many paths, costs the work of each).
WORK_FACTOR = 4


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


class _Escapes(dict[int, str]):
    """`str.translate`'s table for GBNF literals, filled as code points are met."""

    def __missing__(self, cp: int) -> str:
        char = _gbnf_char(cp)
        if len(self) < 4096:  # a bounded cache
            self[cp] = char
        return char


_ESCAPES = _Escapes()


def literal(text: str) -> str:
    """A GBNF literal producing exactly `text`."""
    if _PLAIN_TEXT.fullmatch(text):
        return f'"{text}"'
    return '"' + text.translate(_ESCAPES) + '"'


def char_choice(ranges: list[tuple[int, int]]) -> str | None:
    """A GBNF expression producing, inside a JSON string, any one character of `ranges`
    (sorted, disjoint, inclusive, no surrogates): raw where JSON allows, escaped where it
    must; None when the ranges hold no character."""
    if len(ranges) <= 16:  # \\d, [^a-z], . ...: a pattern may hold thousands of them
        return _small_choice(tuple(ranges))
    return _choice(ranges)


@lru_cache(maxsize=512)
def _small_choice(ranges: tuple[tuple[int, int], ...]) -> str | None:
    return _choice(list(ranges))


def _choice(ranges: list[tuple[int, int]]) -> str | None:
    starts = [low for low, _ in ranges]
    escaped = [cp for cp in JSON_ESCAPED
               if (i := bisect_right(starts, cp) - 1) >= 0 and cp <= ranges[i][1]]
    raw = subtract(ranges, _ESCAPED_RANGES)
    choices = [_ESCAPED_LITERALS[cp] for cp in escaped]
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
    cut = normalize(cut)
    for low, high in normalize(ranges):
        for a, b in cut:
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


_ESCAPED_RANGES = normalize([(cp, cp) for cp in JSON_ESCAPED])
_ESCAPED_LITERALS = {cp: literal(json_text(cp)) for cp in JSON_ESCAPED}


class Rules:
    """The rules of one grammar being written, deduplicated by body; refused as soon as they
    grow past the limits (see the module's docstring)."""

    def __init__(self, limits: GrammarLimits) -> None:
        self.limits = limits
        self._bodies: dict[str, str] = {}
        self._names: dict[str, str] = {}  # body -> name
        self._expanded = 0  # bytes llama.cpp adds by expanding the {m,n} repetitions
        self._size = 0  # characters of the rules so far (no more than their bytes)
        self._work = 0  # characters written so far, rules merged with an equal one included

    def reserve(self, hint: str) -> str:
        """A new rule name (defined later with `define`: recursive rules need it first)."""
        name = f"{_NAME.sub('-', hint.lower()).strip('-')[:24] or 'r'}-{len(self._bodies)}"
        self._bodies[name] = ""
        return name

    def define(self, name: str, body: str) -> None:
        self._wrote(len(body))
        self._set(name, body)

    def add(self, hint: str, body: str) -> str:
        """The name of a rule with this body (an existing one if the body was seen)."""
        self._wrote(len(body))
        name = self._names.get(body)
        if name is None:
            name = self.reserve(hint)
            self._set(name, body)
        return name

    def primitive(self, name: str) -> str:
        """A rule of PRIMITIVES (and those it uses), under its own name."""
        if name not in self._bodies:
            self._set(name, PRIMITIVES[name])
            for used in _USES.get(name, ()):
                self.primitive(used)
        return name

    def afford(self, chars: int, what: str = "this schema") -> None:
        """Refuse before writing `chars` characters that the grammar will hold (for `what`):
        when they alone pass max_bytes, or would take what is written past its bound."""
        if chars > self.limits.max_bytes:
            raise self._too_big(chars, at_least=True, what=what)
        if self._work + chars > WORK_FACTOR * self.limits.max_bytes:
            raise self._overworked()

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
        self._check_size()
        return atom + suffix

    def grammar(self, root: str) -> str:
        """The whole grammar with `root` as its root rule's body, within max_bytes."""
        self._bodies["root"] = root
        text = "\n".join(f"{name} ::= {body}" for name, body in self._bodies.items()) + "\n"
        size = len(text.encode()) + self._expanded
        if size > self.limits.max_bytes:
            raise self._too_big(size)
        return text

    def _set(self, name: str, body: str) -> None:
        self._bodies[name] = body
        self._names.setdefault(body, name)
        self._size += len(name) + len(body) + 6  # "name ::= body\n"
        self._check_size()

    def _wrote(self, chars: int) -> None:
        self._work += chars
        if self._work > WORK_FACTOR * self.limits.max_bytes:
            raise self._overworked()

    def _check_size(self) -> None:
        if self._size + self._expanded > self.limits.max_bytes:
            raise self._too_big(self._size + self._expanded, at_least=True)

    def _too_big(self, size: int, at_least: bool = False,
                 what: str = "this schema") -> InvalidRequest:
        return refuse(f"the grammar for {what} would take {'at least ' * at_least}"
                      f"{size} bytes once its repetitions are expanded, more than this server "
                      f"allows ({self.limits.max_bytes}, server.max_grammar_bytes). Lower "
                      "maxLength/maxItems or simplify the schema.")

    def _overworked(self) -> InvalidRequest:
        most = WORK_FACTOR * self.limits.max_bytes
        return refuse(f"writing the grammar for this schema takes more than {most} bytes "
                      "of rules, counting a part each time the schema reaches it; this server "
                      f"allows {WORK_FACTOR} times its grammar size ({self.limits.max_bytes}, "
                      "server.max_grammar_bytes). Simplify the schema (a part it repeats can "
                      "be written once in $defs and used by $ref).")
