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


#: Texts per forward pass at most (sentence-transformers' `encode` default is 32; 64 keeps
#: two cores busier on short texts).
BATCH_TEXTS = 64
#: Padded tokens per forward pass at most: long texts go fewer at a time, so a batch's
#: activations (and attention scores, batch x heads x length^2) stay small.
BATCH_TOKENS = 16_384


def batches(lengths: list[int], max_texts: int = BATCH_TEXTS,
            max_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Indices of the sequences in forward-pass batches: longest first (as
    sentence-transformers sorts), so each batch pads to about its own length; a batch holds
    at most `max_texts` sequences and `max_tokens` padded tokens (at least one sequence)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < max_texts \
                and lengths[out[-1][0]] * (len(out[-1]) + 1) <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def embed_sequences(encoder: Any, sequences: list[list[int]], pooling: Pooling,
                    pad_id: int = 0) -> list[list[float]]:
    """One vector per token-id sequence, computed in padded, length-sorted batches.

    Sequences are padded on the right and masked: an encoder's real tokens never attend to
    the padding, nor does a causal LM's (its pads come after them), and positions count from
    0 in each row either way, so a vector does not depend on what it was batched with (up
    to float rounding)."""
    vectors: list[list[float]] = [[] for _ in sequences]
    for batch in batches([len(s) for s in sequences]):
        width = max(1, len(sequences[batch[0]]))
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = sequences[i]
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, :len(ids)] = 1
        device = encoder.device
        input_ids, mask = input_ids.to(device), mask.to(device)
        with torch.inference_mode():
            hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        for i, vector in zip(batch, pool(hidden, mask, pooling).tolist(), strict=True):
            vectors[i] = vector
    return vectors
