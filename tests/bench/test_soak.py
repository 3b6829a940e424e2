"""bench/soak.py: how it classifies answers, and a short soak of a real `llm-api serve`.

The soak test starts the server through the script itself (`--config`: the script owns the
server's pid, samples its process tree and must stop it, leaving nothing behind) over the
tiny GGUF with a queue of 2 and a limited key, so that 503 `queue_full` and 429s happen on
purpose. 20 clients x 20 s (+ 3 s of warm-up); it asserts behaviour (every outcome
classified, nothing "other", descriptors and RSS back within the bounds), never speed.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import TINY_GGUF

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "soak.py"
ADMIN_KEY = "llmapi-soak-test-admin-key-0123456789abcdef"
SSE = {"content-type": "text/event-stream"}


def _soak() -> ModuleType:
    """bench/soak.py as a module (bench/ is a folder of scripts, not a package)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return importlib.import_module("soak")
    finally:
        sys.path.remove(str(SCRIPT.parent))


soak = _soak()


def error(code: str | None, **extra: Any) -> bytes:
    return json.dumps({"error": {"message": "m", "type": "t", "param": None, "code": code,
                                 **extra}}).encode()


@pytest.mark.parametrize(("status", "headers", "body", "limited", "expected"), [
    (503, {"retry-after": "1"}, error("queue_full"), False, soak.BUSY),
    (503, {}, error("queue_full"), False, soak.OTHER),  # no Retry-After
    (503, {"retry-after": "1"}, error("engine_restarted"), False, soak.OTHER),
    (429, {"retry-after": "3"}, error("rate_limit_exceeded"), True, soak.LIMITED),
    (429, {}, error("quota_exceeded"), True, soak.LIMITED),
    (429, {"retry-after": "3"}, error("rate_limit_exceeded"), False, soak.OTHER),  # admin key
    (429, {"retry-after": "3"}, error("too_many_failed_authentications"), True, soak.OTHER),
    (503, {"retry-after": "1"}, error("queue_full", extra=1), False, soak.OTHER),  # shape
    (503, {"retry-after": "1"}, b'{"detail": "busy"}', False, soak.OTHER),
    (500, {}, b"Internal Server Error", False, soak.OTHER),  # not JSON
])
def test_refusals_are_deliberate_only_with_their_code_shape_and_headers(
        status: int, headers: dict[str, str], body: bytes, limited: bool,
        expected: str) -> None:
    response = httpx.Response(status, headers=headers, content=body)
    assert soak.refusal("chat_stream", response, body, limited).result == expected


def _read(events: bytes, close_after: int | None = None) -> Any:
    response = httpx.Response(200, headers=SSE, content=events)
    return asyncio.run(soak.read_stream("chat_stream", response, 0.0, close_after))


CHUNK = b'data: {"choices": [{"delta": {"content": "hi"}, "finish_reason": null}]}\n\n'
LAST = b'data: {"choices": [{"delta": {}, "finish_reason": "length"}]}\n\n'
DONE = b"data: [DONE]\n\n"


def test_a_stream_is_ok_only_when_it_ends_with_a_finish_reason_and_done() -> None:
    ok = _read(b": ping\n\n" + CHUNK + LAST + DONE)
    assert (ok.result, ok.accepted_stream) == (soak.OK, True)
    assert ok.ttft is not None
    for events, why in [(CHUNK + LAST, "without [DONE]"), (CHUNK + DONE, "finish_reason"),
                        (CHUNK + b'data: {"error": {"code": "x"}}\n\n', "SSE error frame"),
                        (CHUNK + b'event: error\ndata: {"error": {}}\n\n', "SSE error frame"),
                        (CHUNK + b"data: {oops\n\n", "malformed"),
                        (CHUNK + b"data: [1]\n\n", "malformed"),
                        (CHUNK + LAST + DONE + CHUNK, "after [DONE]")]:
        broken = _read(events)
        assert (broken.result, broken.accepted_stream) == (soak.OTHER, True), events
        assert why in broken.detail


def test_a_stream_closed_on_purpose_is_its_own_outcome() -> None:
    for close_after in (0, 1):
        assert _read(CHUNK + CHUNK + LAST + DONE, close_after).result == soak.DISCONNECTED


def test_fd_bounds_tell_files_from_sockets() -> None:
    args = soak.parse_args(["--url", "http://x"])
    start = soak.Sample(0, 100.0, fds=50, files=20, processes=4)
    assert soak.fd_growth(args, start, soak.Sample(1, 100.0, 110, 80, 4)) == []  # SQLite's
    assert "other than files" in soak.fd_growth(args, start, soak.Sample(1, 100.0, 61, 20, 4))[0]
    assert soak.fd_growth(args, start, soak.Sample(1, 100.0, 125, 95, 4))[0].startswith(
        "open file descriptors grew 20 -> 95")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended (its parent, not ours, reaps it)


def test_short_soak_of_a_real_server(tmp_path: Path) -> None:
    config = {
        "auth": {"enabled": True, "admin_key": ADMIN_KEY},
        "data_dir": str(tmp_path / "data"),
        "server": {"max_queue": 2, "graceful_shutdown_seconds": 2, "log_level": "warning"},
        "models": {"tiny": {"model_family": "llama",
                            "setup_params": {"model_path": str(TINY_GGUF)},
                            "model_params": {"n_ctx": 512, "n_threads": 1, "parallel": 2}}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "soak.json"
    command = [sys.executable, str(SCRIPT), "--config", str(path), "--key", ADMIN_KEY,
               "--clients", "20", "--seconds", "20", "--warmup", "3", "--grace", "20",
               "--settle", "10", "--limited-share", "0.25", "--limited-rpm", "30",
               "--json", str(out), "--server-log", str(tmp_path / "server.log")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_API_", "HF_"))}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, cwd=tmp_path)
    try:
        output, _ = process.communicate(timeout=240)  # the script's own watchdog is shorter
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # it stops its server on SIGTERM
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"the soak did not stop by itself:\n{output}")
    assert process.returncode == 0, output
    result = json.loads(out.read_text())
    outcomes = result["outcomes"]
    assert outcomes["other"] == 0, result["others"]
    assert result["streams_accepted"] > 0 and result["streams_unfinished"] == 0, output
    for deliberate in ("429 (deliberate)", "503 (deliberate)", "disconnected (deliberate)"):
        assert outcomes[deliberate] > 0, (deliberate, output)
    for kind in ("chat_stream", "completion_stream", "completion", "embedding"):
        assert result["by_kind"].get(f"ok / {kind}", 0) > 0, (kind, output)
    start, end = result["samples"]["start"], result["samples"]["end"]
    bounds = result["bounds"]
    assert (end["fds"] - end["files"]) - (start["fds"] - start["files"]) \
        <= bounds["max_fd_growth"], output
    assert end["files"] - start["files"] <= bounds["max_file_fd_growth"], output
    assert end["rss_mib"] <= start["rss_mib"] * (1 + bounds["max_rss_growth"] / 100), output
    assert result["samples"]["middle"]["processes"] >= 2, output  # API + the model's worker
    assert result["failures"] == [] and result["left_behind"] == [], output
    assert not [pid for pid in result["processes_seen"] if _alive(pid)], output
