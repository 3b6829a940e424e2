"""Downloads from a local fake hub over HF_ENDPOINT, through the real huggingface_hub code."""

from __future__ import annotations

import errno
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from backends.errors import ModelLoadError
from backends.hub import _explain, fetch_file
from tests.conftest import TINY_GGUF, assert_error, wait_for
from tests.fakehub import FakeHub

REPO = "acme/tiny-llama-GGUF"
FILE = "tiny-llama.Q8_0.gguf"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.add(REPO, {FILE: TINY_GGUF.read_bytes(), "tiny-llama.F16.gguf": b"GGUF-other",
                    "README.md": b"# tiny"})
    fake.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    yield fake
    fake.stop()


def hub_config(models_dir: Path, filename: str = FILE, repo: str = REPO) -> dict[str, Any]:
    return {"models_dir": str(models_dir), "model_family": "llama",
            "setup_params": {"repo_id": repo, "filename": filename},
            "model_params": {"n_ctx": 512, "n_threads": 2}}


def test_download_then_restart_without_the_hub(hub: FakeHub, live_server: Any, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    server = live_server(hub_config(models, filename="*Q8_0.gguf"))
    local = models / "acme" / "tiny-llama-GGUF" / FILE
    assert local.read_bytes() == TINY_GGUF.read_bytes()
    assert server.client.post("/generate", json={"prompt": "hi", "params": {
        "max_tokens": 4}}).status_code == 200
    server.stop()
    seen = len(hub.requests)
    assert any("/resolve/" in path for _, path, _ in hub.requests)
    hub.stop()  # unreachable from now on
    again = live_server(hub_config(models, filename="*Q8_0.gguf"), name="again")
    assert again.client.post("/generate", json={"prompt": "hi"}).status_code == 200
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = live_server(hub_config(models), name="offline")
    assert offline.client.get("/ready").json()["models"][0]["state"] == "ready"
    assert len(hub.requests) == seen


def test_missing_file_lists_the_repos_gguf_files(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        fetch_file(tmp_path, REPO, "tiny-llama.Q4_K_M.gguf")
    message = err.value.message
    assert "tiny-llama.Q4_K_M.gguf" in message and FILE in message
    assert "tiny-llama.F16.gguf" in message and "README.md" not in message


def test_glob_must_match_exactly_one_file(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="matched tiny-llama.Q8_0.gguf, tiny-llama.F16"):
        fetch_file(tmp_path, REPO, "*.gguf")
    with pytest.raises(ModelLoadError, match="matched nothing"):
        fetch_file(tmp_path, REPO, "*q2_k.gguf")


def test_missing_repo(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="'acme/nothing' was not found.*HF_TOKEN"):
        fetch_file(tmp_path, "acme/nothing", FILE)


def test_unreachable_hub_says_how_to_work_offline(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    hub = FakeHub().start()
    url = hub.url
    hub.stop()
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(ModelLoadError, match="cannot reach the Hugging Face Hub.*HF_HUB_OFFLINE"):
        fetch_file(tmp_path, REPO, FILE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set.*llm-api download"):
        fetch_file(tmp_path, REPO, FILE)


BIG = random.Random(0).randbytes(24 * 1024 * 1024)
MIB10 = 10 * 1024 * 1024


def test_cut_download_resumes_with_a_range_request(hub: FakeHub, tmp_path: Path) -> None:
    # huggingface_hub writes 10 MiB chunks: a cut after the first one resumes from there.
    hub.add(REPO, {"big.gguf": BIG})
    hub.cuts["big.gguf"] = 1
    path = fetch_file(tmp_path, REPO, "big.gguf")
    assert path.read_bytes() == BIG
    ranges = [rng for method, p, rng in hub.requests if method == "GET" and p.endswith("big.gguf")]
    assert ranges == [None, f"bytes={MIB10}-"]
    assert not list(tmp_path.rglob("*.part"))


def test_download_resumes_across_restarts(hub: FakeHub, tmp_path: Path) -> None:
    hub.add(REPO, {"big.gguf": BIG})
    hub.cuts["big.gguf"] = 100  # this attempt never gets past the first chunk
    with pytest.raises(ModelLoadError, match="big.gguf"):
        fetch_file(tmp_path, REPO, "big.gguf")
    folder = tmp_path / "acme" / "tiny-llama-GGUF"
    assert not (folder / "big.gguf").exists()  # never under its final name while partial
    [part] = folder.rglob("big.gguf.*.part")
    assert part.stat().st_size == MIB10
    hub.cuts.clear()
    hub.requests.clear()
    path = fetch_file(tmp_path, REPO, "big.gguf")  # "the next start"
    assert path.read_bytes() == BIG and not part.exists()
    ranges = [rng for method, p, rng in hub.requests if method == "GET" and p.endswith("big.gguf")]
    assert ranges == [f"bytes={MIB10}-"]


def test_corrupt_download_fails_its_checksum_and_is_discarded(hub: FakeHub,
                                                              tmp_path: Path) -> None:
    hub.add(REPO, {"big.gguf": BIG})
    hub.cuts["big.gguf"] = 100
    with pytest.raises(ModelLoadError):
        fetch_file(tmp_path, REPO, "big.gguf")
    [part] = (tmp_path / "acme").rglob("big.gguf.*.part")
    part.write_bytes(b"x" * MIB10)  # the kept part no longer matches the file
    hub.cuts.clear()
    with pytest.raises(ModelLoadError, match="sha256"):
        fetch_file(tmp_path, REPO, "big.gguf")
    assert not part.exists() and not (tmp_path / "acme" / "tiny-llama-GGUF" / "big.gguf").exists()
    assert fetch_file(tmp_path, REPO, "big.gguf").read_bytes() == BIG


def test_failed_download_leaves_no_file_and_the_next_start_completes(
        hub: FakeHub, live_server: Any, tmp_path: Path) -> None:
    hub.cuts[FILE] = 100  # every attempt is cut off half-way
    models = tmp_path / "models"
    server = live_server(hub_config(models), wait_ready=False)
    wait_for(lambda: server.model_stats()["state"] != "loading", 90, "the download to fail")
    ready = server.client.get("/ready")
    assert ready.status_code == 503
    model = ready.json()["models"][0]
    assert model["state"] == "failed" and FILE in model["error"]
    assert not (models / "acme" / "tiny-llama-GGUF" / FILE).exists()
    assert_error(server.client.post("/generate", json={"prompt": "x"}), 503, "model_not_ready")
    hub.cuts.clear()
    again = live_server(hub_config(models), name="again")
    assert again.client.post("/generate", json={"prompt": "x"}).status_code == 200
    assert (models / "acme" / "tiny-llama-GGUF" / FILE).read_bytes() == TINY_GGUF.read_bytes()


def test_disk_full_is_explained(tmp_path: Path) -> None:
    error = _explain(OSError(errno.ENOSPC, "No space left on device"), REPO, FILE, None,
                     "setup_params", tmp_path)
    assert "disk full" in error.message and str(tmp_path) in error.message


def test_download_command_fetches_and_reports(hub: FakeHub, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    models = tmp_path / "models"
    config.write_text(yaml.safe_dump(hub_config(models)))
    cli = [sys.executable, "-m", "app.cli", "download", "--config", str(config)]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (models / "acme" / "tiny-llama-GGUF" / FILE).is_file()
    config.write_text(yaml.safe_dump(hub_config(models, filename="nope.gguf")))
    failed = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert "nope.gguf" in failed.stderr and FILE in failed.stderr


def test_gated_repo_needs_hf_token(hub: FakeHub, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add("acme/gated", {FILE: b"GGUF-gated"})
    hub.gated["acme/gated"] = "hf_secret_token"
    with pytest.raises(ModelLoadError, match="gated.*HF_TOKEN") as err:
        fetch_file(tmp_path, "acme/gated", FILE)
    assert "hf_secret_token" not in err.value.message
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    assert fetch_file(tmp_path, "acme/gated", FILE).read_bytes() == b"GGUF-gated"


def test_revision_is_requested(hub: FakeHub, tmp_path: Path) -> None:
    fetch_file(tmp_path, REPO, FILE, revision="v1.0")
    assert any(p.endswith(f"/resolve/v1.0/{FILE}") for _, p, _ in hub.requests)
