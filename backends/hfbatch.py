"""Continuous batching for transformers models (huggingface and gptq families).

Every running sequence advances one token per `step`, all of them in ONE forward pass: their
KV caches live side by side in one `DynamicCache`, left-padded to the longest, with an
attention mask that hides the padding and explicit position ids, so a sequence computes what
it would compute alone. A newly admitted prompt is prefilled alone (batch of one, exactly
like the serial loop) and its cache is then joined to the batch; a retired or cancelled
sequence's rows are dropped at once and the padding columns nobody needs any more are cut.

Sampling stays per sequence: its own grammar mask (constrained output, backends.hf_grammar),
logits processors (penalties, temperature, top-k/p, min-p), its own seeded
`torch.Generator`, greedy at temperature 0; stop strings and text assembly are the serial
path's (`backends.text`). Imported only when such a model loads.

Why not transformers' `ContinuousBatchingManager`: it applies one generation config to every
request (no per-request penalties, min-p or seed) and runs its own thread, while the
scheduler drives engines step by step from the model's engine thread.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList
from transformers.cache_utils import DynamicLayer

from backends.base import BatchEngine, Chunk, GenerationParams, GenerationRequest
from backends.errors import BackendFailure, LLMAPIError
from backends.hfgen import generation_config, logits_processors
from backends.text import StopMatcher, TokenTextStream, common_prefix

if TYPE_CHECKING:
    from backends.hf_grammar import GrammarMatcher

log = logging.getLogger(__name__)

#: Prompt tokens prefilled per step (at least one whole prompt): a burst of long prompts
#: must not stall the running streams for many prompts' worth of compute at once.
PREFILL_BUDGET = 512

#: Leading prompt tokens a running sequence must share with a new prompt for its keys and
#: values to be copied instead of computed (as in the llama family's engine).
SHARE_MIN = 32

#: The backend's readying of a request: prompt ids, token budget, grammar matcher or None.
Prepare = Callable[[GenerationRequest], tuple[list[int], int, "GrammarMatcher | None"]]
Step = list[tuple[int, Chunk | LLMAPIError]]


@dataclass
class Sequence:
    """One request's decoding state."""

    key: int
    prompt: list[int]
    params: GenerationParams
    max_tokens: int
    config: GenerationConfig
    processors: LogitsProcessorList
    generator: torch.Generator
    text: TokenTextStream
    stops: StopMatcher
    grammar: GrammarMatcher | None = None
    generated: list[int] = field(default_factory=list)
    pending: list[Chunk] = field(default_factory=list)  # emitted at the next step (echo)
    next_token: int = -1  # sampled, not yet in the cache
    position: int = 0  # tokens of this sequence in the cache
    cached: int = 0  # prompt tokens whose keys and values were copied, not computed
    scope: str | None = None  # GenerationRequest.cache_scope: shares only within it

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from this sequence's row of logits (shape [vocab])."""
        scores = logits.float().unsqueeze(0)
        if self.grammar is not None:
            scores = self.grammar.mask(scores)
        if self.processors:
            ids = torch.tensor([self.prompt + self.generated], device=logits.device)
            scores = self.processors(ids, scores)  # type: ignore[arg-type]
        if self.config.do_sample:
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator)
            return int(token.item())
        return int(scores.argmax(dim=-1).item())

    def accept(self, token: int, eos_ids: set[int]) -> list[Chunk]:
        """Chunks for a sampled token (one piece per token, like the serial path); the last
        one carries `finish_reason` when the sequence is done."""
        if token in eos_ids:
            return self._finish(self._flushed([]), "stop")
        self.generated.append(token)
        complete = self.grammar is not None and self.grammar.advance(token)
        piece, hit_stop = self.stops.push(self.text.push(token))
        chunks = [Chunk(text=piece)]
        if hit_stop:
            return self._finish(chunks, "stop")
        if complete:
            return self._finish(self._flushed(chunks), "stop")
        if len(self.generated) >= self.max_tokens:
            return self._finish(self._flushed(chunks), "length")
        self.next_token = token
        return chunks

    def _flushed(self, chunks: list[Chunk]) -> list[Chunk]:
        """`chunks` and the text held back (an incomplete character, a possible stop
        string's start), as the serial path emits it at the end."""
        tail, _ = self.stops.push(self.text.flush())
        if tail := tail + self.stops.flush():
            chunks.append(Chunk(text=tail))
        return chunks

    def _finish(self, chunks: list[Chunk], reason: str) -> list[Chunk]:
        return [*chunks, Chunk(finish_reason=reason, prompt_tokens=len(self.prompt),
                               completion_tokens=len(self.generated), cached_tokens=self.cached)]


