"""Constrained output for transformers models (huggingface and gptq families): the GBNF the
server writes for JSON output and forced tool calls (backends.grammar), run by llguidance.

The GBNF is converted to llguidance's Lark dialect (by llguidance's own converter, with three
fixes: `to_lark`) and compiled against the model's vocabulary (an `LLTokenizer` made from
the fast tokenizer, once per model, on first use). Each step the request's matcher computes
which tokens keep the output inside the grammar, one bit per token; every other token's
logit becomes -inf before the logits processors and the sampler run, and the sampled token
advances the matcher. The output ends when the grammar allows nothing more (EOS is allowed
wherever the grammar may end).

Compiling (milliseconds for the grammars the server writes, up to about a second for huge
ones) runs where the request is readied, off the engine thread, and a grammar llguidance
rejects is a 400 there. The compiled matcher is kept by its grammar text; each request
decodes with a copy of it (microseconds). Imported only when such a model loads.
"""

from __future__ import annotations

import logging
import string
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from llguidance.gbnf_to_lark import (
    ASTNode,
    GrammarParser,
    Position,
    RegexNode,
    RepetitionNode,
    SequenceNode,
    resolve,
)

from backends.base import GenerationParams
from backends.errors import BackendFailure, InvalidRequest
from backends.grammar import GrammarLimits, compile_grammar

log = logging.getLogger(__name__)

CACHED_GRAMMARS = 32  # compiled grammars kept per model, the least recently used dropped


def available(tokenizer: Any) -> bool:
    """Whether constrained output works for `tokenizer`: a fast one (llguidance reads its
    Rust tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    return isinstance(tokenizer, PreTrainedTokenizerFast)


def wanted(params: GenerationParams) -> bool:
    """Whether the request's output is constrained."""
    return params.grammar is not None or params.json_mode or \
        params.json_schema is not None or params.tool_choice is not None


class GrammarCompiler:
    """One model's compiled grammars, by grammar text. Thread-safe: the server's prepare step
    compiles on the tokenizer thread while the engine thread copies."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], vocab_size: int) -> None:
        self._hf_tokenizer = tokenizer
        self._eos = sorted(eos_ids)
        self.vocab_size = max(vocab_size, len(tokenizer))  # logits may be padded past it
        self._tokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # of `_compiled`: held for a look-up only
        self._tokenizer_lock = threading.Lock()  # of `_tokenizer`, built once (up to ~1 s)

    def grammar(self, params: GenerationParams, tools: Sequence[dict[str, Any]] | None,
                tool_format: str) -> str | None:
        """The request's GBNF: the one written in the prepare step, else (a direct caller of
        the backend) written now with the default limits; None for free text."""
        if params.grammar is not None or not wanted(params):
            return params.grammar
        return compile_grammar(params, GrammarLimits(), tools, tool_format)

    def precompile(self, params: GenerationParams, tools: Sequence[dict[str, Any]] | None,
                   tool_format: str) -> None:
        """Compile the request's grammar ahead of the engine (InvalidRequest when llguidance
        rejects it). A grammar the writer refuses with the default limits is left to the
        prepare step, which writes it with the model's own limits and says why."""
        if not wanted(params):
            return
        try:
            gbnf = self.grammar(params, tools, tool_format)
        except InvalidRequest:
            return
        if gbnf is not None:
            self._matcher(gbnf, _param(params))

    def matcher(self, gbnf: str, params: GenerationParams) -> GrammarMatcher:
        """A fresh matcher of `gbnf` for one request."""
        return GrammarMatcher(self._matcher(gbnf, _param(params)).deep_copy(), self.vocab_size)

    def _matcher(self, gbnf: str, param: str) -> Any:
        with self._lock:
            found = self._compiled.get(gbnf)
            if found is not None:
                self._compiled.move_to_end(gbnf)
                return found
        compiled = self._compile(gbnf, param)  # outside the lock: it may take a while
        with self._lock:
            self._compiled[gbnf] = compiled
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return compiled

    def _compile(self, gbnf: str, param: str) -> Any:
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(to_lark(gbnf))
        except Exception as exc:  # noqa: BLE001 - the converter raises plain Exceptions too
            reason = f"{type(exc).__name__}: {exc}"
        else:
            # the matcher never raises for a bad grammar: it is born in its error state
            matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
            if not matcher.is_error():
                return matcher
            reason = matcher.get_error()
        log.info("llguidance could not compile a grammar (%d bytes): %s", len(gbnf),
                 reason[:2000])
        what = "the tools' parameter schemas" if param == "tools" else "the schema"
        raise InvalidRequest(f"{param}: the grammar made from this request cannot be used "
                             "for constrained decoding (the server log has the reason); "
                             f"simplify {what}.", param=param)

    def _llg_tokenizer(self) -> Any:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos or None)
            return self._tokenizer


