"""Real families' chat templates (tests/fixtures/templates, from their model cards) render a
conversation to exactly the prompt the family expects, in the llama.cpp and the transformers
backends alike, with exactly one BOS; a template that refuses a conversation is a 400 that
says why, never a 500."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from backends.base import Backend, GenerationParams, GenerationRequest, ModelSpec
from backends.errors import InvalidRequest
from backends.hf import HFBackend, HFParams
from backends.llama import LlamaBackend, LlamaParams
from tests.conftest import FIXTURES, TINY_GGUF, LiveServer, assert_error

TEMPLATES = FIXTURES / "templates"
TINY_HF = FIXTURES / "tiny-llama-hf"
# The tiny models' special tokens, which the templates' bos_token and eos_token stand for.
BOS, EOS = "<s>", "</s>"
ONE = GenerationParams(temperature=0, max_tokens=1)

SYSTEM = {"role": "system", "content": "You are brief."}
TURNS = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"},
         {"role": "user", "content": "How are you?"}]


def llama3_prompt(today: str) -> str:
    """Llama 3.2's template dates the system turn with today's date (strftime_now)."""
    head = "<|start_header_id|>{}<|end_header_id|>\n\n"
    return (BOS + head.format("system") + "Cutting Knowledge Date: December 2023\n"
            f"Today Date: {today}\n\nYou are brief.<|eot_id|>"
            + head.format("user") + "Hello<|eot_id|>" + head.format("assistant")
            + "Hi there<|eot_id|>" + head.format("user") + "How are you?<|eot_id|>"
            + head.format("assistant"))


# template file, conversation, the exact prompt (a function of today's date)
FAMILIES: dict[str, tuple[str, list[dict[str, str]], Callable[[str], str]]] = {
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", [SYSTEM, *TURNS], lambda _: (
        "<|im_start|>system\nYou are brief.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHi there<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n"
        "<|im_start|>assistant\n")),
    "llama3.2": ("meta-llama-Llama-3.2-3B-Instruct.jinja", [SYSTEM, *TURNS], llama3_prompt),
    # Mistral puts the system prompt into the last user turn.
    "mistral-v0.3": ("mistralai-Mistral-7B-Instruct-v0.3.jinja", [SYSTEM, *TURNS], lambda _: (
        f"{BOS}[INST] Hello[/INST] Hi there{EOS}[INST] You are brief.\n\nHow are you?[/INST]")),
    "gemma2": ("google-gemma-2-2b-it.jinja", TURNS, lambda _: (
        f"{BOS}<start_of_turn>user\nHello<end_of_turn>\n"
        "<start_of_turn>model\nHi there<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n")),
}
# conversations a template refuses with raise_exception, and the words of its refusal
REFUSED = [
    ("google-gemma-2-2b-it.jinja", [SYSTEM, *TURNS], "System role not supported"),
    ("mistralai-Mistral-7B-Instruct-v0.3.jinja", [TURNS[0], TURNS[0]],
     "conversation roles must alternate user/assistant"),
]


def template(name: str) -> str:
    return (TEMPLATES / name).read_text()


def load_llama(chat_template: str) -> Backend:
    return LlamaBackend.load(ModelSpec(name="t", path=TINY_GGUF, params=LlamaParams(
        n_ctx=256, n_threads=2, embeddings=False, chat_template=chat_template)))


def load_hf(chat_template: str) -> Backend:
    return HFBackend.load(ModelSpec(name="t", path=TINY_HF, params=HFParams(
        device_map="cpu", chat_template=chat_template)))


@pytest.fixture(params=[load_llama, load_hf], ids=["llama", "huggingface"])
def load(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Backend]]:
    """Loads the tiny model of one family with a given chat template (closed afterwards)."""
    loaded: list[Backend] = []

    def with_template(chat_template: str) -> Backend:
        loaded.append(request.param(chat_template))
        return loaded[-1]

    yield with_template
    for backend in loaded:
        backend.close()


def today() -> str:
    return datetime.now().strftime("%d %b %Y")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_real_template_renders_the_exact_prompt(load: Callable[[str], Backend],
                                                  family: str) -> None:
    name, messages, expected = FAMILIES[family]
    backend = load(template(name))
    before = today()
    prompt = backend.apply_chat_template(messages)
    assert prompt in {expected(before), expected(today())}  # the date may turn meanwhile
    # The template's special tokens are read as such: its one BOS (Qwen writes none) ...
    ids = backend.tokenize(prompt, add_special=False)
    [bos] = backend.tokenize(BOS, add_special=False)
    assert ids.count(bos) == prompt.count(BOS) == (0 if family == "qwen2.5" else 1)
    assert (ids[0] == bos) == prompt.startswith(BOS)
    # ... and a chat request feeds exactly those tokens: no BOS added on top
    *_, final = backend.generate(GenerationRequest(messages=tuple(messages), params=ONE))
    assert final.prompt_tokens == len(ids)


@pytest.mark.parametrize(("name", "messages", "words"), REFUSED,
                         ids=["gemma2-system", "mistral-user-user"])
def test_a_template_refusing_the_messages_is_an_invalid_request(
        load: Callable[[str], Backend], name: str, messages: list[dict[str, str]],
        words: str) -> None:
    backend = load(template(name))
    with pytest.raises(InvalidRequest) as refused:
        backend.apply_chat_template(messages)
    assert words in refused.value.message and refused.value.param == "messages"
    with pytest.raises(InvalidRequest):
        next(iter(backend.generate(GenerationRequest(messages=tuple(messages), params=ONE))))


@pytest.fixture(scope="module")
def gemma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Both families' tiny models with Gemma 2's template, which refuses a system turn."""
    gemma = template("google-gemma-2-2b-it.jinja")
    config: dict[str, Any] = {"models": {
        "llama": {"model_family": "llama", "default_max_tokens": 4,
                  "setup_params": {"model_path": str(TINY_GGUF)},
                  "model_params": {"n_ctx": 256, "n_threads": 2, "chat_template": gemma}},
        "hf": {"model_family": "huggingface", "default_max_tokens": 4,
               "setup_params": {"model_path": str(TINY_HF)},
               "model_params": {"device_map": "cpu", "chat_template": gemma}}}}
    server = LiveServer(config, tmp_path_factory.mktemp("gemma")).start()
    yield server
    server.stop()


