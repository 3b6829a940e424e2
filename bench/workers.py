"""Remote workers over Redis Streams vs a local worker: time to first token, and how aggregate
tokens/s scales with 1, 2 and 4 workers.

    .venv/bin/python bench/workers.py [--pairs 40] [--reps 3] [--redis redis://127.0.0.1:6379/0]

One `llm-api serve` (placement per model, so both transports share the same API process and
HTTP path) and `llm-api worker` processes on loopback, a Redis key prefix of its own:

- TTFT: the bench model (bench/randmodel.py, ~91M parameters Q8_0, 2 threads) as
  `ttft-local` (a local worker process) and `ttft-remote` (one remote worker); single greedy
  streams of 8 tokens, unique prompts, the two models taking turns; medians and the median of
  the paired differences. Also single-stream decode tokens/s (128 tokens), same turns.
- Scaling, bench model: `bench` served by 1, 2, 4 remote workers of 1 thread each; 8 streams
  x 64 tokens together per run.
- Scaling, fake engine: the `scripted` test family (tests/plugins) streaming a piece every
  10 ms without using the CPU, one request at a time per worker; 16 streams x 40 pieces.
  What it shows is the transport's own scaling, free of the cores.

Prints markdown tables of the figures and their ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import gguf_model  # noqa: E402
from serving_client import Stream, stream, together, unique_prefix  # noqa: E402
from serving_systems import (  # noqa: E402
    CACHE,  # noqa: E402
    Running,
    _status,
    free_port,
)

TEXT = "the quick brown fox jumps over the lazy dog and then"
PACE = 0.01  # the fake engine's seconds per step


def bench_model() -> Path:
    """serving.py's random GGUF (built there once, with gguf from a venv that has it)."""
    path = CACHE / "rand-91m-q8_0-noeos.gguf"
    return path if path.is_file() else gguf_model()


def config(workdir: Path, model: Path, redis_url: str, prefix: str) -> Path:
    def llama(threads: int, placement: str) -> dict[str, Any]:
        return {"model_family": "llama", "setup_params": {"model_path": str(model)},
                "model_params": {"n_ctx": 1024, "n_threads": threads,
                                 "n_threads_batch": threads, "parallel": 8},
                "placement": placement}

    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump({
        "auth": {"enabled": False}, "data_dir": str(workdir / "data"),
        "redis_url": redis_url, "workers": {"prefix": prefix},
        "server": {"max_queue": 64, "log_level": "warning"},
        "models": {"ttft-local": llama(2, "local"), "ttft-remote": llama(2, "remote"),
                   "bench": llama(1, "remote"),
                   "fake": {"model_family": "scripted", "model_params": {"pace": PACE},
                            "placement": "remote"}}}))
    return path


