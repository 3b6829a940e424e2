"""llama.cpp through llama-cpp-python: GGUF files, CPU or GPU.

The weights are loaded once (llama-cpp-python's `LlamaModel`, no context of its own); every
generation runs in the continuous-batching engine's context (backends/llama_batch.py), so the
KV cache is allocated once. llama_cpp is imported when a model loads, never at import time, so
validating settings or serving other families does not need it.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
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
    TOOLS,
    Backend,
    BatchEngine,
    ChatParams,
    Chunk,
    GenerationRequest,
    ModelSpec,
    TokenLogprob,
)
from backends.errors import (
    CapabilityNotSupported,
    ContextLengthExceeded,
    InvalidRequest,
    ModelLoadError,
)
from backends.text import chat_template_refusals

if TYPE_CHECKING:
    from llama_cpp._internals import LlamaModel

    from backends.llama_batch import LlamaBatchEngine
    from backends.llama_embed import LlamaEmbedder

log = logging.getLogger(__name__)


class LlamaParams(ChatParams):
    """`model_params` of `model_family: llama` (passed to llama_cpp.Llama)."""

    n_ctx: int = Field(2048, ge=0, le=1_048_576, description="Context size in tokens "
                       "(prompt + completion); 0 = the model's training context.")
    n_threads: int | None = Field(None, ge=1, le=1024, description="CPU threads for "
                                  "generation; default: llama.cpp's choice (physical cores).")
    n_threads_batch: int | None = Field(None, ge=1, le=1024, description="CPU threads for "
                                        "prompt processing; default: n_threads.")
    n_batch: int = Field(512, ge=1, le=65_536, description="Prompt tokens per decode call "
                         "while no other sequence is generating (see prompt_chunk).")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to the GPU; -1 = all.")
    main_gpu: int = Field(0, ge=0, description="GPU used for the model when not split.")
    flash_attn: bool | Literal["auto"] = Field(
        "auto", description="Flash attention: true, false or auto (llama.cpp decides).")
    parallel: int = Field(4, ge=1, le=64, description="Sequences decoded together (continuous "
                          "batching). Each gets its own n_ctx tokens: the KV cache holds "
                          "n_ctx x parallel cells.")
    prompt_chunk: int = Field(256, ge=1, le=65_536, description="Prompt tokens fed per "
                              "batched decode step at least while other sequences are "
                              "generating: the prompts get the batch's share of the sequences "
                              "waiting for their first token, at least prompt_chunk, so one "
                              "long prompt stalls many streams little while a burst of new "
                              "prompts behind one stream is not fed a chunk at a time (with "
                              "none generating, up to max(prompt_chunk, n_batch) a step).")
    prefix_sharing: bool = Field(True, description="Compute a prompt prefix that several "
                                 "sequences share once: a request whose leading tokens "
                                 "another sequence holds (or is computing) copies those KV "
                                 "cells instead of recomputing them.")
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
    # llama_tokenize and llama_detokenize only read the vocabulary (llama-server tokenizes
    # on its HTTP threads too); the chat template is a Jinja render.
    tokenizes_off_engine = True

    def __init__(self, model: LlamaModel, params: LlamaParams) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._model = model
        self._params = params
        self._embedder: LlamaEmbedder | None = None
        self._engine: LlamaBatchEngine | None = None
        self._n_ctx = params.n_ctx or model.n_ctx_train()  # until the engine says per sequence
        self._vocab = model.vocab
        self._n_vocab = model.n_vocab()
        self._pieces: dict[int, bytes] = {}
        self._keys = itertools.count()  # keys of direct `generate` calls in the engine
        template = params.chat_template or model.metadata().get("tokenizer.chat_template")
        self._template: str | None = template or None
        self._chat = self._formatter(template) if template else None
        caps = {GENERATE, TOKENIZE, JSON_OUTPUT, LOGPROBS} | (
            {EMBED} if params.embeddings else set())
        self.capabilities = frozenset(caps | ({CHAT, TOOLS} if self._chat else set()))
        self.tool_format_override = None if params.tool_format == "auto" else params.tool_format
        self.reasoning_format = params.reasoning_format

    @classmethod
    def load(cls, spec: ModelSpec) -> Backend:
        """The weights only: the batching engine makes the one context that generates."""
        import llama_cpp
        from llama_cpp._internals import LlamaModel
        from llama_cpp._logger import set_verbose

        params = spec.params
        assert isinstance(params, LlamaParams)
        if spec.path is None or not spec.path.is_file():
            raise ModelLoadError(f"model '{spec.name}': the llama family needs a .gguf file, "
                                 f"got '{spec.path}'")
        set_verbose(params.verbose)
        llama_cpp.llama_backend_init()  # idempotent: timer, f16 tables, backends if none
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0x7FFFFFFF if params.n_gpu_layers == -1 else \
            params.n_gpu_layers  # INT32 max: every layer
        model_params.main_gpu = params.main_gpu
        model_params.load_mode = (
            llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK if params.use_mmap and params.use_mlock else
            llama_cpp.LLAMA_LOAD_MODE_MLOCK if params.use_mlock else
            llama_cpp.LLAMA_LOAD_MODE_MMAP if params.use_mmap else
            llama_cpp.LLAMA_LOAD_MODE_NONE)
        try:
            model = LlamaModel(path_model=str(spec.path), params=model_params,
                               verbose=params.verbose)
        except ValueError as exc:  # llama-cpp-python's way of saying "could not load"
            raise ModelLoadError(f"model '{spec.name}': '{spec.path.name}' could not be loaded "
                                 "by llama.cpp (not a valid GGUF file?)") from exc
        return cls(model, params)

    def _formatter(self, template: str) -> Any:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def token_text(token: int) -> str:
            return self._model.token_get_text(token) if token >= 0 else ""

        return Jinja2ChatFormatter(template=template, eos_token=token_text(
            self._model.token_eos()), bos_token=token_text(self._model.token_bos()))

    @property
    def context_length(self) -> int:
        """Tokens one request may use: the batching engine's per-sequence cells once it runs."""
        if self._engine is not None:
            return self._engine.context_length
        return self._n_ctx

    # -- text ------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def detokenize(self, ids: list[int]) -> str:
        """llama.cpp's own detokenizer: drops BOS/EOS and the SPM leading space."""
        n_vocab = self._n_vocab
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

    @property
    def chat_template_text(self) -> str | None:
        """model_params.chat_template, else the GGUF's tokenizer.chat_template."""
        return self._template

    def apply_chat_template(self, messages: Iterable[dict[str, Any]],
                            tools: list[dict[str, Any]] | None = None,
                            **template_kwargs: Any) -> str:
        if self._chat is None:
            raise CapabilityNotSupported("This model has no chat template (the GGUF carries no "
                                         "tokenizer.chat_template); use plain completion or "
                                         "set model_params.chat_template.")
        with chat_template_refusals():
            prompt: str = self._chat(messages=list(messages), tools=tools,
                                     **template_kwargs).prompt
        return prompt

    @property
    def vocab(self) -> Any:
        return self._vocab

    @property
    def model_pointer(self) -> Any:
        return self._model.model

    def engine_stats(self) -> dict[str, int]:
        engine = self._engine
        if engine is None:
            return {}
        return {"kv_cells_used": sum(len(slot.cached) for slot in engine.slots),
                "kv_cells_total": engine.context_length * engine.max_sequences,
                "prefix_reused_tokens": engine.reused_tokens,
                "prefix_copies": engine.copies}

    def batch_engine(self) -> BatchEngine:
        """The continuous-batching engine (one context of `parallel` sequences)."""
        if self._engine is None:
            from backends.llama_batch import LlamaBatchEngine

            p = self._params
            self._engine = LlamaBatchEngine(self, p.parallel, p.prompt_chunk, p.n_batch,
                                            p.flash_attn, p.n_threads, p.n_threads_batch,
                                            p.prefix_sharing)
        return self._engine

    def piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._model.token_to_piece(token).rstrip(b"\0")
        return piece

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """As the base class does, plus fill-in-the-middle: a prompt with a `suffix` becomes
        the model's FIM tokens around both."""
        suffix = request.params.suffix
        if request.prompt_ids is not None or request.messages is not None or suffix is None:
            return super().prompt_tokens(request)
        prompt = request.prompt or ""
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
        """One request through the batching engine, stepped here until it ends (direct use:
        the server's scheduler drives the engine itself and never calls this). Closing the
        iterator early cancels the sequence."""
        engine = self.batch_engine()
        key = next(self._keys)
        yield engine.admit(key, request)
        done = False
        try:
            while not done:
                for owner, chunk in engine.step():
                    if owner != key:
                        continue
                    if isinstance(chunk, Exception):
                        done = True
                        raise chunk
                    yield chunk
                    done = chunk.finish_reason is not None
        finally:
            if not done:
                engine.cancel(key)

    def score(self, row: Any, token: int, top: int) -> TokenLogprob:
        """`token`'s log-probability in a row of logits, and the `top` likeliest tokens."""
        import numpy as np

        n_vocab = self._n_vocab
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
        limit = embedder.context_length
        # text is data: strings like "<s>" are not read as special tokens
        token_lists = [list(self._model.tokenize(text.encode("utf-8"), add_bos=True,
                                                 special=False)) for text in texts]
        for i, tokens in enumerate(token_lists):
            if len(tokens) > limit:
                raise ContextLengthExceeded(prompt_tokens=len(tokens), max_tokens=0,
                                            context_length=limit,
                                            param=f"text[{i}]" if len(texts) > 1 else "text")
        return embedder.embed(token_lists)

    def _embedding_context(self) -> LlamaEmbedder:
        """Created on the first embeddings request, over the loaded weights."""
        if self._embedder is None:
            from backends.llama_embed import LlamaEmbedder

            p = self._params
            self._embedder = LlamaEmbedder(self.model_pointer, self.context_length,
                                           p.n_threads, p.n_threads_batch, p.flash_attn,
                                           p.normalize_embeddings, p.verbose)
        return self._embedder

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        self._model.close()  # type: ignore[no-untyped-call]
