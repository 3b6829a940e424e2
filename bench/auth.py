"""Per-request cost of auth + quotas: /generate latency with auth on vs off, same run.

    .venv/bin/python bench/auth.py [--requests 400] [--store sqlite|postgres URL]

Three `llm-api serve` processes on the committed tiny GGUF (tests/fixtures), one engine thread
each: auth off; auth on with a key without limits; auth on with a key that has every limit
(request and token quotas, rpm, tpm, max_parallel: the prompt is tokenized for the
reservation). Requests (max_tokens=1, greedy) alternate between the servers over persistent
connections; p50/p99 of each and their differences to "auth off" are printed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import serve_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny-llama-q8_0.gguf"
ADMIN = "llmapi-bench-admin-key-0123456789"
BODY = json.dumps({"prompt": "the quick brown fox", "params": {"max_tokens": 1,
                                                                "temperature": 0}})
LIMITS = {"max_requests": 10**9, "max_tokens": 10**12, "rpm": 10**9, "tpm": 10**12,
          "max_parallel": 100}


def serve(workdir: Path, port: int, auth: bool, store: str | None) -> subprocess.Popen[bytes]:
    config = {"model_family": "llama", "setup_params": {"model_path": str(TINY)},
              "model_params": {"n_ctx": 512, "n_threads": 1},
              "data_dir": str(workdir / "data"), "server": {"log_level": "warning"},
              "auth": {"enabled": auth, "admin_key": ADMIN}}
    if store:
        config["database_url"] = store
    return serve_config(config, port, workdir)


def new_key(port: int, limits: dict[str, int]) -> str:
    response = httpx.post(f"http://127.0.0.1:{port}/admin/keys", json={"name": "bench",
                          **limits}, headers={"Authorization": f"Bearer {ADMIN}"})
    response.raise_for_status()
    secret: str = response.json()["secret"]
    return secret


class Caller:
    def __init__(self, port: int, key: str | None) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port)
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.times: list[float] = []

    def once(self) -> None:
        start = time.perf_counter()
        self.connection.request("POST", "/generate", BODY, self.headers)
        response = self.connection.getresponse()
        body = response.read()
        self.times.append((time.perf_counter() - start) * 1000)
        if response.status != 200:
            raise SystemExit(f"request failed: {response.status} {body[:200]!r}")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--store", default=None, help="database_url (default: SQLite file)")
    parser.add_argument("--port", type=int, default=8790)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [serve(Path(tmp) / name, args.port + i, auth, args.store)
                 for i, (name, auth) in enumerate([("off", False), ("on", True)])]
        try:
            callers = {"auth off": Caller(args.port, None),
                       "auth on, key without limits": Caller(args.port + 1,
                                                             new_key(args.port + 1, {})),
                       "auth on, key with every limit": Caller(args.port + 1, new_key(
                           args.port + 1, LIMITS))}
            for caller in callers.values():  # warm up
                for _ in range(20):
                    caller.once()
                caller.times.clear()
            for _ in range(args.requests):
                for caller in callers.values():
                    caller.once()
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
    base = callers["auth off"].times
    store = "Postgres" if args.store else "SQLite"
    print(f"\n/generate (max_tokens=1), {args.requests} requests each, alternating; store: "
          f"{store}; {os.cpu_count()} cores\n")
    print(f"| {'server':32} | p50 ms | p99 ms | p50 − off | p99 − off |")
    print(f"|{'-' * 34}|-------:|-------:|----------:|----------:|")
    for name, caller in callers.items():
        t = caller.times
        print(f"| {name:32} | {percentile(t, 50):6.2f} | {percentile(t, 99):6.2f} | "
              f"{percentile(t, 50) - percentile(base, 50):9.2f} | "
              f"{percentile(t, 99) - percentile(base, 99):9.2f} |")


if __name__ == "__main__":
    main()
