"""The `llm-api` console script, run as a user runs it."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from llm_api_reverse.scripted import CLOSED_EARLY, ENDLESS

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
    assert proc.returncode == 0, output  # a graceful shutdown (see app.cli._stop_on_signals)
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_drains_then_cuts_the_open_stream_settles_it_and_exits_0(
        tmp_path: Path, sig: signal.Signals) -> None:
    """A stream that can only end by being cancelled (the scripted family's `endless`, one
    piece every 0.02 s up to max_tokens: 30 s, far past the 2 s graceful shutdown, so the
    test ends even if nothing cancels it). On the signal the server drains: /ready is 503
    at once and a new request gets 503 with Retry-After while the stream still runs; after
    graceful_shutdown_seconds the stream is cut with an SSE error frame, its usage is
    recorded (503, the pieces it got), and the process exits 0."""
    proc, client = serve(tmp_path, {"models": {"script": {"model_family": "scripted"}},
                                    "server": {"graceful_shutdown_seconds": 2}})
    limit = 1500
    received = []
    try:
        body = {"model": "script", "prompt": ENDLESS, "params": {"max_tokens": limit}}
        with client.stream("POST", "/agenerate", json=body) as response:
            assert response.status_code == 200
            events = parse_sse(response.iter_lines())
            received.append(next(events))
            proc.send_signal(sig)
            with httpx.Client(base_url=client.base_url, timeout=10) as other:
                deadline = time.monotonic() + 2
                while (ready := other.get("/ready")).status_code == 200 \
                        and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert ready.status_code == 503
                assert ready.json()["status"] == "shutting_down"
                refused = other.post("/generate", json={"model": "script", "prompt": "hi"})
                assert refused.status_code == 503
                assert int(refused.headers["Retry-After"]) >= 1
                assert refused.json()["error"]["code"] == "server_shutting_down"
            received.extend(events)
        returncode = proc.wait(timeout=60)
    finally:
        proc.kill()
        output = proc.communicate(timeout=30)[0]
    assert returncode == 0, output
    assert "Application shutdown complete" in output
    # The engine saw the cancellation: the scripted stream logs how far it got when closed.
    closed = re.search(CLOSED_EARLY.replace("%d", r"(\d+)"), output)
    assert closed is not None, output
    sent, asked = int(closed[1]), int(closed[2])
    *ticks, last = received
    assert asked == limit and len(ticks) <= sent < limit
    assert set(ticks) == {("message", "tick ")}
    assert last[0] == "error"
    assert json.loads(last[1])["error"]["code"] == "server_shutting_down"
    with sqlite3.connect(tmp_path / "data" / "llm-api.db") as db:
        rows = db.execute("SELECT endpoint, status, completion_tokens FROM usage").fetchall()
    assert ("/agenerate", 503, len(ticks)) in rows
    assert ("/generate", 503, 0) not in rows  # refused before it reached a model