class Cluster:
    def __init__(self, workdir: Path, config_path: Path) -> None:
        self.workdir, self.config = workdir, config_path
        self.exe = str(Path(sys.executable).parent / "llm-api")
        self.port = free_port()
        log = workdir / "api.log"
        with log.open("ab") as out:
            proc = subprocess.Popen([self.exe, "serve", "--config", str(config_path),
                                     "--port", str(self.port)], stdout=out,
                                    stderr=subprocess.STDOUT, cwd=workdir)
        self.api = Running("llm-api", self.port, proc, log)
        self.workers: dict[str, list[subprocess.Popen[bytes]]] = {}
        self._wait(lambda: _status(self.port, "/health") == 200, "the API")
        self._wait(lambda: self.model("ttft-local")["state"] == "ready", "the local worker")

    def _wait(self, ready: Any, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready (see {self.workdir})")
            time.sleep(0.1)

    def model(self, name: str) -> dict[str, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        connection.request("GET", "/ready")
        models = json.loads(connection.getresponse().read())["models"]
        connection.close()
        found: dict[str, Any] = next(m for m in models if m["name"] == name)
        return found

    def live(self, name: str) -> int:
        return int(self.model(name)["workers"] or 0)

    def scale(self, model: str, count: int) -> None:
        """Run exactly `count` workers of `model`."""
        running = self.workers.setdefault(model, [])
        while len(running) > count:
            worker = running.pop()
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
        while len(running) < count:
            log = (self.workdir / f"worker-{model}-{len(running)}.log").open("ab")
            running.append(subprocess.Popen(
                [self.exe, "worker", "--config", str(self.config), "--models", model],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir))
        self._wait(lambda: self.live(model) == count, f"{count} workers of {model}")

    def stop(self) -> None:
        for running in self.workers.values():
            for worker in running:
                worker.send_signal(signal.SIGTERM)
            for worker in running:
                worker.wait(30)
        self.api.stop()


def body(model: str, tokens: int, rng: random.Random) -> dict[str, Any]:
    prompt = "endless" if model == "fake" else f"{unique_prefix(rng)} {TEXT}"
    return {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0}


def one(cluster: Cluster, model: str, tokens: int, rng: random.Random) -> Stream:
    result = stream(cluster.port, "/v1/completions", body(model, tokens, rng))
    if result.error:
        raise RuntimeError(f"{model}: {result.error}")
    return result


def ttft_case(cluster: Cluster, pairs: int, rng: random.Random) -> dict[str, Any]:
    cluster.scale("ttft-remote", 1)
    for model in ("ttft-local", "ttft-remote"):  # warm-up
        one(cluster, model, 8, rng)
    ttft: dict[str, list[float]] = {"ttft-local": [], "ttft-remote": []}
    rate: dict[str, list[float]] = {"ttft-local": [], "ttft-remote": []}
    for i in range(pairs):
        order = ["ttft-local", "ttft-remote"][:: 1 if i % 2 else -1]
        for model in order:
            ttft[model].append(one(cluster, model, 8, rng).ttft * 1000)
        if i % 4 == 0:
            for model in order:
                result = one(cluster, model, 128, rng)
                rate[model].append(result.tokens / (result.end - (result.first or 0)))
    cluster.scale("ttft-remote", 0)
    diffs = [r - loc for loc, r in zip(ttft["ttft-local"], ttft["ttft-remote"], strict=True)]
    ratios = [r / loc for loc, r in zip(rate["ttft-local"], rate["ttft-remote"], strict=True)]
    return {"ttft": {k: statistics.median(v) for k, v in ttft.items()},
            "overhead_ms": statistics.median(diffs), "rate_ratio": statistics.median(ratios),
            "rate": {k: statistics.median(v) for k, v in rate.items()}}


def scaling_case(cluster: Cluster, model: str, streams: int, tokens: int, reps: int,
                 rng: random.Random) -> dict[int, float]:
    out: dict[int, float] = {}
    for count in (1, 2, 4):
        cluster.scale(model, count)
        together(cluster.port, "/v1/completions", [body(model, 8, rng)] * count)  # warm-up
        runs = []
        for _ in range(reps):
            results, wall = together(cluster.port, "/v1/completions",
                                     [body(model, tokens, rng) for _ in range(streams)])
            runs.append(sum(r.tokens for r in results) / wall)
        out[count] = statistics.median(runs)
    cluster.scale(model, 0)
    return out


def report(ttft: dict[str, Any], bench: dict[int, float], fake: dict[int, float],
           streams: tuple[int, int]) -> None:
    local, remote = ttft["ttft"]["ttft-local"], ttft["ttft"]["ttft-remote"]
    rl, rr = ttft["rate"]["ttft-local"], ttft["rate"]["ttft-remote"]
    print("\n| single stream, bench model (2 threads) | local worker | remote worker (Redis) "
          "| remote vs local |")
    print("|---|---|---|---|")
    print(f"| time to first token, median | {local:.1f} ms | {remote:.1f} ms | "
          f"+{ttft['overhead_ms']:.1f} ms (median of paired differences; target <= 5 ms) |")
    print(f"| decode tokens/s (128 tokens), median | {rl:.1f} | {rr:.1f} | "
          f"{ttft['rate_ratio']:.3f}x (median of paired ratios) |")
    print(f"\n| remote workers | bench model, 1 thread each: {streams[0]} streams, tokens/s "
          f"| x 1 worker | fake engine ({PACE * 1000:.0f} ms/step, serial): {streams[1]} "
          "streams, tokens/s | x 1 worker | fake: ideal |")
    print("|---|---|---|---|---|---|")
    for count in bench:
        print(f"| {count} | {bench[count]:.1f} | {bench[count] / bench[1]:.2f}x | "
              f"{fake[count]:.1f} | {fake[count] / fake[1]:.2f}x | {count:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    rng = random.Random(0)
    load = os.getloadavg()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cluster = Cluster(workdir, config(workdir, bench_model(), args.redis, prefix))
        try:
            ttft = ttft_case(cluster, args.pairs, rng)
            bench = scaling_case(cluster, "bench", 8, 64, args.reps, rng)
            fake = scaling_case(cluster, "fake", 16, 40, args.reps, rng)
        finally:
            cluster.stop()
            client = redis.Redis.from_url(args.redis)
            keys = list(client.scan_iter(f"{prefix}:*"))
            if keys:
                client.delete(*keys)
    report(ttft, bench, fake, (8, 16))
    print(f"\nload average (1 min) at the start and end: {load[0]:.1f}, "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
