"""`pattern` in a JSON schema → GBNF for the contents of a JSON string.

The regular expression is parsed by Python's own parser (`re._parser`, the one `re` and so
the `jsonschema` validator use), and every construct it yields is either translated into
grammar that enforces it or refused with a message naming it: nothing is passed through.

The grammar produces a subset of what the pattern matches, chosen so that it matches under
both Python's and ECMA-262's (JSON Schema's) reading: `\\d \\w \\s` are their ASCII members,
and a class complemented around a category (`\\D`, `[^\\w-]`) holds ASCII characters only
(Python's `\\D` also excludes non-ASCII digits). Characters a JSON string must escape are
produced escaped. Like `re.search`, an unanchored pattern may match inside the string: a
missing `^` or `$` lets any characters come before or after.
"""

from __future__ import annotations

import importlib
import re
import warnings
from typing import Any

from backends.grammar_gbnf import (
    SURROGATES,
    Rules,
    char_choice,
    complement,
    json_text,
    literal,
    normalize,
    refuse,
    subtract,
)

_parser: Any = importlib.import_module("re._parser")  # no stub: typeshed lacks it
_c: Any = importlib.import_module("re._constants")
# re's parser warns (FutureWarning) of "[[", "--", "&&" and "~~" in a class, once per
# position: a request's pattern must not write thousands of lines to the server log.
warnings.filterwarnings("ignore", category=FutureWarning,
                        message="Possible (nested set|set difference|set intersection|"
                        "set symmetric difference) at position")

MAX_PATTERN_DEPTH = 32  # nested groups and repetitions in one pattern
#: Characters of all the `pattern`s of one schema together, checked before any is parsed.
#: Parsing and converting cost CPU in proportion to their length, holding the GIL: ~7 ms a
#: schema at most at this bound, ~30 ms at 16384. (8 clients sending patterns that parse
#: that long, then are refused, held another client's one-token completion for 0.3-0.5 s,
#: median, at 4096 characters; 1.0 s at 16384.) Real patterns are short.
MAX_PATTERN_CHARS = 4096
_ASCII = [(0, 0x7F)]
_DIGIT = [(0x30, 0x39)]
_WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE = [(0x09, 0x0D), (0x20, 0x20)]  # ASCII whitespace to ECMA-262 and to Python
_PY_SPACE = [(0x09, 0x0D), (0x1C, 0x20)]  # ASCII whitespace to Python
#: category -> (the ASCII members both readings agree on, those either one counts,
#: complemented); within ASCII, Python and ECMA-262 differ only on \x1C-\x1F.
_CATEGORIES = {
    "CATEGORY_DIGIT": (_DIGIT, _DIGIT, False), "CATEGORY_NOT_DIGIT": (_DIGIT, _DIGIT, True),
    "CATEGORY_WORD": (_WORD, _WORD, False), "CATEGORY_NOT_WORD": (_WORD, _WORD, True),
    "CATEGORY_SPACE": (_SPACE, _PY_SPACE, False),
    "CATEGORY_NOT_SPACE": (_SPACE, _PY_SPACE, True),
}
_LINE_ENDS = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]  # `.` matches none of them
_REFUSED = {
    "GROUPREF": "backreferences (\\1)", "GROUPREF_EXISTS": "conditional groups",
    "ASSERT": "lookahead/lookbehind", "ASSERT_NOT": "lookahead/lookbehind",
    "POSSESSIVE_REPEAT": "possessive quantifiers", "ATOMIC_GROUP": "atomic groups",
}
SUPPORTED = ("literal characters and escapes, ., [...] and [^...] classes with ranges, "
             "\\d \\w \\s \\D \\W \\S, groups, alternation |, ? * + {m} {m,} {m,n}, and ^ $ "
             "at the start and end")


def pattern_grammar(pattern: str, rules: Rules, where: str) -> str:
    """A GBNF expression for the contents of a JSON string whose text `pattern` matches."""
    try:
        parsed = _parser.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        # ValueError: a {m,n} count of more than 4300 digits (int()'s limit)
        raise refuse(f"{where} is not a valid regular expression ({exc}).") from None
    if parsed.state.flags & ~_c.SRE_FLAG_UNICODE:
        raise refuse(f"{where} sets flags ((?i), (?m), ...), which constrained output cannot "
                     f"enforce. Supported: {SUPPORTED}.")
    return _Pattern(rules, where).top(list(parsed))