def _param(params: GenerationParams) -> str:
    """What a refused grammar's 400 names: the tools whose schemas a forced call enforces,
    else the response format."""
    return "tools" if params.tool_choice is not None else "response_format"


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        # llguidance's bitmask: bit i of 32-bit word j allows token 32 * j + i
        words = np.zeros((vocab_size + 31) // 32, dtype="<u4")
        self._bytes = words.view(np.uint8)  # little-endian: byte k bit b is token 8k + b
        self._address, self._size = words.ctypes.data, words.nbytes
        self.complete = False  # the grammar allows nothing more

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (of the vocabulary, last dimension) with every token the grammar does
        not allow at this step set to -inf."""
        self._matcher.unsafe_compute_mask_ptr(self._address, self._size)
        if self._matcher.is_error():
            raise self._failure()
        size = logits.shape[-1]
        allowed = np.unpackbits(self._bytes, count=min(size, self._bytes.size * 8),
                                bitorder="little")
        blocked = torch.from_numpy(allowed == 0)
        if size > blocked.numel():  # logits past the mask's vocabulary: never allowed
            blocked = torch.cat([blocked, blocked.new_ones(size - blocked.numel())])
        return logits.masked_fill(blocked.to(logits.device), float("-inf"))

    def advance(self, token: int) -> bool:
        """Consume a sampled token; True once the grammar is complete."""
        if not self._matcher.consume_token(token):
            raise self._failure()
        self.complete = self._matcher.is_stopped()
        return self.complete

    def _failure(self) -> BackendFailure:
        log.warning("constrained decoding failed: %s", self._matcher.get_error()[:2000])
        return BackendFailure("Constrained decoding stopped: the grammar of this request "
                              "failed at this point of the output (the server log has the "
                              "reason); simplify the schema.")


# -- GBNF to Lark --------------------------------------------------------------------------

class _Parser(GrammarParser):
    """llguidance's GBNF parser, reading three things of llama.cpp's GBNF the way llama.cpp
    does where its converter (1.9) does not: `\\uXXXX` and `\\UXXXXXXXX` escapes (it drops
    their leading zeros, which Lark strings and Rust regexes then reject or misread), a
    repetition of zero times (`x{0}`, which Lark rejects: it matches the empty string) and
    `.` (any character, newline included; a Rust regex's `.` is not newline)."""

    in_class = False

    def _parse_char_class(self, pos: Position) -> tuple[ASTNode, Position]:
        self.in_class = True
        try:
            return super()._parse_char_class(pos)
        finally:
            self.in_class = False

    def _parse_char(self, pos: Position) -> tuple[str, Position]:
        escape = pos.peek(2)
        width = {"\\u": 4, "\\U": 8, "\\x": 2}.get(escape, 0)
        digits = pos.peek(2 + width)[2:]
        if width and len(digits) == width and all(c in string.hexdigits for c in digits):
            return self._code_point(int(digits, 16)), pos.advance(2 + width)
        return super()._parse_char(pos)

    def _code_point(self, cp: int) -> str:
        """A code point in a Rust regex class (`\\x{...}`) or a Lark string (JSON's
        `\\uXXXX`; above U+FFFF the character itself)."""
        if self.in_class:
            return f"\\x{{{cp:X}}}"
        return f"\\u{cp:04X}" if cp <= 0xFFFF else chr(cp)

    def _parse_sequence(self, pos: Position, is_nested: bool) -> tuple[SequenceNode, Position]:
        sequence, pos = super()._parse_sequence(pos, is_nested)
        for i, node in enumerate(sequence.nodes):
            inner = node.node if isinstance(node, RepetitionNode) else node
            if isinstance(inner, RegexNode) and inner.rx == ".":
                inner.rx = "(?s:.)"
            if isinstance(node, RepetitionNode) and node.max_times == 0:
                sequence.nodes[i] = SequenceNode([])  # written as ""
        return sequence, pos


def to_lark(gbnf: str) -> str:
    """`gbnf` in llguidance's Lark dialect (llguidance.gbnf_to_lark.gbnf_to_lark, with
    `_Parser`)."""
    rules = _Parser().parse(gbnf)
    resolve(rules)
    lark, separated = "%llguidance {}\n\n", True
    for rule in sorted(rules.values(), key=lambda r: r.order):
        text = str(rule)
        if not separated and "\n" in text:
            lark += "\n"
        separated = "\n" in text
        lark += text + ("\n\n" if separated else "\n")
    return lark
