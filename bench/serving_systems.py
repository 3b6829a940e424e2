"""The systems bench/serving.py compares, each started as its own process on a free port.

- llama-server: C++ server built by bench/build_llama_server.sh (bench/.cache/llama-server);
- llama-cpp-python's server (`python -m llama_cpp.server` in bench/.cache/venv, made by
  bench/setup_bench_venv.sh): one request at a time;
- llm-api (`llm-api serve` of this venv), auth disabled, `model_params.parallel` when the llama
  backend knows it (until the batching engine lands it serves one request at a time).
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache"
LLAMA_SERVER = CACHE / "llama-server"
BENCH_PYTHON = CACHE / "venv" / "bin" / "python"


@dataclass
class Settings:
    """What every system gets alike."""

    model: Path
    threads: int
    parallel: int
    n_ctx: int
    workdir: Path
    extra: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status(port: int, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return 0
    finally:
        connection.close()


@dataclass
class Running:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _launch(name: str, argv: list[str], ready_path: str, port: int, settings: Settings,
            timeout: float = 300) -> Running:
    log = settings.workdir / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                cwd=settings.workdir)
    running = Running(name, port, proc, log)
    deadline = time.monotonic() + timeout
    while _status(port, ready_path) != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            running.stop()
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} did not start (see {log}):\n{tail}")
        time.sleep(0.25)
    return running


def start_llama_server(settings: Settings) -> Running:
    if not LLAMA_SERVER.is_file():
        raise RuntimeError(f"{LLAMA_SERVER} is missing: run bench/build_llama_server.sh")
    port = free_port()
    argv = [str(LLAMA_SERVER), "-m", str(settings.model), "--host", "127.0.0.1",
            "--port", str(port), "-t", str(settings.threads), "-tb", str(settings.threads),
            "-c", str(settings.n_ctx * settings.parallel), "--parallel", str(settings.parallel),
            "--no-webui", "--log-disable"]
    return _launch("llama-server", argv, "/health", port, settings)


def start_llama_cpp_python(settings: Settings) -> Running:
    if not BENCH_PYTHON.is_file():
        raise RuntimeError(f"{BENCH_PYTHON} is missing: run bench/setup_bench_venv.sh")
    port = free_port()
    argv = [str(BENCH_PYTHON), "-m", "llama_cpp.server", "--model", str(settings.model),
            "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(settings.threads),
            "--n_threads_batch", str(settings.threads), "--n_ctx", str(settings.n_ctx),
            "--verbose", "false", "--interrupt_requests", "false"]  # default: a new request
    # cancels the running one; without it, requests queue (one at a time)
    return _launch("llama-cpp-python", argv, "/v1/models", port, settings)


def llama_knows_parallel() -> bool:
    from backends.llama import LlamaParams

    return "parallel" in LlamaParams.model_fields


def llm_api_config(family: str, model_params: dict[str, Any], model: Path,
                   workdir: Path, placement: str = "local") -> Path:
    config = workdir / f"llm-api-{family}-{placement}.yaml"
    config.write_text(yaml.safe_dump({
        "auth": {"enabled": False}, "data_dir": str(workdir / "data"),
        "server": {"max_queue": 64, "log_level": "warning", "placement": placement},
        "models": {"bench": {"model_family": family, "setup_params": {"model_path": str(model)},
                             "model_params": model_params}}}))
    return config


def start_llm_api(settings: Settings, family: str = "llama",
                  model_params: dict[str, Any] | None = None,
                  placement: str = "local") -> Running:
    if model_params is None:
        model_params = {"n_ctx": settings.n_ctx, "n_threads": settings.threads,
                        "n_threads_batch": settings.threads, **settings.extra}
    config = llm_api_config(family, model_params, settings.model, settings.workdir, placement)
    port = free_port()
    exe = Path(sys.executable).parent / "llm-api"
    argv = [str(exe), "serve", "--config", str(config), "--port", str(port)]
    return _launch(f"llm-api-{family}-{placement}", argv, "/ready", port, settings)
