"""model_family: gptq (and gptq_llama), end to end: fake hub → GPTQModel on CPU → HTTP.

The checkpoint is tests/fixtures/tiny-llama-gptq: tiny-llama-hf quantized by gptqmodel on CPU
(4 bits, group size 32). The first load on a machine JIT-compiles GPTQModel's CPU kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from backends.base import CHAT, GenerationParams, GenerationRequest
from backends.errors import ModelLoadError
from backends.gptq import GPTQBackend, GPTQParams, check_quantization, quantize_config
from backends.registry import backend_class
from tests.backends.conftest import (
    GPTQ_REPO,
    TINY_GPTQ,
    TINY_HF,
    first_piece_then_cancel,
    start_module_server,
)
from tests.conftest import LiveServer, assert_bad_settings, assert_error, stream_events, wait_for
from tests.conftest import generate as generate_text
from tests.fakehub import FakeHub

GREEDY = {"temperature": 0, "max_tokens": 16}
CPU = {"device_map": "cpu", "n_threads": 2}


@pytest.fixture(scope="module")
def server(hf_hub: FakeHub, module_env: pytest.MonkeyPatch,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("gptq")
    config = {"models_dir": str(root / "models"),
              "server": {"placement": "inprocess"},  # tests look at the loaded backend
              "models": {
        "q": {"model_family": "gptq", "setup_params": {"repo_id": GPTQ_REPO},
              "model_params": CPU, "default_max_tokens": 16},
        # an AutoGPTQ-era config: the old family name, filename, wbits and group_size
        "legacy": {"model_family": "gptq_llama",
                   "setup_params": {"repo_id": GPTQ_REPO, "filename": "model.safetensors"},
                   "model_params": {**CPU, "wbits": 4, "group_size": 32}},
    }}
    live = start_module_server(config, root, hf_hub, module_env)
    yield live
    live.stop()


def backend_of(server: LiveServer, name: str) -> GPTQBackend:
    backend = server.app.state.pool.get(name).backend
    assert isinstance(backend, GPTQBackend)
    return backend


def generate(server: LiveServer, prompt: str, model: str = "q", **params: Any) -> str:
    return generate_text(server, prompt, model, **params)


def test_the_alias_and_the_family_share_one_backend(server: LiveServer) -> None:
    assert backend_class("gptq") is backend_class("gptq_llama") is GPTQBackend
    # two models loaded in parallel: torch's process-wide default dtype is left as it was
    assert torch.get_default_dtype() == torch.float32


def test_the_kernel_computes_what_the_unquantized_model_does(server: LiveServer) -> None:
    """A broken kernel choice (wrong dequantization, packing) gives unrelated logits."""
    quantized = backend_of(server, "q")._model  # the engine is idle between requests
    reference = AutoModelForCausalLM.from_pretrained(TINY_HF).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY_HF)
    ids = tokenizer("The quick brown fox jumps over the lazy dog and then",
                    return_tensors="pt").input_ids
    with torch.inference_mode():
        ours, theirs = quantized(input_ids=ids).logits[0], reference(input_ids=ids).logits[0]
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert cosine.mean() > 0.9 and cosine.min() > 0.7, cosine
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.4
    first = generate(server, "The quick brown fox", max_tokens=1, temperature=0)
    expected = reference.generate(tokenizer("The quick brown fox", return_tensors="pt")
                                  .input_ids, max_new_tokens=1, do_sample=False)
    assert first == tokenizer.decode(expected[0, -1:], skip_special_tokens=True)


def test_greedy_text_is_valid_and_streams(server: LiveServer) -> None:
    text = generate(server, "hello world", **GREEDY)
    assert text.strip() and "\ufffd" not in text and text.isprintable()
    events = stream_events(server.client, {"prompt": "hello world", "model": "q",
                                           "params": GREEDY})
    assert len(events) > 3 and "".join(data for _, data in events) == text
    assert generate(server, "hello world", model="legacy", **GREEDY) == text


def test_the_first_piece_arrives_before_the_end(server: LiveServer) -> None:
    first_piece_then_cancel(server, {"prompt": "Once upon a time", "model": "q",
                                     "params": {"max_tokens": 2000, "temperature": 0}}, "q")


def test_stops_seeds_and_chat(server: LiveServer) -> None:
    whole = generate(server, "The quick brown fox", **GREEDY)
    stop = whole[6:9]
    assert generate(server, "The quick brown fox", stop=stop, **GREEDY) == \
        whole[:whole.index(stop)]
    sampled = {"temperature": 1.0, "top_k": 0, "min_p": 0, "max_tokens": 16, "seed": 11}
    assert generate(server, "a", **sampled) == generate(server, "a", **sampled)
    backend = backend_of(server, "q")
    assert CHAT in backend.capabilities
    messages = ({"role": "user", "content": "hi"},)
    assert backend.apply_chat_template(messages) == "<s>user\nhi</s>\n<s>assistant\n"
    assert server.model_stats("q")["capabilities"] == ["chat", "embed", "generate", "json_output",
                                                       "tokenize", "tools"]


def test_embeddings_and_limits(server: LiveServer) -> None:
    vector = server.client.post("/embeddings", json={"text": "hello", "model": "q"}).json()
    assert len(vector) == 64 and sum(x * x for x in vector) == pytest.approx(1.0, rel=1e-5)
    assert_error(server.client.post("/generate", json={"prompt": "hi", "model": "q", "params": {
        "max_tokens": 4096}}), 400, "context_length_exceeded")


def test_legacy_keys_are_checked_against_the_checkpoint(tmp_path: Path) -> None:
    assert quantize_config(TINY_GPTQ) is not None
    check_quantization("q", TINY_GPTQ, GPTQParams(wbits=4, group_size=32))
    with pytest.raises(ModelLoadError, match="wbits is 8, but the checkpoint was quantized "
                                             "with bits=4; remove wbits or set it to 4"):
        check_quantization("q", TINY_GPTQ, GPTQParams(wbits=8))
    with pytest.raises(ModelLoadError, match="group_size is 128, .* group_size=32"):
        check_quantization("q", TINY_GPTQ, GPTQParams(group_size=128))
    with pytest.raises(ModelLoadError, match="is not a GPTQ checkpoint"):
        check_quantization("q", TINY_HF, GPTQParams())


def test_a_mismatching_checkpoint_fails_to_load_with_the_reason(live_server: Any) -> None:
    server = live_server({"model_family": "gptq_llama",
                          "setup_params": {"model_path": str(TINY_GPTQ)},
                          "model_params": {"wbits": 8}}, wait_ready=False)
    wait_for(lambda: server.model_stats()["state"] == "failed", what="the load failure")
    assert "wbits is 8" in server.model_stats()["error"]
    assert_error(server.client.post("/generate", json={"prompt": "hi"}), 503,
                 "model_not_ready")


@pytest.mark.parametrize(("model", "mentions"), [
    ({"model_params": {"backend": "cuda"}}, ("backend", "torch", "marlin")),
    ({"model_params": {"wbits": 5}}, ("wbits",)),
    ({"model_params": {"bits": 4}}, ("model_params.bits", "accepted keys", "wbits")),
    ({"setup_params": {"repo_id": "a/b", "task": "embedding"}},
     ("setup_params.task", "not used by model_family 'gptq'", "tokenizer_repo_id")),
])
def test_bad_settings_name_the_key_and_the_allowed_values(
        tmp_path: Path, model: dict[str, Any], mentions: tuple[str, ...]) -> None:
    config = {"model_family": "gptq", "setup_params": {"repo_id": "a/b"}, **model}
    assert_bad_settings(tmp_path, config, mentions)


def test_generation_params_reach_the_quantized_model(server: LiveServer) -> None:
    backend = backend_of(server, "q")
    chunks = list(backend.generate(GenerationRequest(prompt="hi", params=GenerationParams(
        temperature=0, max_tokens=5))))
    assert chunks[0].prompt_tokens == len(backend.tokenize("hi"))
    assert chunks[-1].completion_tokens == 5 and chunks[-1].finish_reason == "length"