def left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros before the existing entries of `dim` (-1 or -2) up to `length`."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    return functional.pad(tensor, (missing, 0) if dim == -1 else (0, 0, missing, 0))


class HFBatchEngine(BatchEngine):
    """Decodes up to `max_sequences` sequences of one causal LM together."""

    def __init__(self, model: Any, eos_ids: set[int], decode: Callable[[list[int]], str],
                 prepare: Prepare, max_sequences: int, keep_one: bool,
                 share_prefixes: bool = True) -> None:
        self.model = model
        self.eos_ids = eos_ids
        self.max_sequences = max_sequences
        self._decode = decode
        self._prepare = prepare
        self._keep_one = keep_one  # the forward takes logits_to_keep
        self.share_prefixes = share_prefixes
        self.reused_tokens = 0  # prompt tokens copied from a running sequence's cache
        self._waiting: list[Sequence] = []
        self._running: list[Sequence] = []  # row i of the cache and the mask
        self._cache: Any = None
        self._mask: torch.Tensor | None = None

    @staticmethod
    def supports(model: Any, keep_one: bool) -> bool:
        """Whether the model's cache is a plain per-layer key/value cache we can pad and
        join (not sliding-window, quantized, or recurrent layers)."""
        one = torch.ones((1, 1), dtype=torch.long, device=model.device)
        kwargs = {"logits_to_keep": 1} if keep_one else {}
        with torch.inference_mode():
            out = model(input_ids=one, use_cache=True, **kwargs)
        cache = out.past_key_values
        return isinstance(cache, DynamicCache) and all(
            type(layer) is DynamicLayer for layer in cache.layers)

    # -- the BatchEngine contract ----------------------------------------------------------

    def admit(self, key: int, request: GenerationRequest) -> Chunk:
        prompt, max_tokens, grammar = self._prepare(request)
        params = request.params
        config = generation_config(params, max_tokens)
        generator = torch.Generator(device=self.model.device)
        generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        sequence = Sequence(key=key, prompt=prompt, params=params, max_tokens=max_tokens,
                            config=config,
                            processors=logits_processors(config, params, len(prompt)),
                            generator=generator, text=TokenTextStream(self._decode, prompt),
                            stops=StopMatcher(params.stop), grammar=grammar,
                            scope=request.cache_scope)
        if params.echo and request.prompt:
            sequence.pending.append(Chunk(text=request.prompt))
        self._waiting.append(sequence)
        return Chunk(prompt_tokens=len(prompt))

    def step(self) -> Step:
        out: Step = []
        with torch.inference_mode():
            if self._running:
                self._decode_running(out)
            self._prefill_waiting(out)
        return out

    def cancel(self, key: int) -> None:
        self._waiting = [s for s in self._waiting if s.key != key]
        rows = [i for i, s in enumerate(self._running) if s.key == key]
        if rows:
            self._drop_rows(set(rows))

    def active(self) -> int:
        return len(self._waiting) + len(self._running)

    @property
    def cached_rows(self) -> int:
        """Sequences whose keys and values are in the batched cache (for checks)."""
        return 0 if self._mask is None else int(self._mask.shape[0])

    # -- decoding --------------------------------------------------------------------------

    def _decode_running(self, out: Step) -> None:
        device = self.model.device
        assert self._mask is not None
        ones = torch.ones((len(self._running), 1), dtype=self._mask.dtype, device=device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._keep_one else {}
        try:
            result = self.model(
                input_ids=torch.tensor([[s.next_token] for s in self._running], device=device),
                attention_mask=self._mask, past_key_values=self._cache, use_cache=True,
                position_ids=torch.tensor([[s.position] for s in self._running], device=device),
                **kwargs)
        except Exception:  # noqa: BLE001 - every running sequence fails, the engine goes on
            log.exception("batched forward pass failed")
            out.extend((s.key, BackendFailure()) for s in self._running)
            self._running, self._cache, self._mask = [], None, None
            return
        self._cache = result.past_key_values
        logits = result.logits[:, -1, :]
        done = set()
        for row, sequence in enumerate(self._running):
            sequence.position += 1
            if not self._advance(sequence, logits[row], out):
                done.add(row)
        if done:
            self._drop_rows(done)

    def _advance(self, sequence: Sequence, logits: torch.Tensor, out: Step) -> bool:
        """Sample and emit one token; False once the sequence is retired."""
        try:
            chunks = sequence.accept(sequence.sample(logits), self.eos_ids)
        except Exception:  # noqa: BLE001 - this sequence fails, the others go on
            log.exception("sampling failed for sequence %s", sequence.key)
            out.append((sequence.key, BackendFailure()))
            return False
        out.extend((sequence.key, chunk) for chunk in chunks)
        return chunks[-1].finish_reason is None

    def _prefill_waiting(self, out: Step) -> None:
        budget = PREFILL_BUDGET
        while self._waiting and len(self._running) < self.max_sequences:
            if budget < len(self._waiting[0].prompt) and budget < PREFILL_BUDGET:
                return  # the next prompt waits for the next step
            sequence = self._waiting.pop(0)
            budget -= len(sequence.prompt)
            out.extend((sequence.key, chunk) for chunk in sequence.pending)
            self._prefill(sequence, out)

    def _prefill(self, sequence: Sequence, out: Step) -> None:
        if sequence.max_tokens <= 0:
            out.append((sequence.key, Chunk(finish_reason="length", completion_tokens=0,
                                            prompt_tokens=len(sequence.prompt),
                                            cached_tokens=0)))
            return
        device = self.model.device
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._keep_one else {}
        shared, past = self._shared_prefix(sequence) if self.share_prefixes else (0, None)
        try:
            if past is not None:
                tail = sequence.prompt[shared:]
                result = self.model(
                    input_ids=torch.tensor([tail], device=device), past_key_values=past,
                    position_ids=torch.arange(shared, len(sequence.prompt),
                                              device=device).unsqueeze(0),
                    use_cache=True, **kwargs)
                sequence.cached = shared
                self.reused_tokens += shared
            else:
                result = self.model(input_ids=torch.tensor([sequence.prompt], device=device),
                                    use_cache=True, **kwargs)
        except Exception:  # noqa: BLE001 - this prompt fails, the others go on
            log.exception("prefill failed for sequence %s", sequence.key)
            out.append((sequence.key, BackendFailure()))
            return
        sequence.position = len(sequence.prompt)
        if self._advance(sequence, result.logits[0, -1, :], out):
            self._join(sequence, result.past_key_values)

    # -- the batched cache -----------------------------------------------------------------

    def _shared_prefix(self, sequence: Sequence) -> tuple[int, Any]:
        """The longest run of leading tokens a running sequence of the same cache scope
        shares with the new one's prompt (at least SHARE_MIN; the last prompt token is always
        computed, for its logits), and a one-row cache of that sequence's keys and values
        for them; (0, None) when none."""
        prompt = sequence.prompt
        best, row = 0, -1
        for i, other in enumerate(self._running):
            if other.scope != sequence.scope:
                continue
            known = other.prompt + other.generated  # what its cache holds, in order
            n = common_prefix(known[:other.position], prompt[:-1])
            if n > best:
                best, row = n, i
        if best < SHARE_MIN or self._mask is None:
            return 0, None
        start = self._mask.shape[1] - int(self._mask[row].sum())  # its first real column
        past = DynamicCache()
        for index, layer in enumerate(self._cache.layers):
            past.update(layer.keys[row:row + 1, :, start:start + best].clone(),
                        layer.values[row:row + 1, :, start:start + best].clone(), index)
        return best, past

    def _join(self, sequence: Sequence, cache: Any) -> None:
        """Add a prefilled sequence's cache as the batch's last row."""
        mask = torch.ones((1, sequence.position), dtype=torch.long, device=self.model.device)
        self._running.append(sequence)
        if self._mask is None:
            self._cache, self._mask = cache, mask
            return
        length = max(self._mask.shape[1], sequence.position)
        for layer, new in zip(self._cache.layers, cache.layers, strict=True):
            layer.keys = torch.cat([left_pad(layer.keys, length, -2),
                                    left_pad(new.keys, length, -2)])
            layer.values = torch.cat([left_pad(layer.values, length, -2),
                                      left_pad(new.values, length, -2)])
        self._mask = torch.cat([left_pad(self._mask, length, -1), left_pad(mask, length, -1)])

    def _drop_rows(self, rows: set[int]) -> None:
        """Remove retired sequences' rows, then the padding columns no row needs."""
        keep = [i for i in range(len(self._running)) if i not in rows]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        assert self._mask is not None
        index = torch.tensor(keep, device=self._mask.device)
        self._mask = self._mask[index]
        start = int(self._mask.any(dim=0).long().argmax())  # first column some row uses
        self._mask = self._mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:, :]
            layer.values = layer.values[index, :, start:, :]

