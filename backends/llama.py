"""llama.cpp through llama-cpp-python: GGUF files, CPU or GPU.

llama_cpp is imported when a model loads, never at import time, so validating settings or
serving other families does not need it.
"""

from __future__ import annotations

import ctypes
import logging
import secrets
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from backends.base import (
    CHAT,
    EMBED,
    GENERATE,
    JSON_OUTPUT,
    LOGPROBS,
    TOKENIZE,
    Backend,
    BatchEngine,
    Chunk,
    GenerationRequest,
    ModelParams,
    ModelSpec,
    TokenLogprob,
)
from backends.errors import (
    CapabilityNotSupported,
    ContextLengthExceeded,
    InvalidRequest,
    ModelLoadError,
)
from backends.grammar import json_grammar
from backends.text import StopMatcher, Utf8Stream

if TYPE_CHECKING:
    from llama_cpp import Llama

    from backends.llama_batch import LlamaBatchEngine

log = logging.getLogger(__name__)


class LlamaParams(ModelParams):
    """`model_params` of `model_family: llama` (passed to llama_cpp.Llama)."""

    n_ctx: int = Field(2048, ge=0, le=1_048_576, description="Context size in tokens "
                       "(prompt + completion); 0 = the model's training context.")
    n_threads: int | None = Field(None, ge=1, le=1024, description="CPU threads for "
                                  "generation; default: llama.cpp's choice (physical cores).")
    n_threads_batch: int | None = Field(None, ge=1, le=1024, description="CPU threads for "
                                        "prompt processing; default: n_threads.")
    n_batch: int = Field(512, ge=1, le=65_536, description="Prompt tokens per decode call.")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to the GPU; -1 = all.")
    main_gpu: int = Field(0, ge=0, description="GPU used for the model when not split.")
    flash_attn: bool | Literal["auto"] = Field(
        "auto", description="Flash attention: true, false or auto (llama.cpp decides; the "
        "serial context of logprobs-free direct calls uses it only when true).")
    parallel: int = Field(4, ge=1, le=64, description="Sequences decoded together (continuous "
                          "batching). Each gets its own n_ctx tokens: the KV cache holds "
                          "n_ctx x parallel cells.")
    prompt_chunk: int = Field(256, ge=1, le=65_536, description="Prompt tokens fed per "
                              "batched decode step while other sequences are generating, so "
                              "a long prompt never stalls running streams for long (with "
                              "none generating, up to max(prompt_chunk, 512) a step).")
    use_mmap: bool = Field(True, description="Map the file instead of reading it.")
    use_mlock: bool = Field(False, description="Lock the weights in RAM.")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the "
                                      "GGUF's tokenizer.chat_template.")
    embeddings: bool = Field(True, description="Serve /embeddings (mean-pooled; a second "
                             "context is created on the first embeddings request).")
    normalize_embeddings: bool = Field(True, description="L2-normalise embedding vectors.")
    verbose: bool = Field(False, description="Print llama.cpp's own log.")


