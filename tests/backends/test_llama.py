"""The llama.cpp backend itself, on the tiny GGUF (HTTP tests are in tests/api)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backends.base import CHAT, EMBED, GENERATE, GenerationParams, GenerationRequest, ModelSpec
from backends.errors import (
    CapabilityNotSupported,
    ContextLengthExceeded,
    InvalidRequest,
    ModelLoadError,
)
from backends.llama import LlamaBackend, LlamaParams
from tests.conftest import TINY_GGUF

GREEDY = GenerationParams(temperature=0, max_tokens=16)


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaBackend]:
    loaded = LlamaBackend.load(ModelSpec(name="tiny", path=TINY_GGUF,
                                         params=LlamaParams(n_ctx=256, n_threads=2)))
    assert isinstance(loaded, LlamaBackend)
    yield loaded
    loaded.close()


def collect(backend: LlamaBackend, request: GenerationRequest) -> tuple[str, dict]:
    chunks = list(backend.generate(request))
    final = chunks[-1]
    assert chunks[0].prompt_tokens is not None and chunks[0].text == ""  # accepted first
    return "".join(c.text for c in chunks), {"finish": final.finish_reason,
                                             "prompt": final.prompt_tokens,
                                             "completion": final.completion_tokens}


def test_capabilities_and_context(backend: LlamaBackend) -> None:
    assert {GENERATE, EMBED, CHAT} <= backend.capabilities
    assert backend.context_length == 256


def test_generation_reports_usage(backend: LlamaBackend) -> None:
    text, usage = collect(backend, GenerationRequest(prompt="hello world", params=GREEDY))
    assert text and usage == {"finish": "length", "prompt": len(backend.tokenize("hello world")),
                              "completion": 16}


def test_streamed_text_equals_detokenized_tokens(backend: LlamaBackend) -> None:
    text, _ = collect(backend, GenerationRequest(prompt="the quick brown fox", params=GREEDY))
    prompt_ids = backend.tokenize("the quick brown fox")
    whole = backend.detokenize(prompt_ids + backend.tokenize(text, add_special=False))
    assert whole.endswith(text)


def test_tokenize_roundtrip(backend: LlamaBackend) -> None:
    for text in ("hello world", "héllo wörld ✓ 日本", "a\nb\tc"):
        ids = backend.tokenize(text, add_special=False)
        assert backend.detokenize(ids) == text
    assert backend.tokenize("hi")[0] == backend._model.token_bos()
    with pytest.raises(InvalidRequest, match="token ids must be"):
        backend.detokenize([1, 10**6])


def test_chat_uses_the_ggufs_template(backend: LlamaBackend) -> None:
    messages = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"})
    prompt = backend.apply_chat_template(messages)
    # the tiny GGUF's template (tests/fixtures/README.md): `<s>{role}\n{content}</s>\n` per
    # message, then `<s>assistant\n`; its <s> and </s> are BOS and EOS
    assert prompt == "<s>system\nbe brief</s>\n<s>user\nhello</s>\n<s>assistant\n"
    ids = backend.prompt_tokens(GenerationRequest(messages=messages))
    bos, eos = backend._model.token_bos(), backend._model.token_eos()
    # the special tokens are read as such, and no BOS is added before the template's first
    assert ids == backend.tokenize(prompt, add_special=False)
    assert ids[0] == bos and ids[1] != bos
    assert ids.count(bos) == 3 and ids.count(eos) == 2
    _, usage = collect(backend, GenerationRequest(messages=messages, params=GREEDY))
    assert usage["prompt"] == len(ids)


def test_chat_template_can_be_overridden() -> None:
    bare = LlamaBackend.load(ModelSpec(name="bare", path=TINY_GGUF, params=LlamaParams(
        n_ctx=64, chat_template="{{ messages[0]['content'] }}")))
    assert bare.apply_chat_template([{"role": "user", "content": "x"}]) == "x"
    bare.close()


def test_limits_are_checked_before_generating(backend: LlamaBackend) -> None:
    with pytest.raises(ContextLengthExceeded) as err:
        next(backend.generate(GenerationRequest(prompt="hello", params=GenerationParams(
            max_tokens=300))))
    assert err.value.context_length == 256 and err.value.max_tokens == 300
    with pytest.raises(CapabilityNotSupported, match="fill-in-the-middle"):
        next(backend.generate(GenerationRequest(prompt="a", params=GenerationParams(
            suffix="b"))))


def test_embeddings_are_mean_pooled_and_normalised(backend: LlamaBackend) -> None:
    vectors = backend.embed(["hello world", "hello world", "something else"])
    assert len(vectors) == 3 and all(len(v) == 64 for v in vectors)
    assert vectors[0] == pytest.approx(vectors[1])
    assert sum(x * x for x in vectors[0]) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ContextLengthExceeded):
        backend.embed(["word " * 400])


def test_embeddings_match_llama_cpp_python_and_run_on_the_loaded_weights(
        backend: LlamaBackend) -> None:
    from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama, llama_get_model

    texts = ["hello world", "something else entirely", "héllo wörld ✓ 日本", "<s> is text here"]
    ours = backend.embed(texts)  # packed into one decode
    reference = Llama(model_path=str(TINY_GGUF), n_ctx=256, n_batch=256, n_ubatch=256,
                      embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN, verbose=False,
                      flash_attn=True)  # ours: flash_attn auto, which a CPU resolves to on
    try:
        theirs = reference.embed(texts, normalize=True)
    finally:
        reference.close()
    for mine, other in zip(ours, theirs, strict=True):
        assert mine == pytest.approx(other, abs=1e-5)
    assert backend._embedder is not None  # one copy of the weights: the generating model's
    assert llama_get_model(backend._embedder._ctx) == backend.model_pointer


def test_closing_a_generation_early_frees_its_sequence(backend: LlamaBackend) -> None:
    stream = backend.generate(GenerationRequest(prompt="hello", params=GenerationParams(
        temperature=0, max_tokens=50)))
    assert next(stream).prompt_tokens and next(stream).text
    engine = backend.batch_engine()
    assert engine.active() == 1
    stream.close()
    assert engine.active() == 0


def test_a_file_that_is_not_gguf_is_a_load_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        LlamaBackend.load(ModelSpec(name="bad", path=bad, params=LlamaParams()))
