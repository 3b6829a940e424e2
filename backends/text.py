"""Text handling shared by backends: incremental assembly (UTF-8 tails and stop strings, both
O(piece) per token: the completion is never re-decoded or re-scanned) and chat templates'
refusals of a conversation.
"""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import Callable, Iterator, Sequence

from backends.errors import InvalidRequest


class Utf8Stream:
    """Turns token bytes into text, holding back only an incomplete UTF-8 tail."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        #: push(data: bytes) -> str: the decoder's own method (called once per token)
        self.push: Callable[[bytes], str] = self._decoder.decode

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds stop strings across piece boundaries.

    `push` returns the text that is safe to emit and whether a stop string was hit; text that
    might be the start of a stop string is held back until the next piece decides.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return text[:min(hits)], True
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class TokenTextStream:
    """Text of generated token ids, for tokenizers that can only decode whole sequences.

    Each step decodes a short window (the tokens of the previous piece before the new ones, so
    leading spaces and multi-token characters come out right) and emits text only once it no
    longer ends in an incomplete character: O(window) per token, never the whole completion.
    """

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int],
                 window: int = 5) -> None:
        self._decode = decode
        self._ids = list(context[-window:]) if window else []
        self._read = len(self._ids)  # ids[:read] is context whose text was already emitted

    def push(self, token: int) -> str:
        self._ids.append(token)
        piece = self._new_text()
        if not piece or piece.endswith("\ufffd"):
            return ""
        del self._ids[:self._read]  # this step's tokens are the next step's context
        self._read = len(self._ids)
        return piece

    def flush(self) -> str:
        piece = self._new_text()
        self._ids, self._read = [], 0
        return piece

    def _new_text(self) -> str:
        done = self._decode(self._ids[:self._read])
        text = self._decode(self._ids)
        return text[len(done):] if len(text) > len(done) else ""


@contextlib.contextmanager
def chat_template_refusals() -> Iterator[None]:
    """Around a chat template's render: the template refusing the messages is the request's
    fault, so it becomes a 400 that quotes the template's reason, not a 500.

    Templates refuse with `raise_exception(...)` (Gemma: no system role; Mistral: roles must
    alternate), which is a jinja2 TemplateError under transformers and a ValueError under
    llama-cpp-python; messages a template cannot render at all raise TemplateError (e.g. an
    undefined value) or TypeError (e.g. adding a string to None)."""
    from jinja2 import TemplateError

    try:
        yield
    except (TemplateError, ValueError, TypeError) as exc:
        raise InvalidRequest(f"The model's chat template rejected the messages: {exc}",
                             param="messages") from None


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two lists share: a binary search over slice comparisons
    (each one a C loop), since prompts of thousands of tokens are matched on every
    admission."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n - 1  # a[:low] == b[:low]; a[:high + 1] != b[:high + 1]
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low