ROUTES = [("/v1/chat/completions", {}), ("/v1/chat/completions", {"stream": True}),
          ("/chat_completion", {"job_id": "j1", "meta": {}}), ("/tokenize", {})]


@pytest.mark.parametrize("model", ["llama", "hf"])
@pytest.mark.parametrize(("path", "extra"), ROUTES,
                         ids=["chat", "chat-stream", "queue-chat", "tokenize"])
def test_a_refused_conversation_is_a_400_naming_the_problem(
        gemma_server: LiveServer, model: str, path: str, extra: dict[str, Any]) -> None:
    body: dict[str, Any] = {"messages": [SYSTEM, TURNS[0]], **extra}
    if path == "/chat_completion":
        body["meta"] = {"model": model}
    else:
        body["model"] = model
    error = assert_error(gemma_server.client.post(path, json=body), 400, "invalid_request",
                         ("chat template", "System role not supported"))
    assert error["param"] == "messages"
    # the same model answers a conversation its template accepts
    fine = gemma_server.client.post(path, json={**body, "messages": TURNS})
    assert fine.status_code == 200, fine.text


def test_the_templates_are_the_published_files() -> None:
    """Two of the files are byte-identical to llama.cpp's models/templates copies (their
    sha256 from that repository's git-lfs pointers): what was written down is what ships."""
    import hashlib

    published = {
        "google-gemma-2-2b-it.jinja":
            "ecd6ae513fe103f0eb62e8ab5bfa8d0fe45c1074fa398b089c93a7e70c15cfd6",
        "meta-llama-Llama-3.2-3B-Instruct.jinja":
            "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4",
    }
    for name, digest in published.items():
        assert hashlib.sha256((TEMPLATES / name).read_bytes()).hexdigest() == digest, name
    assert {p.name for p in Path(TEMPLATES).glob("*.jinja")} == \
        {name for name, _, _ in FAMILIES.values()}
