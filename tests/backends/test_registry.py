"""Families: lazy built-ins (no torch for llama) and third-party entry points."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backends.base import AlgorithmBackend, Backend
from backends.registry import UnknownFamily, backend_class, family_names
from tests.conftest import TINY_GGUF, parse_sse


def test_families_list_builtins_then_plugins() -> None:
    names = family_names()
    assert names[0] == "llama"
    assert "reverse" in names  # installed from tests/plugins by the test command


def test_unknown_family_lists_the_available_ones() -> None:
    with pytest.raises(UnknownFamily, match="unknown model_family 'nope'; available: llama"):
        backend_class("nope")


def test_serving_a_llama_model_imports_no_torch(tmp_path: Path) -> None:
    script = f"""
import json, sys, time
from fastapi.testclient import TestClient
from app.main import create_app
from app.settings import Settings
settings = Settings(model_family="llama", setup_params={{"model_path": {str(TINY_GGUF)!r}}},
                    model_params={{"n_ctx": 256}}, auth={{"enabled": False}},
                    data_dir={str(tmp_path)!r})
with TestClient(create_app(settings)) as client:
    while client.get("/ready").status_code != 200:
        time.sleep(0.05)
    text = client.post("/generate", json={{"prompt": "hi", "params": {{"max_tokens": 3}}}}).json()
print(json.dumps({{"torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules,
                  "text": text}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch"] is False and result["transformers"] is False
    assert isinstance(result["text"], str)


def test_plugin_family_serves_through_http(live_server: Any) -> None:
    server = live_server({"models": {"rev": {"model_family": "reverse"}}})
    assert server.client.post("/generate", json={"prompt": "abc"}).json() == "cba"
    with server.client.stream("POST", "/agenerate", json={"prompt": "hello"}) as response:
        assert [d for _, d in parse_sse(response.iter_lines())] == ["olleh"]
    error = server.client.post("/embeddings", json={"text": "x"})
    assert error.status_code == 400
    assert error.json()["error"]["code"] == "unsupported_capability"


def test_wrapping_a_streaming_algorithm() -> None:
    class Words:
        def run(self, text: str) -> Any:
            return iter(text.split())

    backend_cls = AlgorithmBackend.wrap(Words, family="words")
    assert issubclass(backend_cls, Backend) and backend_cls.family == "words"
    from backends.base import GenerationRequest, ModelSpec
    backend = backend_cls.load(ModelSpec(name="w", params=backend_cls.Params(), path=None))
    chunks = list(backend.generate(GenerationRequest(prompt="a b c")))
    assert [c.text for c in chunks if c.text] == ["a", "b", "c"]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 3
