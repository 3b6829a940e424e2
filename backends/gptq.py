"""GPTQ checkpoints through GPTQModel (the maintained successor of AutoGPTQ).

Generation, chat, embeddings and tokenization are the huggingface family's; only loading
differs. On CPU the torch kernel is used; on GPU GPTQModel picks one unless `backend` says.
The legacy `model_params.wbits` / `group_size` keys of AutoGPTQ-era configs are accepted and
checked against the checkpoint's quantize config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from backends.base import ModelParams, ModelSpec
from backends.errors import ModelLoadError
from backends.hf import HFBackend, HFParams


class GPTQParams(HFParams):
    """`model_params` of `model_family: gptq` (and its alias `gptq_llama`)."""

    backend: Literal["auto", "torch", "torch_fused", "triton", "exllama_v2", "marlin",
                     "machete", "bitblas"] = Field(
        "auto", description="GPTQModel kernel; auto = torch on CPU, GPTQModel's choice on GPU.")
    wbits: Literal[2, 3, 4, 8] | None = Field(None, description="Legacy: bits per weight the "
                                              "checkpoint must have (checked, not applied).")
    group_size: int | None = Field(None, ge=-1, le=65_536, description="Legacy: quantization "
                                   "group size the checkpoint must have (checked).")
    # GPTQ models compute in bfloat16/float16, where the attention's rounding depends on the
    # batch's padded length: a batched greedy text may then differ from the same request run
    # alone. Serial by default; parallel > 1 opts into batching for throughput.
    parallel: int = Field(1, ge=1, le=256, description="Requests decoded together; default 1 "
                          "(serial): in half precision a batched text may differ from a lone "
                          "run's.")


def quantize_config(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's GPTQ settings: quantize_config.json, else config.json's."""
    for name in ("quantize_config.json", "quant_config.json"):
        if (folder / name).is_file():
            found: dict[str, Any] = json.loads((folder / name).read_text(encoding="utf-8"))
            return found
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    quant = config.get("quantization_config")
    return quant if isinstance(quant, dict) else None


def check_quantization(name: str, folder: Path, params: GPTQParams) -> None:
    quant = quantize_config(folder)
    if quant is None or quant.get("quant_method", "gptq") != "gptq":
        raise ModelLoadError(f"model '{name}': '{folder.name}' is not a GPTQ checkpoint (no "
                             "quantize_config.json, and config.json has no gptq "
                             "quantization_config); use model_family: huggingface")
    for key, legacy in (("bits", "wbits"), ("group_size", "group_size")):
        wanted = getattr(params, legacy)
        if wanted is not None and quant.get(key) != wanted:
            raise ModelLoadError(f"model '{name}': model_params.{legacy} is {wanted}, but the "
                                 f"checkpoint was quantized with {key}={quant.get(key)}; "
                                 f"remove {legacy} or set it to {quant.get(key)}")


class GPTQBackend(HFBackend):
    family = "gptq"
    Params: ClassVar[type[ModelParams]] = GPTQParams
    setup_keys: ClassVar[frozenset[str]] = frozenset({"tokenizer_repo_id"})

    @classmethod
    def _load_model(cls, spec: ModelSpec, params: HFParams, task: str) -> Any:
        import torch

        assert isinstance(params, GPTQParams) and spec.path is not None
        check_quantization(spec.name, spec.path, params)
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(4, os.cpu_count() or 1))))
        from gptqmodel import BACKEND, GPTQModel

        on_cpu = params.device_map == "cpu" or not torch.cuda.is_available()
        kernel = "torch" if params.backend == "auto" and on_cpu else params.backend
        placement: dict[str, Any] = (
            {"device": "cpu"} if on_cpu else
            {"device_map": params.device_map} if params.device_map in ("auto", "balanced",
                                                                       "sequential")
            else {"device": params.device_map})
        wrapper = GPTQModel.load(str(spec.path), backend=BACKEND(kernel), dtype=params.torch_dtype,
                                 trust_remote_code=params.trust_remote_code, **placement)
        model = wrapper.model
        # The kernel compiles on its first forward pass (about a minute on a fresh CPU
        # machine): do it now, so the model is ready only once requests run at full speed.
        with torch.inference_mode():
            model(input_ids=torch.ones((1, 1), dtype=torch.long, device=model.device))
        return model
