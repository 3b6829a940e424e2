"""A minimal streaming client for bench/serving.py: OpenAI `/v1/completions` and
`/v1/chat/completions` with `stream: true`, read with http.client (little CPU on shared cores).

Tokens of a stream = the completion tokens the server reports in a final `usage` chunk
(llama-server, llm-api with `stream_options.include_usage`), else the number of streamed chunks
that carry a text field, the closing finish_reason chunk aside (llama-cpp-python's server:
one chunk per generated token). A stream also keeps the prompt tokens and cached prompt tokens
of that usage chunk, and llama-server's `timings` (`prompt_n`, `cache_n`, ...) when sent.
"""

from __future__ import annotations

import http.client
import json
import random
import string
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Stream:
    """One streamed request: times are time.perf_counter() values."""

    start: float = 0.0
    first: float | None = None  # first chunk with non-empty text
    end: float = 0.0
    chunks: int = 0
    usage: int | None = None
    prompt_tokens: int | None = None  # usage.prompt_tokens
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, if sent
    timings: dict[str, Any] = field(default_factory=dict)  # llama-server's last `timings`
    finish: str | None = None
    text: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.usage if self.usage is not None else self.chunks

    @property
    def ttft(self) -> float:
        return (self.first or self.end) - self.start


def unique_prefix(rng: random.Random, words: int = 6) -> str:
    """A random prefix per prompt: no two prompts share more than a few leading tokens, so a
    prefix cache cannot turn the benchmark into a cache benchmark."""
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))
                    for _ in range(words))


def _piece(chunk: dict[str, Any]) -> str | None:
    choices = chunk.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    if choice.get("finish_reason"):
        chunk["_finish"] = choice["finish_reason"]
        if not choice.get("text") and not (choice.get("delta") or {}).get("content"):
            return None  # a closing chunk, not a token
    if "text" in choice:
        return str(choice["text"] or "")
    delta = choice.get("delta") or {}
    return str(delta["content"] or "") if "content" in delta else None


def _read(response: http.client.HTTPResponse, result: Stream) -> None:
    while line := response.readline():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = str(chunk["error"])
            break
        if usage := chunk.get("usage"):
            result.usage = int(usage["completion_tokens"])
            result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            result.cached_tokens = result.cached_tokens if cached is None else int(cached)
        if isinstance(chunk.get("timings"), dict):
            result.timings = chunk["timings"]
        piece = _piece(chunk)
        result.finish = chunk.get("_finish", result.finish)
        if piece is None:
            continue
        result.chunks += 1
        if piece:
            result.first = result.first or time.perf_counter()
            result.text.append(piece)


def stream(port: int, path: str, body: dict[str, Any], timeout: float = 600) -> Stream:
    """POST `body` with stream=true and read the SSE stream to its end."""
    payload = json.dumps({**body, "stream": True,
                          "stream_options": {"include_usage": True}})
    result = Stream(start=time.perf_counter())
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            result.error = f"HTTP {response.status}: {response.read()[:300]!r}"
        else:
            _read(response, result)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        result.error = repr(exc)
    finally:
        result.end = time.perf_counter()
        connection.close()
    return result


def together(port: int, path: str, bodies: list[dict[str, Any]],
             gap: float = 0.0) -> tuple[list[Stream], float]:
    """Send the bodies concurrently (request i starts i × gap seconds after the first); return
    the streams and the wall time from the first request to the last stream's end."""
    results: list[Stream] = [Stream() for _ in bodies]
    origin = time.perf_counter()

    def run(i: int) -> None:
        delay = origin + i * gap - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        results[i] = stream(port, path, bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(bodies)} streams failed: {errors[0]}")
    return results, max(r.end for r in results) - origin
