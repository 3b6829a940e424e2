"""Single-stream overhead of the server: tokens/s through /agenerate ÷ in-process llama.cpp.

    .venv/bin/pip install gguf && .venv/bin/python bench/overhead.py [--threads 1,2] [--rounds 3]

Same GGUF (a random-weight ~91M-parameter Llama, Q8_0, built once into bench/.cache), same
threads, greedy, fixed max_tokens. Rounds alternate between the systems; medians are printed.
Baselines: llama-cpp-python's own streaming `create_completion`, and its raw token loop
`Llama.generate` (no text handling at all: an upper bound).
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
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from randmodel import build  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
PROMPT = "the quick brown fox jumps over the lazy dog and then"


def baseline_stream(llm, tokens: int) -> float:
    start = time.perf_counter()
    count = 0
    for _ in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0, stream=True):
        count += 1
    return count / (time.perf_counter() - start)


def baseline_tokens(llm, tokens: int) -> float:
    prompt = llm.tokenize(PROMPT.encode())
    start = time.perf_counter()
    count = 0
    for _ in llm.generate(prompt, temp=0, top_k=1):
        count += 1
        if count == tokens:
            break
    return count / (time.perf_counter() - start)


def ours(client: httpx.Client, tokens: int) -> float:
    """Tokens/s of one /agenerate stream, read with a minimal client (http.client), so the
    harness spends as little CPU as possible on the shared cores."""
    before = client.get("/ready").json()["models"][0]["tokens_generated"]
    body = json.dumps({"prompt": PROMPT, "params": {"max_tokens": tokens, "temperature": 0}})
    connection = http.client.HTTPConnection(client.base_url.host, client.base_url.port)
    start = time.perf_counter()
    connection.request("POST", "/agenerate", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    while response.read1(65536):
        pass
    elapsed = time.perf_counter() - start
    connection.close()
    count = client.get("/ready").json()["models"][0]["tokens_generated"] - before
    return count / elapsed


def serve_config(config: dict, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """`llm-api serve` on `config` (written to workdir), once /ready answers 200."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    exe = Path(sys.executable).parent / "llm-api"
    proc = subprocess.Popen([str(exe), "serve", "--config", str(path), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit("llm-api did not start")
        time.sleep(0.2)


def start_server(model: Path, threads: int, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    return serve_config({"model_family": "llama", "setup_params": {"model_path": str(model)},
                         "model_params": {"n_ctx": 1024, "n_threads": threads}}, port, workdir)


def measure(model: Path, threads: int, rounds: int, tokens: int, port: int) -> dict[str, float]:
    from llama_cpp import Llama

    llm = Llama(str(model), n_ctx=1024, n_threads=threads, verbose=False)
    results: dict[str, list[float]] = {"stream": [], "tokens": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(model, threads, port, Path(tmp))
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
        try:
            ours(client, 8)  # warm up both
            baseline_stream(llm, 8)
            for _ in range(rounds):
                results["ours"].append(ours(client, tokens))
                results["stream"].append(baseline_stream(llm, tokens))
                results["tokens"].append(baseline_tokens(llm, tokens))
        finally:
            client.close()
            proc.terminate()
            proc.wait(30)
            llm.close()
    return {k: statistics.median(v) for k, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", default="1,2", help="comma-separated n_threads values")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    model = build(CACHE / "rand-91m-q8_0.gguf")
    rows = [("llm-api /agenerate (HTTP, SSE)", "ours"),
            ("in-process Llama.create_completion(stream=True)", "stream"),
            ("in-process Llama.generate token loop (no text)", "tokens")]
    print(f"\nsingle stream, {args.tokens} tokens, median of {args.rounds} alternating rounds, "
          f"{model.name}, {os.cpu_count()} cores\n")
    print(f"| n_threads | {'system':50} | tokens/s | llm-api ÷ system |")
    print(f"|----------:|{'-' * 52}|---------:|-----------------:|")
    for threads in (int(t) for t in args.threads.split(",")):
        med = measure(model, threads, args.rounds, args.tokens, args.port)
        for label, key in rows:
            print(f"| {threads:9} | {label:50} | {med[key]:8.1f} | "
                  f"{med['ours'] / med[key]:16.3f} |", flush=True)


if __name__ == "__main__":
    main()
