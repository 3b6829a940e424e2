"""The `llm-api` console script, run as a user runs it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from app import __version__
from tests.conftest import TINY_GGUF, parse_sse, without_auth

LLM_API = shutil.which("llm-api") or str(Path(sys.executable).parent / "llm-api")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(tmp_path: Path, config: dict[str, object]) -> tuple[subprocess.Popen[str],
                                                               httpx.Client]:
    """`llm-api serve` on `config` (auth off) in a subprocess, once /ready says 200."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(without_auth(config, tmp_path)))
    return serve_file(path)


def serve_file(path: Path) -> tuple[subprocess.Popen[str], httpx.Client]:
    """`llm-api serve --config path` in a subprocess, once /ready says 200."""
    port = free_port()
    proc = subprocess.Popen([LLM_API, "serve", "--config", str(path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.monotonic() + 60
    while True:
        try:
            if client.get("/ready").status_code == 200:
                return proc, client
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.communicate()[0]}")
        time.sleep(0.1)


def test_version() -> None:
    done = subprocess.run([LLM_API, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"llm-api {__version__}"


def test_serve_a_local_gguf_answers_the_three_endpoints(tmp_path: Path) -> None:
    proc, client = serve(tmp_path, {"model_family": "llama",
                                    "setup_params": {"model_path": str(TINY_GGUF)},
                                    "model_params": {"n_ctx": 512}})
    try:
        body = {"prompt": "hello", "params": {"max_tokens": 8, "temperature": 0}}
        text = client.post("/generate", json=body).json()
        assert isinstance(text, str) and text
        with client.stream("POST", "/agenerate", json=body) as response:
            assert "".join(d for _, d in parse_sse(response.iter_lines())) == text
        assert len(client.post("/embeddings", json={"text": "hello"}).json()) == 64
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    # uvicorn shuts down cleanly, then re-raises SIGTERM so the exit status reports it
    assert proc.returncode in (0, -15), output
    assert "Application shutdown complete" in output


def test_serve_exits_non_zero_when_a_model_cannot_load(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(without_auth({"setup_params": {"model_path": str(bad)},
                                                   "model_family": "llama"}, tmp_path)))
    done = subprocess.run([LLM_API, "serve", "--config", str(config), "--port",
                           str(free_port())], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "broken.gguf" in done.stderr and "could not be loaded" in done.stderr


def test_sigterm_with_a_stream_open_cancels_it_and_exits(tmp_path: Path) -> None:
    proc, client = serve(tmp_path, {"model_family": "llama",
                                    "setup_params": {"model_path": str(TINY_GGUF)},
                                    "model_params": {"n_ctx": 8192},
                                    "server": {"graceful_shutdown_seconds": 1}})
    try:
        body = {"prompt": "hello", "params": {"max_tokens": 8000, "temperature": 0}}
        with client.stream("POST", "/agenerate", json=body) as response:
            lines = response.iter_lines()
            next(lines)
            proc.terminate()
            received = 0
            try:
                for _ in lines:
                    received += 1
            except httpx.HTTPError:
                pass  # the server cut the stream
        assert proc.wait(timeout=20) is not None
    finally:
        proc.kill()
        output = proc.communicate(timeout=30)[0]
    assert received < 2 * 8000
    assert "Application shutdown complete" in output
