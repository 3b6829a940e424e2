"""Mean-pooled embeddings over the weights a LlamaBackend already loaded.

A second llama.cpp context on the same `llama_model` (not a second copy of the weights, which
llama-cpp-python's `Llama(embedding=True)` would load): pooling MEAN, one unified KV stream of
`context_length` cells shared by up to `MAX_SEQUENCES` texts, so texts that arrive together
(the scheduler coalesces /embeddings requests) are packed into as few decodes as fit.
"""

from __future__ import annotations

import logging
from typing import Any

from backends.errors import BackendFailure, ModelLoadError

log = logging.getLogger(__name__)

MAX_SEQUENCES = 64  # texts per decode at most


class LlamaEmbedder:
    def __init__(self, model: Any, context_length: int, n_threads: int | None,
                 n_threads_batch: int | None, flash_attn: bool | str, normalize: bool,
                 verbose: bool = False) -> None:
        import llama_cpp as lib
        from llama_cpp._utils import suppress_stdout_stderr

        self._lib = lib
        self.context_length = context_length
        self._normalize = normalize
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = context_length
        self._max_sequences = min(MAX_SEQUENCES, context_length,
                                  int(lib.llama_max_parallel_sequences()))
        params.n_seq_max = self._max_sequences
        params.kv_unified = True
        params.embeddings = True
        params.pooling_type = lib.LLAMA_POOLING_TYPE_MEAN
        if n_threads:
            params.n_threads = n_threads
            params.n_threads_batch = n_threads_batch or n_threads
        # as the generating context: "auto" lets llama.cpp decide (on for CPU)
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn == "auto" else \
            lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else \
            lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        with suppress_stdout_stderr(disable=verbose):  # "pooling_type ... was specified"
            self._ctx = lib.llama_init_from_model(model, params)
        if not self._ctx:
            raise ModelLoadError("llama.cpp could not create the embedding context "
                                 f"({context_length} tokens)")
        self._n_embd = int(lib.llama_model_n_embd(model))
        self._batch = lib.llama_batch_init(context_length, 0, 1)

    def embed(self, texts: list[list[int]]) -> list[list[float]]:
        """One vector per token list (each at most `context_length` long, checked by the
        caller), packed into decodes of up to `context_length` tokens."""
        vectors: list[list[float]] = []
        group: list[list[int]] = []
        used = 0
        for tokens in texts:
            if group and (used + len(tokens) > self.context_length
                          or len(group) == self._max_sequences):
                vectors += self._decode(group)
                group, used = [], 0
            group.append(tokens)
            used += len(tokens)
        if group:
            vectors += self._decode(group)
        return vectors

    def _decode(self, group: list[list[int]]) -> list[list[float]]:
        import numpy as np

        lib, batch = self._lib, self._batch
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        n = 0
        for seq, tokens in enumerate(group):
            for pos, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True  # embeddings need every token as an output
                n += 1
        batch.n_tokens = n
        status = lib.llama_decode(self._ctx, batch)
        if status != 0:
            log.error("llama_decode (embeddings) failed with status %s", status)
            raise BackendFailure()
        vectors = []
        for seq in range(len(group)):
            pooled = lib.llama_get_embeddings_seq(self._ctx, seq)
            vector = np.ctypeslib.as_array(pooled, shape=(self._n_embd,)).astype(np.float64)
            norm = float(np.linalg.norm(vector)) if self._normalize else 0.0
            vectors.append((vector / norm if norm else vector).tolist())
        return vectors

    def close(self) -> None:
        if self._ctx:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._ctx = None