class _Pattern:
    def __init__(self, rules: Rules, where: str) -> None:
        self.rules = rules
        self.where = where
        self.written = 0  # characters of grammar written for the pattern's parts so far

    def _wrote(self, part: str) -> str:
        """`part`, counted: the pattern is refused as soon as its grammar grows past
        server.max_grammar_bytes (a class such as `.` takes hundreds of bytes)."""
        self.written += len(part)
        self.rules.afford(self.written, self.where)
        return part

    def refuse(self, what: str) -> Exception:
        return refuse(f"{self.where} uses {what}, which constrained output cannot enforce. "
                      f"Supported: {SUPPORTED}.")

    def top(self, items: list[Any]) -> str:
        """The whole pattern: each top-level alternative anchored (or not) on its own."""
        if len(items) == 1 and items[0][0] is _c.BRANCH:
            return "( " + " | ".join(self._anchored(list(b)) for b in items[0][1][1]) + " )"
        return self._anchored(items)

    def _anchored(self, items: list[Any]) -> str:
        starts = (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING)
        ends = (_c.AT_END, _c.AT_END_STRING)
        start = bool(items) and items[0][0] is _c.AT and items[0][1] in starts
        items = items[1:] if start else items
        end = bool(items) and items[-1][0] is _c.AT and items[-1][1] in ends
        items = items[:-1] if end else items
        free = "" if start and end else self.rules.primitive("char") + "*"
        body = self._sequence(items, depth=0, times=1)
        return " ".join(part for part in ("" if start else free, body, "" if end else free)
                        if part and part != '""') or '""'

    def _sequence(self, items: list[Any], depth: int, times: int) -> str:
        """Consecutive items; `times`: how often the enclosing repetitions repeat them."""
        parts: list[str] = []
        text = ""  # consecutive literal characters, written as one literal
        for op, arg in items:
            if op is _c.LITERAL:
                if SURROGATES[0] <= arg <= SURROGATES[1]:
                    raise self.refuse("a surrogate code point (not a character)")
                text += json_text(arg)
                continue
            if text:
                parts.append(self._wrote(literal(text)))
                text = ""
            part = self._item(op, arg, depth, times)
            # groups and alternatives hold parts counted already
            parts.append(part if op in (_c.BRANCH, _c.SUBPATTERN) else self._wrote(part))
        if text:
            parts.append(self._wrote(literal(text)))
        return " ".join(parts) or '""'

    def _item(self, op: Any, arg: Any, depth: int, times: int) -> str:
        if depth >= MAX_PATTERN_DEPTH:
            raise refuse(f"{self.where} nests groups and repetitions more than "
                         f"{MAX_PATTERN_DEPTH} deep.")
        if op is _c.NOT_LITERAL:
            return self._class(complement([(arg, arg)]))
        if op is _c.ANY:
            return self._class(complement(_LINE_ENDS))
        if op is _c.IN:
            return self._class(self._set(arg))
        if op is _c.BRANCH:
            return "( " + " | ".join(self._sequence(list(b), depth + 1, times)
                                     for b in arg[1]) + " )"
        if op is _c.SUBPATTERN:
            if arg[1] or arg[2]:
                raise self.refuse("flags inside a group ((?i:...))")
            return "( " + self._sequence(list(arg[3]), depth + 1, times) + " )"
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            low, high, item = arg
            return self._repeat(low, high, item, depth, times)
        if op is _c.AT:
            if arg in (_c.AT_BOUNDARY, _c.AT_NON_BOUNDARY):
                raise self.refuse("word boundaries (\\b, \\B)")
            raise self.refuse("^ or $ inside the pattern (only at its start and end)")
        raise self.refuse(_REFUSED.get(str(op), str(op)))

    def _repeat(self, low: int, high: int, item: Any, depth: int, times: int) -> str:
        upper = None if high is _c.MAXREPEAT else int(high)
        written = f"{{{low}}}" if low == upper else f"{{{low},{'' if upper is None else upper}}}"
        for bound in (low, upper or 0):
            self.rules.check_repeat(bound * times, f"{self.where}: the repetition {written}" +
                                    (f" inside repetitions (x{times})" if times > 1 else ""))
        if (upper is None or upper > 1) and _nullable(list(item)):
            # llama.cpp's matcher walks every way an empty repeat can be skipped: a pattern
            # like (a?){0,500} took 25 s a token.
            raise self.refuse(f"a repetition {written} of a part that can match nothing "
                              "(like (a?)* or (a|)+); repeat the non-empty part instead")
        body = self._sequence(list(item), depth + 1, times * max(low, upper or 1))
        return self.rules.repeat(body, low, upper, "pattern")

    def _class(self, ranges: list[tuple[int, int]]) -> str:
        choice = char_choice(subtract(ranges, [SURROGATES]))
        if choice is None:
            raise refuse(f"{self.where} has a character class that matches no character.")
        return choice

    def _set(self, items: list[Any]) -> list[tuple[int, int]]:
        """The code points of a [...] class: for a category, the members both readings
        agree on, and where the class is complemented around a category, ASCII only
        (see the module's docstring)."""
        negate = any(op is _c.NEGATE for op, _ in items)
        ascii_only = False
        members: list[tuple[int, int]] = []
        for op, arg in items:
            if op is _c.LITERAL:
                members.append((arg, arg))
            elif op is _c.RANGE:
                members.append(arg)
            elif op is _c.CATEGORY and str(arg) in _CATEGORIES:
                narrow, wide, complemented = _CATEGORIES[str(arg)]
                ascii_only |= negate
                # members of a complemented class are what it must not produce: the wide
                # reading of the category there, the narrow one elsewhere
                if complemented:
                    members.extend(subtract(_ASCII, narrow if negate else wide))
                else:
                    members.extend(wide if negate else narrow)
            elif op is not _c.NEGATE:
                raise self.refuse(f"the class item {arg}")
        result = complement(members) if negate else normalize(members)
        return subtract(result, complement(_ASCII)) if ascii_only else result


def _nullable(items: list[Any]) -> bool:
    """Whether the parsed items can match the empty string."""
    for op, arg in items:
        if op is _c.AT:
            continue
        if op is _c.BRANCH:
            if not any(_nullable(list(b)) for b in arg[1]):
                return False
        elif op is _c.SUBPATTERN:
            if not _nullable(list(arg[3])):
                return False
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            if arg[0] > 0 and not _nullable(list(arg[2])):
                return False
        else:
            return False
    return True
