"""Hugging Face transformers models: a repository snapshot (config, tokenizer, weights).

torch and transformers are imported when a model loads, never at import time, so validating
settings or serving llama.cpp models does not need them.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from backends.base import (
    CHAT,
    EMBED,
    GENERATE,
    JSON_OUTPUT,
    TOKENIZE,
    TOOLS,
    Backend,
    BatchEngine,
    ChatParams,
    Chunk,
    GenerationRequest,
    ModelParams,
    ModelSpec,
)
from backends.errors import (
    CapabilityNotSupported,
    ContextLengthExceeded,
    InvalidRequest,
    ModelLoadError,
)
from backends.text import chat_template_refusals

if TYPE_CHECKING:
    from backends.hf_grammar import GrammarCompiler, GrammarMatcher
    from backends.hfbatch import HFBatchEngine

log = logging.getLogger(__name__)
DEFAULT_CONTEXT = 2048
# transformers and GPTQModel switch torch's process-wide default dtype while they build a
# model and switch it back afterwards; two models loading at once (each in its own engine
# thread) would interleave those switches and leave a wrong default behind. One at a time.
_LOAD_LOCK = threading.Lock()


class HFParams(ChatParams):
    """`model_params` of `model_family: huggingface`."""

    device_map: str = Field("auto", pattern=r"^(auto|balanced|sequential|cpu|mps|cuda(:\d+)?)$",
                            description="Where the weights go: auto (GPUs if any, else CPU), "
                            "cpu, cuda, cuda:N, mps, balanced, sequential.")
    torch_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weight dtype; auto = the checkpoint's.")
    trust_remote_code: bool = Field(False, description="Run the repository's own model code "
                                    "(only for repositories you trust).")
    n_threads: int | None = Field(None, ge=1, le=1024, description="CPU threads of torch; "
                                  "default: torch's choice.")
    context_length: int | None = Field(None, ge=16, le=10_000_000, description="Tokens per "
                                       "sequence (prompt + completion); default: the config's "
                                       "max_position_embeddings.")
    chat_template: str | None = Field(None, max_length=100_000, description="Jinja chat "
                                      "template overriding the tokenizer's.")
    normalize_embeddings: bool | None = Field(None, description="L2-normalise vectors; "
                                              "default: yes, or the embedding model's choice.")
    parallel: int = Field(4, ge=1, le=256, description="Requests decoded together in one "
                          "batch (continuous batching); 1 = one request at a time.")
    prefix_sharing: bool = Field(True, description="With parallel > 1: a new prompt whose "
                                 "leading tokens a running request holds copies their keys "
                                 "and values instead of computing them.")


class HFBackend(Backend):
    family = "huggingface"
    Params: ClassVar[type[ModelParams]] = HFParams
    weights: ClassVar[str | None] = "snapshot"
    setup_keys: ClassVar[frozenset[str]] = frozenset({"tokenizer_repo_id", "config_params",
                                                      "task"})
    # A fast tokenizer encodes and decodes through shared borrows of the Rust tokenizer (and
    # releases the GIL while it works); only changing its truncation or padding borrows it
    # mutably, which `__init__` settles once (see there). The template is a Jinja render.
    tokenizes_off_engine: ClassVar[bool] = True

    def __init__(self, model: Any, tokenizer: Any, params: HFParams, task: str,
                 folder: Path) -> None:
        from backends.hfembed import read_pooling

        self._model = model
        self._tokenizer = tokenizer
        self._engine: HFBatchEngine | None = None
        # transformers switches the tokenizer's truncation and padding off on its first call
        # if the files set them (a mutation of the Rust tokenizer, which raises "Already
        # borrowed" if another thread is encoding then): make that call here, before any
        # request can tokenize off the engine thread. Later calls change nothing.
        self.tokenize("")
        self._params = params
        self._task = task
        self.tool_format_override = None if params.tool_format == "auto" else params.tool_format
        self.reasoning_format = params.reasoning_format
        self._pooling = read_pooling(folder, params.normalize_embeddings)
        self._context = self._context_length(model, tokenizer, params, self._pooling.max_length)
        self._grammars: GrammarCompiler | None = None
        if task == "embedding":
            self.capabilities = frozenset({EMBED, TOKENIZE})
        else:
            from backends.hfgen import TokenLoop

            eos_ids = self._eos_ids(model, tokenizer)
            self._loop: TokenLoop | None = TokenLoop(model, eos_ids)
            self._grammars = self._grammar_compiler(model, tokenizer, eos_ids)
            chat = {CHAT, TOOLS} if tokenizer.chat_template else set()
            json = {JSON_OUTPUT} if self._grammars is not None else set()
            self.capabilities = frozenset({GENERATE, EMBED, TOKENIZE} | chat | json)

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: ModelSpec) -> Backend:
        import torch

        params = spec.params
        assert isinstance(params, HFParams)
        if spec.path is None or not (spec.path / "config.json").is_file():
            raise ModelLoadError(f"model '{spec.name}': the {cls.family} family needs a model "
                                 "directory with a config.json (a repo_id, or model_path "
                                 "pointing at such a directory)")
        if params.n_threads:
            torch.set_num_threads(params.n_threads)
        task = spec.setup_params.get("task") or "generate"
        tokenizer = cls._load_tokenizer(spec, params)
        try:
            model = cls._load_one_at_a_time(spec, params, task)
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any engine failure is a load error
            log.warning("model %s: loading failed: %r", spec.name, exc)
            raise ModelLoadError(f"model '{spec.name}': transformers could not load "
                                 f"'{spec.path.name}' ({type(exc).__name__}; the server log "
                                 "has the details)") from exc
        return cls(model.eval(), tokenizer, params, task, spec.path)

    @classmethod
    def _load_one_at_a_time(cls, spec: ModelSpec, params: HFParams, task: str) -> Any:
        import torch

        with _LOAD_LOCK:
            default_dtype = torch.get_default_dtype()
            try:
                return cls._load_model(spec, params, task)
            finally:
                torch.set_default_dtype(default_dtype)

    @classmethod
    def _load_tokenizer(cls, spec: ModelSpec, params: HFParams) -> Any:
        from transformers import AutoTokenizer

        folder = spec.tokenizer_path or spec.path
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                folder, trust_remote_code=params.trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - any engine failure is a load error
            log.warning("model %s: tokenizer failed: %r", spec.name, exc)
            raise ModelLoadError(f"model '{spec.name}': no usable tokenizer in "
                                 f"'{Path(str(folder)).name}' ({type(exc).__name__})") from exc
        if params.chat_template:
            tokenizer.chat_template = params.chat_template
        return tokenizer

    @classmethod
    def _model_kwargs(cls, spec: ModelSpec, params: HFParams) -> dict[str, Any]:
        from transformers import AutoConfig

        assert spec.path is not None
        config = AutoConfig.from_pretrained(spec.path, trust_remote_code=params.trust_remote_code,
                                            **(spec.setup_params.get("config_params") or {}))
        return {"config": config, "dtype": params.torch_dtype, "device_map": params.device_map,
                "trust_remote_code": params.trust_remote_code}

    @classmethod
    def _load_model(cls, spec: ModelSpec, params: HFParams, task: str) -> Any:
        from transformers import AutoModel, AutoModelForCausalLM

        assert spec.path is not None
        auto = AutoModel if task == "embedding" else AutoModelForCausalLM
        return auto.from_pretrained(spec.path, **cls._model_kwargs(spec, params))

    @staticmethod
    def _context_length(model: Any, tokenizer: Any, params: HFParams,
                        pooling_limit: int | None) -> int:
        if params.context_length:
            return params.context_length
        if pooling_limit:
            return pooling_limit
        configured = getattr(model.config, "max_position_embeddings", None)
        if isinstance(configured, int) and configured > 0:
            return configured
        limit = getattr(tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and 0 < limit < 10_000_000 else DEFAULT_CONTEXT

    @staticmethod
    def _grammar_compiler(model: Any, tokenizer: Any, eos_ids: set[int]) -> GrammarCompiler | None:
        """Constrained output (JSON_OUTPUT) where llguidance (the hf extra) is installed and
        the tokenizer is a fast one."""
        try:
            from backends import hf_grammar
        except ImportError:
            log.info("llguidance is not installed: no constrained output (response_format, "
                     "forced tool calls) for transformers models")
            return None
        if not hf_grammar.available(tokenizer):
            log.info("%s is not a fast tokenizer: no constrained output for this model",
                     type(tokenizer).__name__)
            return None
        vocab_size = getattr(model.config, "vocab_size", None)
        return hf_grammar.GrammarCompiler(tokenizer, eos_ids,
                                          vocab_size if isinstance(vocab_size, int) else 0)

    @staticmethod
    def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
        ids: set[int] = set()
        for value in (getattr(model.generation_config, "eos_token_id", None),
                      model.config.eos_token_id, tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        return ids

    @property
    def context_length(self) -> int:
        return self._context

    # -- text ------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        ids: list[int] = self._tokenizer(text, add_special_tokens=add_special)["input_ids"]
        return ids

    def detokenize(self, ids: list[int]) -> str:
        size = len(self._tokenizer)
        if any(not 0 <= i < size for i in ids):
            raise InvalidRequest(f"token ids must be between 0 and {size - 1}", param="ids")
        return self._decode(ids)

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text

    @property
    def chat_template_text(self) -> str | None:
        """The tokenizer's template (model_params.chat_template when set); of named ones,
        the one transformers renders tools with."""
        template = self._tokenizer.chat_template if self._tokenizer is not None else None
        if isinstance(template, dict):
            template = template.get("tool_use") or template.get("default")
        return template or None

    def apply_chat_template(self, messages: Iterable[dict[str, Any]],
                            tools: list[dict[str, Any]] | None = None,
                            **template_kwargs: Any) -> str:
        if not self._tokenizer.chat_template:
            raise CapabilityNotSupported("This model has no chat template (its tokenizer "
                                         "defines none); use plain completion or set "
                                         "model_params.chat_template.", param="messages")
        with chat_template_refusals():
            prompt: str = self._tokenizer.apply_chat_template(
                list(messages), tools=tools, tokenize=False, add_generation_prompt=True,
                **template_kwargs)
        return prompt

    # -- generation ------------------------------------------------------------------------

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """The base class's, and the request's grammar compiled (and cached) when it is
        first readied: in the server's prepare step that runs on the tokenizer thread, so
        a grammar llguidance rejects is a 400 before admission and the engine thread only
        copies the compiled one. (The prepare step writes the grammar after it tokenizes;
        the text written here with the default limits is the same unless the model's
        grammar limits differ, and then the engine compiles the prepared one itself.)"""
        tokens = super().prompt_tokens(request)
        if request.prompt_ids is None and self._grammars is not None:
            self._grammars.precompile(request.params, request.tools, self.tool_format)
        return tokens

    def _prepare(self, request: GenerationRequest) -> tuple[list[int], int,
                                                            GrammarMatcher | None]:
        """The prompt's token ids, the completion's token budget (checked against the
        context) and the matcher of its grammar, if any (shared by the serial and the
        batched path)."""
        if self._task == "embedding":
            raise CapabilityNotSupported("This is an embedding model (setup_params.task: "
                                         "embedding); it does not generate text.")
        tokens = self.prompt_tokens(request)
        room = self.context_length - len(tokens)
        wanted = request.params.max_tokens
        max_tokens = wanted if wanted is not None else room
        if max_tokens > room or room <= 0:
            raise ContextLengthExceeded(prompt_tokens=len(tokens), max_tokens=max(max_tokens, 1),
                                        context_length=self.context_length)
        return tokens, max_tokens, self._grammar_matcher(request)

    def _grammar_matcher(self, request: GenerationRequest) -> GrammarMatcher | None:
        from backends.hf_grammar import wanted

        params = request.params
        if not wanted(params):
            return None
        if self._grammars is None:
            raise CapabilityNotSupported(
                "This model cannot constrain its output (it needs the llguidance package "
                "and a fast tokenizer).",
                param="tools" if params.tool_choice is not None else "response_format")
        gbnf = self._grammars.grammar(params, request.tools, self.tool_format)
        return None if gbnf is None else self._grammars.matcher(gbnf, params)

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        from backends.hfgen import text_chunks

        params = request.params
        tokens, max_tokens, grammar = self._prepare(request)
        yield Chunk(prompt_tokens=len(tokens))
        if params.echo and request.prompt:
            yield Chunk(text=request.prompt)
        assert self._loop is not None
        yield from text_chunks(self._loop.tokens(tokens, params, max_tokens, grammar),
                               self._decode, tokens, params, max_tokens, grammar)

    def batch_engine(self) -> BatchEngine | None:
        """Continuous batching (model_params.parallel > 1) for models whose KV cache can be
        padded and joined; others, and embedding models, are served one request at a time."""
        if self._task == "embedding" or self._params.parallel <= 1 or self._loop is None:
            return None
        from backends.hfbatch import HFBatchEngine

        keep_one = self._loop.keeps_one
        if not HFBatchEngine.supports(self._model, keep_one):
            log.info("model %s: its KV cache cannot be batched; serving one request at a "
                     "time", type(self._model).__name__)
            return None
        self._engine = HFBatchEngine(self._model, self._loop.eos_ids, self._decode,
                                     self._prepare, self._params.parallel, keep_one,
                                     self._params.prefix_sharing)
        return self._engine

    def engine_stats(self) -> dict[str, int]:
        engine = self._engine
        return {} if engine is None else {"prefix_reused_tokens": engine.reused_tokens}

    # -- embeddings ------------------------------------------------------------------------

    def embed(self, texts: list[str]) -> list[list[float]]:
        """All texts tokenized at once, every length checked before any forward pass, then
        embedded in padded, length-sorted batches (`backends.hfembed.embed_sequences`)."""
        from backends.hfembed import embed_sequences

        encoder = self._model if self._task == "embedding" else self._model.base_model
        sequences: list[list[int]] = self._tokenizer(texts)["input_ids"] if texts else []
        for i, ids in enumerate(sequences):
            if len(ids) > self.context_length:
                raise ContextLengthExceeded(prompt_tokens=len(ids), max_tokens=0,
                                            context_length=self.context_length,
                                            param=f"text[{i}]" if len(texts) > 1 else "text")
        pad = self._tokenizer.pad_token_id
        return embed_sequences(encoder, sequences, self._pooling,
                               pad if isinstance(pad, int) else 0)

    def close(self) -> None:
        self._model = self._tokenizer = self._loop = self._grammars = self._engine = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
