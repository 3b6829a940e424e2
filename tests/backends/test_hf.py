"""model_family: huggingface, end to end: fake hub → models_dir → transformers → HTTP."""

from __future__ import annotations

import gc
import math
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.settings import load_settings
from backends.base import CHAT, EMBED, GENERATE, GenerationParams, GenerationRequest, ModelSpec
from backends.errors import CapabilityNotSupported, ContextLengthExceeded, ModelLoadError
from backends.hf import HFBackend, HFParams
from backends.hfgen import generation_config
from backends.hub import fetch_snapshot
from backends.text import TokenTextStream
from tests.backends.conftest import (
    BARE_REPO,
    HF_REPO,
    MINILM_REPO,
    TINY_HF,
    first_piece_then_cancel,
    minilm_dir,
    start_module_server,
    without_chat_template,
)
from tests.conftest import LiveServer, assert_bad_settings, assert_error, generate, stream_events
from tests.fakehub import FakeHub

GREEDY = {"temperature": 0, "max_tokens": 24}


def hf_model(repo: str, **extra: Any) -> dict[str, Any]:
    return {"model_family": "huggingface", "setup_params": {"repo_id": repo},
            "model_params": {"device_map": "cpu", "n_threads": 2}, **extra}


@pytest.fixture(scope="module")
def server(hf_hub: FakeHub, module_env: pytest.MonkeyPatch,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("hf")
    config = {"models_dir": str(root / "models"), "models": {
        "tiny": hf_model(HF_REPO, default_max_tokens=32),
        "bare": hf_model(BARE_REPO),
        "minilm": {**hf_model(MINILM_REPO), "setup_params": {
            "repo_id": MINILM_REPO, "task": "embedding"}},
    }}
    live = start_module_server(config, root, hf_hub, module_env)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def reference() -> tuple[Any, Any]:
    """transformers itself on the same checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(TINY_HF).eval()
    return model, AutoTokenizer.from_pretrained(TINY_HF)


@pytest.fixture(scope="module")
def backend() -> Iterator[HFBackend]:
    loaded = HFBackend.load(ModelSpec(name="tiny", path=TINY_HF,
                                      params=HFParams(device_map="cpu")))
    assert isinstance(loaded, HFBackend)
    yield loaded
    loaded.close()


# -- download ----------------------------------------------------------------------------


def test_the_snapshot_holds_only_the_needed_files(server: LiveServer, hf_hub: FakeHub) -> None:
    folder = Path(load_settings(server.config_path).models_dir) / "acme" / "tiny-llama"
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
             if p.is_file() and ".cache" not in p.parts}
    assert files == {"config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                     "chat_template.jinja"}
    fetched = {path for _, path, _ in hf_hub.requests if "/resolve/" in path}
    assert not any(p.endswith((".bin", ".onnx", "README.md")) for p in fetched)
    minilm = folder.parent.parent / "sentence-transformers" / "all-MiniLM-L6-v2"
    assert (minilm / "1_Pooling" / "config.json").is_file()
    assert not (minilm / "data_config.json").exists()


def test_a_restart_with_the_snapshot_makes_no_request(server: LiveServer, hf_hub: FakeHub,
                                                      live_server: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    models_dir = load_settings(server.config_path).models_dir
    monkeypatch.setenv("HF_ENDPOINT", hf_hub.url)
    seen = len(hf_hub.requests)
    again = live_server({"models_dir": str(models_dir), **hf_model(HF_REPO)})
    assert isinstance(generate(again, "hi", model="tiny-llama", max_tokens=4), str)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = live_server({"models_dir": str(models_dir), **hf_model(HF_REPO)}, name="off")
    assert offline.model_stats()["state"] == "ready"
    assert len(hf_hub.requests) == seen


def test_hub_failures_are_explained(hf_hub: FakeHub, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hf_hub.url)
    with pytest.raises(ModelLoadError, match="'acme/nope' was not found on the hub"):
        fetch_snapshot(tmp_path, "acme/nope")
    hf_hub.add("acme/not-a-model", {"README.md": b"hi"})
    with pytest.raises(ModelLoadError, match="has no config.json"):
        fetch_snapshot(tmp_path, "acme/not-a-model")
    with pytest.raises(ModelLoadError, match="'nope.bin' is not in acme/tiny-llama"):
        fetch_snapshot(tmp_path, HF_REPO, weights="nope.bin")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        fetch_snapshot(tmp_path, HF_REPO)


# -- generation --------------------------------------------------------------------------


def test_greedy_equals_transformers_generate(server: LiveServer,
                                             reference: tuple[Any, Any]) -> None:
    model, tokenizer = reference
    for prompt in ("The quick brown fox", "héllo wörld ✓ 日本", "1 2 3"):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        config = generation_config(GenerationParams(temperature=0), 24)
        expected = model.generate(ids, generation_config=config,
                                  attention_mask=torch.ones_like(ids))
        assert expected.shape[1] == ids.shape[1] + 24
        text = tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
        assert generate(server, prompt, **GREEDY) == text


def test_streamed_pieces_join_to_the_completion(server: LiveServer) -> None:
    events = stream_events(server.client, {"prompt": "hello world", "model": "tiny",
                                           "params": GREEDY})
    assert len(events) > 5 and all(event == "message" for event, _ in events)
    assert "".join(data for _, data in events) == generate(server, "hello world", **GREEDY)


def test_the_first_piece_arrives_before_the_end(server: LiveServer) -> None:
    first_piece_then_cancel(server, {"prompt": "Once upon a time", "model": "tiny",
                                     "params": {"max_tokens": 2000, "temperature": 0}}, "tiny")


def test_stop_strings_end_the_text_and_are_removed(server: LiveServer) -> None:
    whole = generate(server, "The quick brown fox", **GREEDY)
    stop = whole[8:11]
    cut = generate(server, "The quick brown fox", stop=[stop, "\x00never"], **GREEDY)
    assert cut == whole[:whole.index(stop)] and stop not in cut


def test_same_seed_same_text_and_sampling_varies(server: LiveServer) -> None:
    sampled = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0, "max_tokens": 24}
    first = generate(server, "the answer is", seed=7, **sampled)
    assert generate(server, "the answer is", seed=7, **sampled) == first
    others = {generate(server, "the answer is", seed=seed, **sampled) for seed in (1, 2, 3)}
    assert len(others | {first}) > 1


def test_every_sampling_parameter_is_accepted(server: LiveServer) -> None:
    text = generate(server, "hello", temperature=0.7, top_k=20, top_p=0.9, min_p=0.1,
                    repeat_penalty=1.3, presence_penalty=1.5, frequency_penalty=0.5, seed=1,
                    max_tokens=16, echo=True)
    assert text.startswith("hello") and len(text) > len("hello")


def test_default_max_tokens_and_usage_counts(server: LiveServer) -> None:
    before = server.model_stats("tiny")["tokens_generated"]
    generate(server, "hi")
    assert server.model_stats("tiny")["tokens_generated"] - before == 32


def test_bad_requests_get_clear_errors(server: LiveServer) -> None:
    post = server.client.post
    assert_error(post("/generate", json={"prompt": "hi", "model": "tiny", "params": {
        "max_new_tokens": 3}}), 422, "invalid_parameter", ("max_new_tokens", "max_tokens"))
    assert_error(post("/generate", json={"prompt": "hi", "model": "tiny", "params": {
        "max_tokens": 5000}}), 400, "context_length_exceeded", ("2048",))
    assert_error(post("/generate", json={"prompt": "hi", "model": "tiny", "params": {
        "suffix": "x"}}), 400, "unsupported_capability", ("suffix",))
    assert_error(post("/generate", json={"prompt": "hi", "model": "minilm"}), 400,
                 "unsupported_capability", ("text generation",))
    assert_error(post("/embeddings", json={"text": "word " * 300, "model": "minilm"}), 400,
                 "context_length_exceeded", ("256",))


# -- chat --------------------------------------------------------------------------------


def test_chat_uses_the_tokenizers_template(backend: HFBackend) -> None:
    assert {GENERATE, CHAT, EMBED} <= backend.capabilities
    messages = ({"role": "user", "content": "Hello! What is the answer?"},)
    prompt = backend.apply_chat_template(messages)
    assert prompt == "<s>user\nHello! What is the answer?</s>\n<s>assistant\n"
    chunks = list(backend.generate(GenerationRequest(messages=messages, params=GenerationParams(
        temperature=0, max_tokens=8))))
    # the template writes BOS itself: no second one
    assert chunks[-1].prompt_tokens == len(backend.tokenize(prompt, add_special=False))
    assert chunks[-1].completion_tokens == 8 and chunks[-1].finish_reason == "length"


def test_a_model_without_chat_template(server: LiveServer, tmp_path: Path) -> None:
    folder = tmp_path / "bare"
    folder.mkdir()
    for name, data in without_chat_template(TINY_HF).items():
        (folder / name).write_bytes(data)
    bare = HFBackend.load(ModelSpec(name="bare", path=folder, params=HFParams()))
    assert CHAT not in bare.capabilities
    with pytest.raises(CapabilityNotSupported, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(CapabilityNotSupported, match="no chat template"):
        next(bare.generate(GenerationRequest(messages=({"role": "user", "content": "x"},))))
    bare.close()
    assert "chat" not in server.model_stats("bare")["capabilities"]
    assert generate(server, "hello", model="bare", **GREEDY)  # plain completion works


def test_context_is_checked_before_generating(backend: HFBackend) -> None:
    with pytest.raises(ContextLengthExceeded) as err:
        next(backend.generate(GenerationRequest(prompt="hi", params=GenerationParams(
            max_tokens=2048))))
    assert err.value.context_length == 2048


# -- embeddings --------------------------------------------------------------------------


def test_embeddings_are_mean_pooled_hidden_states(server: LiveServer,
                                                  reference: tuple[Any, Any]) -> None:
    model, tokenizer = reference
    texts = ["hello world", "The quick brown fox jumps over the lazy dog"]
    vectors = server.client.post("/embeddings", json={"text": texts, "model": "tiny"}).json()
    for text, vector in zip(texts, vectors, strict=True):
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state[0].mean(dim=0)
        expected = torch.nn.functional.normalize(hidden, dim=0).tolist()
        assert vector == pytest.approx(expected, abs=1e-5)
        assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-5)


def test_an_embedding_model_matches_sentence_transformers(server: LiveServer) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["A man is eating food.", "The new movie is awesome", "héllo wörld",
             "The cat sits outside", "short", "A somewhat longer sentence " * 8]
    ours = torch.tensor(server.client.post("/embeddings", json={
        "text": texts, "model": "minilm"}).json())
    single = server.client.post("/embeddings", json={"text": texts[0], "model": "minilm"})
    assert len(single.json()) == 384
    theirs = SentenceTransformer(str(minilm_dir()), device="cpu").encode(
        texts, convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(ours, theirs.float(), dim=1)
    assert ours.shape == (len(texts), 384)
    assert bool((cosine >= 1 - 1e-5).all()), cosine


# -- settings and lifecycle --------------------------------------------------------------


@pytest.mark.parametrize(("model", "mentions"), [
    ({"model_params": {"dtype": "float32"}}, ("model_params.dtype", "accepted keys",
                                              "torch_dtype", "device_map")),
    ({"model_params": {"torch_dtype": "float8"}}, ("torch_dtype", "bfloat16")),
    ({"model_params": {"device_map": "gpu"}}, ("device_map",)),
    ({"model_params": {"n_threads": 0}}, ("n_threads",)),
    ({"setup_params": {"repo_id": "a/b", "task": "chat"}}, ("task", "embedding")),
    ({"setup_params": {"filename": "x"}}, ("set model_path (a local directory) or repo_id",)),
    ({"model_family": "llama", "setup_params": {"repo_id": "a/b", "filename": "x.gguf",
                                                "task": "embedding"}},
     ("setup_params.task", "not used by model_family 'llama'", "model_path")),
])
def test_bad_settings_name_the_key_and_the_allowed_values(
        tmp_path: Path, model: dict[str, Any], mentions: tuple[str, ...]) -> None:
    config = {"model_family": "huggingface", "setup_params": {"repo_id": "a/b"}, **model}
    assert_bad_settings(tmp_path, config, mentions)


def test_a_local_directory_without_config_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="needs a model directory with a config.json"):
        HFBackend.load(ModelSpec(name="x", path=tmp_path, params=HFParams()))
    broken = tmp_path / "broken"
    shutil.copytree(TINY_HF, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="could not load 'broken'"):
        HFBackend.load(ModelSpec(name="x", path=broken, params=HFParams()))


def test_model_memory_is_released_on_shutdown(live_server: Any) -> None:
    server = live_server({"model_family": "huggingface",  # in this process: the test looks
                          "server": {"placement": "inprocess"},  # at the model's memory
                          "setup_params": {"model_path": str(TINY_HF)},
                          "model_params": {"device_map": "cpu"}})
    assert generate(server, "hi", model="tiny-llama-hf", max_tokens=4)
    scheduler = server.app.state.pool.get(None).scheduler
    model = weakref.ref(scheduler.backend._model)
    server.stop()
    gc.collect()
    assert scheduler.state == "stopped" and model() is None


def test_token_text_stream_matches_whole_decoding(backend: HFBackend) -> None:
    for text in ("hello world", "héllo wörld ✓ 日本 ünïcödé", "a\nb\tc  d", " lead"):
        ids = backend.tokenize(text, add_special=False)
        context = backend.tokenize("x")
        stream = TokenTextStream(backend._decode, context)
        pieces = [stream.push(token) for token in ids]
        whole = backend._decode(context + ids)[len(backend._decode(context)):]
        assert "".join(pieces) + stream.flush() == whole and text in whole
        assert all("\ufffd" not in piece for piece in pieces)


def test_download_command_with_a_separate_tokenizer_repo(
        hf_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    import yaml

    monkeypatch.setenv("HF_ENDPOINT", hf_hub.url)
    models = tmp_path / "models"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"models_dir": str(models), **hf_model(
        BARE_REPO), "setup_params": {"repo_id": BARE_REPO, "tokenizer_repo_id": HF_REPO,
                                     "config_params": {"max_position_embeddings": 512}}}))
    done = subprocess.run([sys.executable, "-m", "app.cli", "download", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    model_dir, tokenizer_dir = models / "acme" / "tiny-llama-no-template", models / "acme" / \
        "tiny-llama"
    assert (model_dir / "model.safetensors").is_file()
    assert (tokenizer_dir / "chat_template.jinja").is_file()
    assert not (tokenizer_dir / "model.safetensors").exists()  # tokenizer files only
    entry_setup = load_settings(config).setup_params
    assert entry_setup is not None
    backend = HFBackend.load(ModelSpec(name="x", path=model_dir, params=HFParams(),
                                       setup_params=entry_setup.model_dump(),
                                       tokenizer_path=tokenizer_dir))
    assert CHAT in backend.capabilities  # the template came with the tokenizer repo
    assert backend.context_length == 512  # config_params reached the model's config
    backend.close()


def test_file_selection_prefers_safetensors_and_skips_code() -> None:
    from backends.hub import select_snapshot_files

    listing = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
               "model-00002-of-00002.safetensors", "pytorch_model.bin", "modeling_x.py",
               "tokenizer.json", "README.md", "onnx/model.onnx", "1_Pooling/config.json"]
    assert select_snapshot_files(listing) == [
        "1_Pooling/config.json", "config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    assert "modeling_x.py" in select_snapshot_files(listing, code=True)
    old = ["config.json", "pytorch_model.bin", "tokenizer.json"]
    assert select_snapshot_files(old) == old
    assert select_snapshot_files(listing, tokenizer_only=True) == ["tokenizer.json"]


# -- the OpenAI surface ------------------------------------------------------------------


def test_openai_chat_goes_through_the_chat_template(server: LiveServer,
                                                    backend: HFBackend) -> None:
    messages = [{"role": "user", "content": "Hello! What is the answer?"}]
    response = server.client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    prompt = backend.apply_chat_template(messages)
    assert body["usage"]["prompt_tokens"] == len(backend.tokenize(prompt, add_special=False))
    assert body["usage"]["completion_tokens"] == 12
    assert body["choices"][0]["finish_reason"] == "length"
    same = backend.generate(GenerationRequest(messages=tuple(messages), params=GenerationParams(
        temperature=0, max_tokens=12)))  # the same checkpoint, in process
    assert body["choices"][0]["message"]["content"] == "".join(c.text for c in same)
    streamed = stream_events(server.client, {"model": "tiny", "messages": messages,
                                             "max_tokens": 12, "temperature": 0,
                                             "stream": True}, path="/v1/chat/completions")
    assert streamed[-1][1] == "[DONE]" and len(streamed) > 3


def test_openai_chat_without_a_template_is_a_clear_400(server: LiveServer) -> None:
    response = server.client.post("/v1/chat/completions", json={
        "model": "bare", "messages": [{"role": "user", "content": "hi"}]})
    assert_error(response, 400, "unsupported_capability", ("chat template",))
    completion = server.client.post("/v1/completions", json={
        "model": "bare", "prompt": "hello", "max_tokens": 4, "temperature": 0})
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"]


def test_openai_embeddings_and_unsupported_options(server: LiveServer) -> None:
    response = server.client.post("/v1/embeddings", json={"model": "minilm",
                                                          "input": ["a", "b"]})
    assert response.status_code == 200, response.text
    assert [len(d["embedding"]) for d in response.json()["data"]] == [384, 384]
    assert_error(server.client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}),
        400, "unsupported_capability", ("logprobs",))
