"""Batched embeddings of the transformers families: padded, length-sorted forward passes give
the vectors one-text-at-a-time passes give (encoder, causal-LM mean pooling, GPTQ)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from backends.base import ModelSpec
from backends.errors import ContextLengthExceeded
from backends.hf import HFBackend, HFParams
from backends.hfembed import Pooling, batches, embed_sequences
from tests.backends.conftest import TINY_GPTQ, TINY_HF, minilm_dir

TEXTS = ["A man is eating food.", "short", "The new movie is awesome, really " * 6,
         "héllo wörld", "x", "The cat sits outside on the warm wall", "two words",
         "A somewhat longer sentence about nothing in particular " * 3, "", "ok"]


def test_batches_sort_by_length_and_bound_texts_and_tokens() -> None:
    lengths = [3, 10, 1, 7, 7, 2, 9, 4]
    for max_texts, max_tokens in ((2, 100), (64, 20), (3, 21), (64, 16_384)):
        found = batches(lengths, max_texts=max_texts, max_tokens=max_tokens)
        assert sorted(i for b in found for i in b) == list(range(len(lengths)))
        flat = [lengths[i] for b in found for i in b]
        assert flat == sorted(lengths, reverse=True)  # longest first, across batches too
        for b in found:
            assert len(b) <= max_texts and lengths[b[0]] * len(b) <= max_tokens
    assert batches([50], max_texts=4, max_tokens=10) == [[0]]  # one text always goes
    assert batches([]) == []


def test_batches_cut_where_the_lengths_step_down() -> None:
    """One long text is not the padded length of 63 short ones; equal lengths fill batches."""
    assert [len(b) for b in batches([40] + [5] * 63)] == [1, 63]
    assert sorted(len(b) for b in batches([12] * 130, max_texts=64)) == [2, 64, 64]


def one_at_a_time(backend: HFBackend, texts: list[str]) -> torch.Tensor:
    return torch.tensor([backend.embed([text])[0] for text in texts])


def assert_batched_equals_single(backend: HFBackend, atol: float = 1e-5) -> None:
    batched = torch.tensor(backend.embed(TEXTS))
    assert batched.shape[0] == len(TEXTS)
    assert torch.allclose(batched, one_at_a_time(backend, TEXTS), atol=atol), \
        (batched - one_at_a_time(backend, TEXTS)).abs().max()


@pytest.fixture(scope="module")
def encoder() -> Iterator[HFBackend]:
    backend = HFBackend.load(ModelSpec(name="minilm", params=HFParams(device_map="cpu"),
                                       path=minilm_dir(), setup_params={"task": "embedding"}))
    assert isinstance(backend, HFBackend)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def causal() -> Iterator[HFBackend]:
    backend = HFBackend.load(ModelSpec(name="tiny", params=HFParams(device_map="cpu"),
                                       path=TINY_HF))
    assert isinstance(backend, HFBackend)
    yield backend
    backend.close()


def test_encoder_batched_equals_one_at_a_time(encoder: HFBackend) -> None:
    assert_batched_equals_single(encoder)


def test_encoder_matches_sentence_transformers(encoder: HFBackend) -> None:
    from sentence_transformers import SentenceTransformer

    theirs = SentenceTransformer(str(minilm_dir()), device="cpu").encode(
        TEXTS, convert_to_tensor=True, batch_size=4)
    ours = torch.tensor(encoder.embed(TEXTS))
    assert torch.allclose(ours, theirs.float(), atol=1e-5)


def test_causal_lm_batched_equals_one_at_a_time(causal: HFBackend) -> None:
    assert_batched_equals_single(causal)


def test_causal_lm_vectors_are_the_mean_of_the_unpadded_hidden_states(causal: HFBackend) -> None:
    """Right padding with the mask: the real tokens' states and positions are a lone run's."""
    vectors = causal.embed(TEXTS)
    model, tokenizer = causal._model, causal._tokenizer
    for text, vector in zip(TEXTS, vectors, strict=True):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.inference_mode():
            hidden = model.base_model(input_ids=ids).last_hidden_state[0].mean(dim=0)
        expected = torch.nn.functional.normalize(hidden, dim=0)
        assert torch.allclose(torch.tensor(vector), expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "last"])
def test_every_pooling_mode_ignores_the_padding(causal: HFBackend, mode: str) -> None:
    encoder: Any = causal._model.base_model
    sequences = [causal.tokenize(text) for text in TEXTS]
    pooling = Pooling(mode=mode, normalize=False)
    batched = torch.tensor(embed_sequences(encoder, sequences, pooling))
    single = torch.tensor([embed_sequences(encoder, [s], pooling)[0] for s in sequences])
    assert torch.allclose(batched, single, atol=1e-5)


def test_a_too_long_text_names_its_index(encoder: HFBackend) -> None:
    with pytest.raises(ContextLengthExceeded) as error:
        encoder.embed(["fine", "word " * 600, "fine too"])
    assert error.value.param == "text[1]"
    with pytest.raises(ContextLengthExceeded) as error:
        encoder.embed(["word " * 600])
    assert error.value.param == "text"


def test_gptq_batched_equals_one_at_a_time() -> None:
    pytest.importorskip("gptqmodel")
    from backends.gptq import GPTQBackend, GPTQParams

    backend = GPTQBackend.load(ModelSpec(
        name="q", params=GPTQParams(device_map="cpu", n_threads=2), path=TINY_GPTQ))
    assert isinstance(backend, GPTQBackend)
    try:
        dtype = next(backend._model.parameters()).dtype
        # half precision rounds differently with the batch's shape (see GPTQParams.parallel)
        assert_batched_equals_single(backend, atol=1e-5 if dtype == torch.float32 else 2e-2)
    finally:
        backend.close()
