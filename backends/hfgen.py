"""Token-by-token generation with a transformers model (huggingface and gptq families).

Our own step loop instead of `model.generate`: one forward pass per token (with the KV cache),
so every token reaches the scheduler at once and a cancelled request stops at the next token.
Sampling uses transformers' public logits processors, built from an explicit
`GenerationConfig`; randomness comes from a per-request `torch.Generator`, never the global
seed. Imported only when such a model loads (it imports torch).
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from backends.base import Chunk, GenerationParams
from backends.text import StopMatcher, TokenTextStream

if TYPE_CHECKING:
    from backends.hf_grammar import GrammarMatcher


def generation_config(params: GenerationParams, max_tokens: int) -> GenerationConfig:
    """Our request words → transformers' (temperature 0 = greedy; top_k 0 = off)."""
    common: dict[str, Any] = {"max_new_tokens": max_tokens,
                              "repetition_penalty": params.repeat_penalty}
    if params.temperature == 0:
        return GenerationConfig(do_sample=False, **common)  # type: ignore[no-untyped-call]
    return GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=True, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k or None, min_p=params.min_p or None, **common)


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's penalties over the generated tokens (transformers has none of its own)."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.start, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:
        generated = input_ids[:, self.start:]
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def logits_processors(config: GenerationConfig, params: GenerationParams,
                      prompt_length: int) -> LogitsProcessorList:
    """The processors `model.generate` would build for `config`, in its order."""
    processors = LogitsProcessorList()
    if config.repetition_penalty not in (None, 1.0):
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if params.presence_penalty or params.frequency_penalty:
        processors.append(PresenceFrequencyPenalty(prompt_length, params.presence_penalty,
                                                   params.frequency_penalty))
    if config.do_sample:
        if config.temperature not in (None, 1.0):
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            processors.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(config.top_p))
        if config.min_p:
            processors.append(MinPLogitsWarper(config.min_p))
    return processors


class TokenLoop:
    """Runs one sequence through a causal LM, one token per step."""

    def __init__(self, model: Any, eos_ids: set[int]) -> None:
        self.model = model
        self.eos_ids = eos_ids
        # logits of the last position only (not of every prompt token), where supported
        self.keeps_one = "logits_to_keep" in inspect.signature(model.forward).parameters

    def tokens(self, prompt: list[int], params: GenerationParams, max_tokens: int,
               grammar: GrammarMatcher | None = None) -> Iterator[int]:
        """Sampled token ids, until EOS (not yielded), `max_tokens`, or the end of the
        `grammar` that constrains them."""
        config = generation_config(params, max_tokens)
        processors = logits_processors(config, params, len(prompt))
        device = self.model.device
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        sequence = torch.tensor([prompt], dtype=torch.long, device=device)
        with torch.inference_mode():
            out = self._forward(sequence, None)
            for step in range(max_tokens):
                logits = out.logits[:, -1, :].float()
                if grammar is not None:
                    logits = grammar.mask(logits)
                scores = processors(sequence, logits)  # type: ignore[arg-type]
                if config.do_sample:
                    token = torch.multinomial(torch.softmax(scores, dim=-1), 1,
                                              generator=generator)
                else:
                    token = scores.argmax(dim=-1, keepdim=True)
                value = int(token.item())
                if value in self.eos_ids:
                    return
                complete = grammar is not None and grammar.advance(value)
                yield value
                if complete:
                    return
                if step + 1 < max_tokens:
                    sequence = torch.cat([sequence, token], dim=1)
                    out = self._forward(token, out.past_key_values)

    def _forward(self, ids: torch.Tensor, past: Any) -> Any:
        kwargs: dict[str, Any] = {"input_ids": ids, "past_key_values": past, "use_cache": True}
        if self.keeps_one:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs)


def text_chunks(tokens: Iterator[int], decode: Callable[[list[int]], str], prompt: list[int],
                params: GenerationParams, max_tokens: int,
                grammar: GrammarMatcher | None = None) -> Iterator[Chunk]:
    """Token ids → text chunks (one per token; stop strings cut and removed) + the final
    chunk with the finish reason and counts ("stop" when the `grammar` was completed, even
    by the last token allowed). The caller yields the accepted chunk first."""
    text, stops = TokenTextStream(decode, prompt), StopMatcher(params.stop)
    count, hit_stop = 0, False
    for token in tokens:
        count += 1
        piece, hit_stop = stops.push(text.push(token))
        yield Chunk(text=piece)
        if hit_stop:
            break
    if not hit_stop:
        tail, _ = stops.push(text.flush())
        if tail := tail + stops.flush():
            yield Chunk(text=tail)
    complete = grammar is not None and grammar.complete
    finish = "stop" if hit_stop or complete or count < max_tokens else "length"
    yield Chunk(finish_reason=finish, prompt_tokens=len(prompt), completion_tokens=count,
                cached_tokens=0)  # the serial path computes every prompt token
