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


#: Texts per forward pass at most (sentence-transformers' `encode` default is 32): on a CPU
#: shared with other work each pass also pays for its threads' waits at every layer, so
#: fewer, larger passes win.
BATCH_TEXTS = 128
#: Padded tokens per forward pass at most: long texts go fewer at a time, so a batch's
#: activations (and attention scores, batch x heads x length^2) stay small.
BATCH_TOKENS = 8_192
#: What one more forward pass costs besides its tokens, in padded tokens' worth: the fixed
#: cost of running the layers once (a few tokens' worth on an idle CPU, far more when its
#: cores are shared and the threads wait for each other at every layer).
PASS_COST_TOKENS = 128


def batches(lengths: list[int], max_texts: int = BATCH_TEXTS,
            max_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Indices of the sequences in forward-pass batches, longest first (as
    sentence-transformers sorts), so each batch pads to about its own length.

    Where to cut the sorted list is chosen to spend the fewest padded tokens plus
    PASS_COST_TOKENS per pass: a request of 100 texts is not cut blindly at 64 (which pads
    the 64 longest to the very longest) but where the lengths step down. A batch holds at
    most `max_texts` sequences and `max_tokens` padded tokens (at least one sequence)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    longest = [max(1, lengths[i]) for i in order]
    n = len(order)
    best = [0] + [0] * n  # best[j]: the cheapest cost of the first j sequences
    cut = [0] * (n + 1)  # where the last batch of that starts
    for j in range(1, n + 1):
        best[j], cut[j] = best[j - 1] + longest[j - 1] + PASS_COST_TOKENS, j - 1
        for i in range(j - 2, max(0, j - max_texts) - 1, -1):
            padded = (j - i) * longest[i]
            if padded > max_tokens:
                break  # a longer batch only pads more
            cost = best[i] + padded + PASS_COST_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out: list[list[int]] = []
    j = n
    while j > 0:
        out.append(order[cut[j]:j])
        j = cut[j]
    return out[::-1]


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
