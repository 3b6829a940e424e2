"""Sentence vectors from transformers models (huggingface and gptq families).

A causal LM's vector is the mean of its last hidden state over the real tokens (the
attention mask), never its logits. A sentence-transformers repository (`modules.json`) brings
its own pooling (`1_Pooling/config.json`), normalisation (a `Normalize` module) and maximum
sequence length (`sentence_bert_config.json`), which we follow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backends.errors import ModelLoadError

_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                  "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "last"}
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"  # mean, cls, max, last
    normalize: bool = True
    max_length: int | None = None


def read_pooling(folder: Path, normalize: bool | None) -> Pooling:
    """The pooling a sentence-transformers repo declares; mean pooling without one."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return Pooling(normalize=True if normalize is None else normalize)
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    unknown = sorted(k for k in kinds if k not in _KNOWN_MODULES)
    if unknown:
        raise ModelLoadError(f"sentence-transformers module(s) {', '.join(unknown)} are not "
                             f"supported; supported: {', '.join(_KNOWN_MODULES)}")
    mode = "mean"
    if "Pooling" in kinds:
        config = json.loads((folder / kinds["Pooling"]["path"] / "config.json")
                            .read_text(encoding="utf-8"))
        chosen = [name for key, name in _POOLING_MODES.items() if config.get(key)]
        other = [k for k, v in config.items() if k.startswith("pooling_mode") and v
                 and k not in _POOLING_MODES]
        if len(chosen) != 1 or other:
            raise ModelLoadError(f"pooling {', '.join(chosen + other) or 'none'} is not "
                                 f"supported; supported: exactly one of "
                                 f"{', '.join(_POOLING_MODES.values())}")
        mode = chosen[0]
    bert_config = folder / "sentence_bert_config.json"
    max_length = json.loads(bert_config.read_text(encoding="utf-8")).get("max_seq_length") \
        if bert_config.is_file() else None
    return Pooling(mode=mode, max_length=max_length,
                   normalize="Normalize" in kinds if normalize is None else normalize)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """[batch, tokens, dim] hidden states → [batch, dim] sentence vectors."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling.mode == "cls":
        vectors = hidden[:, 0]
    elif pooling.mode == "max":
        vectors = hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
    elif pooling.mode == "last":
        vectors = hidden[torch.arange(hidden.shape[0]), mask.sum(dim=1) - 1]
    else:
        vectors = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    vectors = vectors.float()
    if pooling.normalize:
        vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
    return vectors


def hidden_states(encoder: Any, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's last hidden state for one sequence, and its attention mask."""
    device = encoder.device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        out = encoder(input_ids=input_ids, attention_mask=mask)
    return out.last_hidden_state, mask
