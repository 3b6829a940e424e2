"""What crosses a process boundary, as JSON: requests, chunks, results and domain errors.

Both transports (a local worker's pipe, Redis Streams) carry the same encoding. Nothing is
unpickled: a message names its kind and each kind is decoded by its own function, so a
hostile value inside a request (a JSON schema, a chat message) is only ever data.
"""

from __future__ import annotations

import base64
import json
from array import array
from dataclasses import asdict, fields
from typing import Any

from backends.base import Chunk, GenerationParams, GenerationRequest, TokenLogprob
from backends.errors import BackendFailure, LLMAPIError
from engine.jobs import END, Job
from engine.ops import Prepared

_PARAM_FIELDS = {f.name for f in fields(GenerationParams)}


def dumps(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


def loads(data: bytes) -> dict[str, Any]:
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("a message is a JSON object")
    return message


# -- requests --------------------------------------------------------------------------------

def request_out(request: GenerationRequest) -> dict[str, Any]:
    params = asdict(request.params)
    return {"prompt": request.prompt,
            "messages": list(request.messages) if request.messages is not None else None,
            "tools": list(request.tools) if request.tools else None,
            "template_kwargs": request.template_kwargs,
            "params": params,
            "prompt_ids": list(request.prompt_ids) if request.prompt_ids is not None else None,
            "cache_scope": request.cache_scope}


def request_in(data: dict[str, Any]) -> GenerationRequest:
    params = {k: v for k, v in data["params"].items() if k in _PARAM_FIELDS}
    params["stop"] = tuple(params.get("stop") or ())
    if params.get("tool_choice") is not None:
        params["tool_choice"] = tuple(params["tool_choice"])
    messages = data.get("messages")
    ids = data.get("prompt_ids")
    tools = data.get("tools")
    return GenerationRequest(prompt=data.get("prompt"),
                             messages=tuple(messages) if messages is not None else None,
                             tools=tuple(tools) if tools else None,
                             template_kwargs=data.get("template_kwargs") or None,
                             params=GenerationParams(**params),
                             prompt_ids=tuple(ids) if ids is not None else None,
                             cache_scope=data.get("cache_scope"))


def job_out(job: Job, call: tuple[str, tuple[Any, ...]] | None, timeout: float) -> dict[str, Any]:
    """The message that starts `job` where its model runs (see `engine.host.ModelHost.open`)."""
    message: dict[str, Any] = {"id": job.id, "timeout": timeout}
    if job.request_id is not None:
        message["request_id"] = job.request_id
    if call is not None:
        name, args = call
        if name == "prepare":
            args = (request_out(args[0]), args[1])
        message["call"] = [name, list(args)]
    elif job.request is not None:
        message["request"] = request_out(job.request)
    else:
        message["texts"] = list(job.texts or ())
    return message


# -- items (what a job produces) --------------------------------------------------------------

def _bytes_out(piece: bytes) -> str:
    return base64.b64encode(piece).decode()


def _logprob_out(lp: TokenLogprob) -> list[Any]:
    return [_bytes_out(lp.piece), lp.logprob, [[_bytes_out(p), v] for p, v in lp.top]]


def _logprob_in(data: list[Any]) -> TokenLogprob:
    piece, logprob, top = data
    return TokenLogprob(base64.b64decode(piece), logprob,
                        tuple((base64.b64decode(p), v) for p, v in top))


def item_out(item: Any) -> list[Any]:
    """[kind, payload] for one item a job emitted."""
    if item is END:
        return ["end", None]
    if isinstance(item, Chunk):
        return ["chunk", [item.text, item.finish_reason, item.prompt_tokens,
                          item.completion_tokens,
                          [_logprob_out(lp) for lp in item.logprobs] or None,
                          item.cached_tokens]]
    if isinstance(item, BaseException):
        return ["error", error_out(item)]
    if isinstance(item, Prepared):
        return ["prepared", [request_out(item.request), item.reservation, item.clamped]]
    if isinstance(item, list) and item and isinstance(item[0], list) \
            and all(isinstance(x, float) for x in item[0]):
        dims = len(item[0])
        flat = array("d", (x for row in item for x in row))
        return ["vectors", [dims, base64.b64encode(flat.tobytes()).decode()]]
    return ["value", item]


def item_in(kind: str, payload: Any) -> Any:
    if kind == "chunk":
        text, finish, prompt, completion, logprobs, *rest = payload  # rest: a newer field
        return Chunk(text, finish, prompt, completion,
                     tuple(_logprob_in(lp) for lp in logprobs or ()), rest[0] if rest else None)
    if kind == "end":
        return END
    if kind == "error":
        return error_in(payload)
    if kind == "prepared":
        request, reserved, clamped = payload
        return Prepared(request_in(request), reserved, clamped)
    if kind == "vectors":
        dims, data = payload
        flat = array("d")
        flat.frombytes(base64.b64decode(data))
        values = flat.tolist()
        return [values[i:i + dims] for i in range(0, len(values), dims)]
    if kind == "value":
        return payload
    raise ValueError(f"unknown item kind {kind!r}")


# -- errors ---------------------------------------------------------------------------------

_PLAIN = (str, int, float, bool, type(None))


def error_out(exc: BaseException) -> dict[str, Any]:
    if not isinstance(exc, LLMAPIError):
        exc = BackendFailure()
    attrs = {k: v for k, v in vars(exc).items()
             if k not in ("message", "param") and _jsonable(v)}
    return {"class": f"{type(exc).__module__}:{type(exc).__qualname__}",
            "message": exc.message, "param": exc.param, "attrs": attrs}


def _jsonable(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, dict):
        return all(isinstance(k, str) and isinstance(v, _PLAIN) for k, v in value.items())
    return False


def _error_classes() -> dict[str, type[LLMAPIError]]:
    found: dict[str, type[LLMAPIError]] = {}
    todo: list[type[LLMAPIError]] = [LLMAPIError]
    while todo:
        cls = todo.pop()
        found[f"{cls.__module__}:{cls.__qualname__}"] = cls
        todo.extend(cls.__subclasses__())
    return found


def error_in(data: dict[str, Any]) -> LLMAPIError:
    """The domain error a message describes; a class this process does not know (only
    LLMAPIError subclasses are looked up, never imported) is a BackendFailure."""
    cls = _error_classes().get(str(data.get("class")))
    if cls is None:
        return BackendFailure()
    exc = cls.__new__(cls)
    message = str(data.get("message", ""))
    Exception.__init__(exc, message)
    exc.message, exc.param = message, data.get("param")
    for key, value in (data.get("attrs") or {}).items():
        if isinstance(key, str) and not key.startswith("_"):
            setattr(exc, key, value)
    return exc