class LlamaBackend(Backend):
    family = "llama"
    Params = LlamaParams

    def __init__(self, llm: Llama, params: LlamaParams, path: str) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._llm = llm
        self._params = params
        self._path = path
        self._embedder: Llama | None = None
        self._engine: LlamaBatchEngine | None = None
        self._n_ctx = int(llm.n_ctx())  # read once: /ready may ask while the engine closes
        self._vocab = llm._model.vocab
        self._pieces: dict[int, bytes] = {}
        template = params.chat_template or llm.metadata.get("tokenizer.chat_template")
        self._chat = self._formatter(template) if template else None
        caps = {GENERATE, TOKENIZE, JSON_OUTPUT, LOGPROBS} | (
            {EMBED} if params.embeddings else set())
        self.capabilities = frozenset(caps | ({CHAT} if self._chat else set()))

    @classmethod
    def load(cls, spec: ModelSpec) -> Backend:
        from llama_cpp import Llama

        params = spec.params
        assert isinstance(params, LlamaParams)
        if spec.path is None or not spec.path.is_file():
            raise ModelLoadError(f"model '{spec.name}': the llama family needs a .gguf file, "
                                 f"got '{spec.path}'")
        try:
            llm = Llama(model_path=str(spec.path), **cls._engine_kwargs(params))
        except ValueError as exc:  # llama-cpp-python's way of saying "could not load"
            raise ModelLoadError(f"model '{spec.name}': '{spec.path.name}' could not be loaded "
                                 "by llama.cpp (not a valid GGUF file?)") from exc
        return cls(llm, params, str(spec.path))

    @staticmethod
    def _engine_kwargs(params: LlamaParams) -> dict[str, Any]:
        kwargs = params.model_dump(exclude={"chat_template", "embeddings",
                                            "normalize_embeddings", "parallel", "prompt_chunk"})
        kwargs["flash_attn"] = params.flash_attn is True
        return kwargs

    def _formatter(self, template: str) -> Any:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def token_text(token: int) -> str:
            return self._llm._model.token_get_text(token) if token >= 0 else ""

        return Jinja2ChatFormatter(template=template, eos_token=token_text(self._llm.token_eos()),
                                   bos_token=token_text(self._llm.token_bos()))

    @property
    def context_length(self) -> int:
        """Tokens one request may use: the batching engine's per-sequence cells once it runs."""
        if self._engine is not None:
            return self._engine.context_length
        return self._n_ctx

    # -- text ------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def detokenize(self, ids: list[int]) -> str:
        """llama.cpp's own detokenizer: drops BOS/EOS and the SPM leading space."""
        n_vocab = self._llm.n_vocab()
        if any(not 0 <= i < n_vocab for i in ids):
            raise InvalidRequest(f"token ids must be between 0 and {n_vocab - 1}", param="ids")
        tokens = (self._lib.llama_token * len(ids))(*ids)
        size = 16 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_detokenize(self._vocab, tokens, len(ids), buf, size, True, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n
        raise ValueError("detokenize: buffer sizing failed")

    def apply_chat_template(self, messages: Iterable[dict[str, str]]) -> str:
        if self._chat is None:
            raise CapabilityNotSupported("This model has no chat template (the GGUF carries no "
                                         "tokenizer.chat_template); use plain completion or "
                                         "set model_params.chat_template.")
        prompt: str = self._chat(messages=list(messages)).prompt
        return prompt

    @property
    def vocab(self) -> Any:
        return self._vocab

    @property
    def model_pointer(self) -> Any:
        return self._llm._model.model

    def batch_engine(self) -> BatchEngine:
        """The continuous-batching engine (one context of `parallel` sequences)."""
        if self._engine is None:
            from backends.llama_batch import LlamaBatchEngine

            p = self._params
            self._engine = LlamaBatchEngine(self, p.parallel, p.prompt_chunk, p.flash_attn,
                                            p.n_threads, p.n_threads_batch)
        return self._engine

    def piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._llm._model.token_to_piece(token).rstrip(b"\0")
        return piece

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            # The template writes the special tokens (BOS included) itself.
            prompt = self.apply_chat_template(request.messages)
            return list(self._llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))
        prompt = request.prompt or ""
        suffix = request.params.suffix
        if suffix is None:
            return self.tokenize(prompt)
        fim = [self._lib.llama_vocab_fim_pre(self._vocab), self._lib.llama_vocab_fim_suf(
            self._vocab), self._lib.llama_vocab_fim_mid(self._vocab)]
        if min(fim) < 0:
            raise CapabilityNotSupported("'suffix' needs a fill-in-the-middle model; this "
                                         "model has no FIM tokens.", param="suffix")
        pre, suf, mid = fim
        return [pre, *self.tokenize(prompt, add_special=False), suf,
                *self.tokenize(suffix, add_special=False), mid]

    # -- generation ------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        params = request.params
        tokens = self.prompt_tokens(request)
        grammar = json_grammar(params)
        room = self.context_length - len(tokens)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens > room or room <= 0:
            raise ContextLengthExceeded(prompt_tokens=len(tokens), max_tokens=max(max_tokens, 1),
                                        context_length=self.context_length)
        yield Chunk(prompt_tokens=len(tokens))
        if params.echo and request.prompt:
            yield Chunk(text=request.prompt)
        self._llm.set_seed(params.seed if params.seed is not None else secrets.randbits(32))
        text, stops = Utf8Stream(), StopMatcher(params.stop)
        count, finish, hit_stop = 0, "length", False
        for token in self._llm.generate(
                tokens, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                temp=params.temperature, repeat_penalty=params.repeat_penalty,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty, grammar=grammar):
            if self._lib.llama_vocab_is_eog(self._vocab, token):
                finish = "stop"
                break
            count += 1
            piece, hit_stop = stops.push(text.push(self.piece(token)))
            scored = () if params.logprobs is None else (self._logprob(token, params.logprobs),)
            yield Chunk(text=piece, logprobs=scored)
            if hit_stop:
                finish = "stop"
                break
            if count >= max_tokens:
                break
        if not hit_stop:
            tail, _ = stops.push(text.flush())
            if tail := tail + stops.flush():
                yield Chunk(text=tail)
        yield Chunk(finish_reason=finish, prompt_tokens=len(tokens), completion_tokens=count)

    def _logprob(self, token: int, top: int) -> TokenLogprob:
        """The sampled token's log-probability from the logits it was sampled from (the
        last row llama.cpp computed; the next decode runs only after the caller resumes)."""
        return self.score(self._llm._ctx.get_logits_ith(-1), token, top)

    def score(self, row: Any, token: int, top: int) -> TokenLogprob:
        """`token`'s log-probability in a row of logits, and the `top` likeliest tokens."""
        import numpy as np

        n_vocab = self._llm.n_vocab()
        logits = np.ctypeslib.as_array(row, shape=(n_vocab,))
        peak = float(logits.max())
        logprobs = logits - (peak + float(np.log(np.exp(logits - peak).sum())))
        best = np.argpartition(-logprobs, top)[:top] if 0 < top < n_vocab else \
            np.arange(n_vocab if top else 0)
        best = best[np.argsort(-logprobs[best])]
        return TokenLogprob(self.piece(token), float(logprobs[token]),
                            tuple((self.piece(int(i)), float(logprobs[i])) for i in best))

    # -- embeddings ------------------------------------------------------------------------

    def embed(self, texts: list[str]) -> list[list[float]]:
        if not self._params.embeddings:
            raise CapabilityNotSupported("Embeddings are disabled for this model "
                                         "(model_params.embeddings: false).")
        embedder = self._embedding_context()
        limit = int(embedder.n_ctx())
        for i, text in enumerate(texts):
            n = len(embedder.tokenize(text.encode("utf-8"), add_bos=True, special=True))
            if n > limit:
                raise ContextLengthExceeded(prompt_tokens=n, max_tokens=0, context_length=limit,
                                            param=f"text[{i}]" if len(texts) > 1 else "text")
        vectors: list[list[float]] = embedder.embed(
            texts, normalize=self._params.normalize_embeddings, truncate=False)
        return vectors

    def _embedding_context(self) -> Llama:
        if self._embedder is None:
            from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

            kwargs = self._engine_kwargs(self._params)
            n_ctx = self.context_length
            kwargs.update(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, embedding=True,
                          pooling_type=LLAMA_POOLING_TYPE_MEAN)
            self._embedder = Llama(model_path=self._path, **kwargs)
        return self._embedder

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        for llm in (self._embedder, self._llm):
            if llm is not None:
                llm.close()
        self._embedder = None
