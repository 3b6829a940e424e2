"""Request bodies read as JSON in one place, with bounds, for every route.

Starlette's `Request.json()` is a plain `json.loads`: 50,000 nested arrays raise
RecursionError (a 500 with tracebacks), and NaN, Infinity, duplicate keys and UTF-16 bodies
are accepted. `parse_body` refuses all of them, and nesting deeper than MAX_JSON_DEPTH, so
nothing that reads a parsed body (validation, the JSON-schema converter) can recurse without
bound. Routers use `JSONBodyRoute`, whose requests parse with it; FastAPI turns the
`json.JSONDecodeError` it raises into a `json_invalid` validation error (the one error shape,
422) carrying the reason.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

#: Arrays and objects nested in one another, the body itself being level 1. Real bodies,
#: tool and JSON schemas included, stay far below (a schema ten objects deep is ~25 levels).
MAX_JSON_DEPTH = 128
#: A \\uD800-\\uDFFF escape: json.loads joins a valid pair into one character and keeps a
#: lone one as a surrogate, which no UTF-8 encoder (tokenizers, the database, our own error
#: messages) accepts. Bodies with none of these escapes (nearly all) skip the walk below.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class BodyNotJSON(json.JSONDecodeError):
    """A body the server does not read as JSON; `msg` says why, for the client."""

    def __init__(self, reason: str, doc: str = "", pos: int = 0) -> None:
        super().__init__(reason, doc, pos)


def parse_body(body: bytes) -> Any:
    """The JSON value of a request body: UTF-8, at most MAX_JSON_DEPTH levels deep, without
    NaN/Infinity or duplicate keys. Raises BodyNotJSON (a json.JSONDecodeError) otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyNotJSON(f"the body is not UTF-8 text (byte {exc.start} cannot be decoded); "
                          "send JSON encoded as UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant,
                           object_pairs_hook=_unique_keys)
    except BodyNotJSON:
        raise
    except json.JSONDecodeError as exc:
        raise BodyNotJSON(f"{exc.msg} at line {exc.lineno} column {exc.colno}", text,
                          exc.pos) from None
    except RecursionError:  # nested deeper than the interpreter's stack allows
        raise _too_deep() from None
    except ValueError:  # the one other failure of json.loads: an integer's length
        raise BodyNotJSON(f"a number has more than {sys.get_int_max_str_digits()} digits; "
                          "send fewer") from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise _too_deep()
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise BodyNotJSON("a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff "
                          "without its pair), which is not a character; send valid Unicode")
    return value


def _too_deep() -> BodyNotJSON:
    return BodyNotJSON(f"arrays and objects are nested more than {MAX_JSON_DEPTH} levels "
                       "deep; at most that many are accepted")


def _refuse_constant(name: str) -> Any:
    raise BodyNotJSON(f"{name} is not a JSON number; send a finite number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which of two equal keys wins: refuse rather than pick one.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        counts = Counter(key for key, _ in pairs)
        twice = next(key for key, n in counts.items() if n > 1)
        raise BodyNotJSON(f"the key {json.dumps(twice)} appears twice in one object; "
                          "keys must be unique")
    return obj


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` nests arrays/objects more than `limit` levels, level by level
    (iterative: the check itself must not recurse)."""
    level = [value] if type(value) in (dict, list) else []
    for _ in range(limit):
        deeper: list[Any] = []
        for item in level:
            children = item.values() if type(item) is dict else item
            # json.loads makes plain dicts and lists only: exact class checks are enough,
            # and twice as fast over a body of many small arrays
            deeper += [c for c in children if c.__class__ is list or c.__class__ is dict]
        if not deeper:
            return False
        level = deeper
    return True


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a string (or key) anywhere in `value` holds an unpaired surrogate."""
    todo = [value]
    while todo:
        item = todo.pop()
        strings: list[Any] = [item] if type(item) is str else []
        if type(item) is dict:
            strings += item.keys()
            todo += item.values()
        elif type(item) is list:
            todo += item
        for text in strings:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


class BoundedJSONRequest(Request):
    """A request whose `json()` is `parse_body`."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_body(await self.body())
        return self._json


class JSONBodyRoute(APIRoute):
    """Routes whose JSON bodies are parsed by `parse_body` (set as each router's
    `route_class`; a test checks that every route with a body uses it)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(BoundedJSONRequest(request.scope, request.receive))

        return bounded
