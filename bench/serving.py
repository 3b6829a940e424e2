"""Side-by-side serving benchmark: llm-api vs C++ llama-server vs llama-cpp-python's server.

    bench/build_llama_server.sh      # once: C++ llama-server into bench/.cache (minutes)
    bench/setup_bench_venv.sh        # once: llama-cpp-python[server] + matplotlib, bench venv
    .venv/bin/python bench/serving.py [--rounds 3] [--reps 3] [--quick] [--dry-run] [--skip-hf]
        [--model bench|large-vocab]

One run, the same random-weight ~91M-parameter Q8_0 GGUF (bench/randmodel.py, with BOS/EOS
never sampled so every request runs to max_tokens; `--model large-vocab`: ~260M parameters
with a 262,144-token vocabulary, where per-step costs that scale with the vocabulary show), the
same threads and per-sequence context,
greedy, unique prompts (a random prefix each). Each round starts every system, runs each case
`--reps` times with the systems taking turns run by run (the order rotates from run to run and
round to round; llama-cpp-python, several times slower, runs each case once a round) and stops
them all; medians (and min-max spread) over every run of every round. Running case by case and
run by run rather than system by system keeps the shared machine's slow and fast spells (seen
here: ±30 % within minutes) from landing on one system. All speak
OpenAI `/v1/completions` (`/v1/chat/completions` for the chat case) with streaming.
Transformers: llm-api (huggingface family) with 8 concurrent requests over HTTP vs in-process
`generate_batch` vs 8 sequential `generate` calls (bench/serving_hf.py).
Prints markdown tables with ratios (llm-api ÷ each baseline) and the issue's targets, writes
the raw numbers as JSON and a PNG of aggregate tokens/s vs concurrency (bench/.cache/).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from randmodel import LARGE_VOCAB, build  # noqa: E402
from serving_client import Stream, stream, together, unique_prefix  # noqa: E402
from serving_hf import run_hf  # noqa: E402
from serving_report import hf_table, llama_table, paired_table  # noqa: E402
from serving_systems import (  # noqa: E402
    BENCH,
    BENCH_PYTHON,
    CACHE,
    Running,
    Settings,
    llama_knows_parallel,
    start_llama_cpp_python,
    start_llama_server,
    start_llm_api,
)

OURS, CPP, LCP = "llm-api", "llama-server", "llama-cpp-python"
#: llm-api with the model in the API process (placement: inprocess), the engine seam's
#: baseline: `llm-api` itself runs it in a local worker process (the default).
INPROCESS = "llm-api-inprocess"
STARTERS: dict[str, Callable[[Settings], Running]] = {
    OURS: start_llm_api, CPP: start_llama_server, LCP: start_llama_cpp_python,
    INPROCESS: lambda settings: start_llm_api(settings, placement="inprocess")}
TEXT = "the quick brown fox jumps over the lazy dog and then"
Metrics = dict[str, float]


class Plan:
    """Sizes of every case; --quick shrinks them for a smoke run."""

    def __init__(self, quick: bool, only: list[str] | None = None) -> None:
        self.only = only or []  # case names to run (empty: all)
        self.single = (32, 64) if quick else (128, 512)
        self.sweep = (1, 2, 8) if quick else (1, 2, 4, 8, 16)
        self.sweep_tokens = 16 if quick else 96
        self.stagger = (8, 16 if quick else 96, 0.2)  # streams, tokens, gap (s)
        self.chat = (40 if quick else 120, 16 if quick else 64, 8)  # words, turn-1, turn-2 tokens
        # 8 streams together, short and long alternating: the short ones end first and leave
        # gaps between the running sequence ids (llama.cpp splits a batch at each gap)
        self.mixed = (8, 16, 64) if quick else (24, 192, 48, 168, 72, 144, 96, 120)

    def describe(self) -> str:
        streams, tokens, gap = self.stagger
        only = f"only {', '.join(self.only)} of: " if self.only else ""
        return (only + f"single stream x {self.single[0]} and x {self.single[1]} tokens; "
                f"concurrency sweep {', '.join(map(str, self.sweep))} streams x "
                f"{self.sweep_tokens} tokens together; {streams} streams x {tokens} tokens "
                f"arriving {gap} s apart; {len(self.mixed)} streams together of mixed lengths "
                f"({', '.join(map(str, self.mixed))} tokens); "
                f"2-turn chat (turn-1 user message ~{self.chat[0]} words,"
                f" {self.chat[1]} tokens; time to first token of turn 2)")


def completion(rng: random.Random, tokens: int) -> dict[str, Any]:
    return {"model": "bench", "prompt": f"{unique_prefix(rng)} {TEXT}", "max_tokens": tokens,
            "temperature": 0}


def _check(streams: list[Stream], tokens: int | list[int]) -> int:
    total = sum(s.tokens for s in streams)
    wanted = tokens if isinstance(tokens, list) else [tokens] * len(streams)
    off = [(s.tokens, want) for s, want in zip(streams, wanted, strict=True) if s.tokens != want]
    if off:  # a stream cut short, or (llama-cpp-python) chunks that are not one per token
        print(f"  note: {len(off)} stream(s) counted (tokens, asked) {off[:4]}",
              file=sys.stderr)
    return total


def case_single(port: int, rng: random.Random, tokens: int) -> Metrics:
    result = stream(port, "/v1/completions", completion(rng, tokens))
    if result.error:
        raise RuntimeError(result.error)
    count = _check([result], tokens)
    return {f"1x{tokens} tok/s": count / (result.end - result.start),
            f"1x{tokens} TTFT s": result.ttft}


def case_together(port: int, rng: random.Random, n: int, tokens: int | list[int],
                  gap: float = 0.0) -> tuple[float, list[Stream]]:
    lengths = tokens if isinstance(tokens, list) else [tokens] * n
    bodies = [completion(rng, length) for length in lengths]
    streams, wall = together(port, "/v1/completions", bodies, gap)
    return _check(streams, tokens) / wall, streams


def case_chat(port: int, rng: random.Random, words: int, first: int, second: int) -> Metrics:
    """Time to first token of a chat's second turn (the first turn's prompt is long)."""
    user = f"{unique_prefix(rng, words)} {TEXT}"
    messages = [{"role": "user", "content": user}]
    turn1 = stream(port, "/v1/chat/completions", {"model": "bench", "messages": messages,
                                                  "max_tokens": first, "temperature": 0})
    if turn1.error:
        raise RuntimeError(turn1.error)
    messages += [{"role": "assistant", "content": "".join(turn1.text)},
                 {"role": "user", "content": "and then what happened?"}]
    turn2 = stream(port, "/v1/chat/completions", {"model": "bench", "messages": messages,
                                                  "max_tokens": second, "temperature": 0})
    if turn2.error:
        raise RuntimeError(turn2.error)
    return {"chat turn-1 TTFT s": turn1.ttft, "chat turn-2 TTFT s": turn2.ttft}


Case = Callable[[int, random.Random], Metrics]
TARGET_STREAMS = 8  # the case with a throughput target: its phases are reported too


def phases(streams: list[Stream], name: str) -> Metrics:
    """Where a together case's time goes: until each stream's first token (the prompts'
    prefill and admission) and per token after it (the decode steps), medians over streams."""
    origin = min(s.start for s in streams)
    return {f"{name} first token s": statistics.median((s.first or s.end) - origin
                                                        for s in streams),
            f"{name} ms per token after the first": statistics.median(
                1000 * (s.end - (s.first or s.end)) / max(1, s.tokens - 1) for s in streams)}


def cases(plan: Plan) -> list[tuple[str, Case]]:
    """Every case as (name, run(port, rng) -> metrics), in the order they run."""
    out: list[tuple[str, Case]] = []
    for tokens in plan.single:
        def single(port: int, rng: random.Random, tokens: int = tokens) -> Metrics:
            return case_single(port, rng, tokens)
        out.append((f"1x{tokens}", single))
    for n in plan.sweep:
        def sweep(port: int, rng: random.Random, n: int = n) -> Metrics:
            rate, streams = case_together(port, rng, n, plan.sweep_tokens)
            if n != TARGET_STREAMS:
                return {f"sweep {n} tok/s": rate}
            return {f"sweep {n} tok/s": rate, **phases(streams, f"sweep {n}")}
        out.append((f"sweep {n}", sweep))

    def staggered(port: int, rng: random.Random) -> Metrics:
        n, tokens, gap = plan.stagger
        rate, streams = case_together(port, rng, n, tokens, gap)
        return {f"{n}x{tokens} staggered tok/s": rate,
                f"{n}x{tokens} staggered TTFT p50 s": statistics.median(s.ttft for s in streams)}

    out.append(("staggered", staggered))

    def mixed(port: int, rng: random.Random) -> Metrics:
        rate, _ = case_together(port, rng, len(plan.mixed), list(plan.mixed))
        return {f"{len(plan.mixed)} mixed lengths tok/s": rate}

    out.append(("mixed", mixed))
    out.append(("chat", lambda port, rng: case_chat(port, rng, *plan.chat)))
    return out


def one_round(order: list[str], settings: Settings, plan: Plan, seed: int,
              reps: int) -> dict[str, dict[str, list[float]]]:
    """Start every system, then run each case on each system in turn, `reps` times with the
    systems taking turns run by run (so a slow or fast spell of this shared machine falls on
    all of them, not on one), then stop them all. llama-cpp-python runs each case once: it is
    several times slower and far from its target. An idle system uses no CPU while another
    is measured. Returns every run's value of every metric, per system."""
    running: dict[str, Running] = {}
    rngs = {name: random.Random(seed + i) for i, name in enumerate(order)}
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in order}
    try:
        for name in order:
            running[name] = STARTERS[name](settings)
            stream(running[name].port, "/v1/completions",
                   completion(random.Random(-1), 8))  # warm up
        for case, run in cases(plan):
            if plan.only and case not in plan.only:
                continue
            for rep in range(reps):
                for name in order[rep % len(order):] + order[:rep % len(order)]:
                    if rep and name == LCP:
                        continue
                    began = time.perf_counter()
                    for key, value in run(running[name].port, rngs[name]).items():
                        samples[name].setdefault(key, []).append(value)
                    print(f"  {case} #{rep + 1}: {name} {time.perf_counter() - began:.1f} s",
                          file=sys.stderr, flush=True)
    finally:
        for name in running:
            running[name].stop()
    return samples


def run_llama(args: argparse.Namespace, plan: Plan, model: Path, workdir: Path,
              results: dict[str, dict[str, list[float]]], save: Callable[[], None]) -> None:
    extra = {"parallel": args.parallel} if llama_knows_parallel() else {}
    settings = Settings(model, args.threads, args.parallel, args.n_ctx, workdir, extra)
    results.update({name: {} for name in args.systems})
    for r in range(args.rounds):
        order = args.systems[r % len(args.systems):] + args.systems[:r % len(args.systems)]
        print(f"round {r + 1}/{args.rounds}: {', '.join(order)}", file=sys.stderr, flush=True)
        for name, metrics in one_round(order, settings, plan, 1000 * r, args.reps).items():
            for key, values in metrics.items():
                results[name].setdefault(key, []).extend(values)
        save()  # partial results survive an interrupted run


def plot(results_json: Path, png: Path) -> str:
    if not BENCH_PYTHON.is_file():
        return f"no plot: {BENCH_PYTHON} missing (bench/setup_bench_venv.sh)"
    done = subprocess.run([str(BENCH_PYTHON), str(BENCH / "plot_serving.py"),
                           str(results_json), str(png)], capture_output=True, text=True)
    return f"plot: {png}" if done.returncode == 0 else f"plot failed: {done.stderr[-500:]}"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds "
                        "(default 3; 1 with --quick)")
    parser.add_argument("--reps", type=int, default=None, help="runs of each case per system "
                        "per round, systems taking turns (llama-cpp-python: 1); default 3, "
                        "--quick 1")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--model", choices=sorted(MODELS), default="bench", help="the "
                        "random GGUF: bench (~91M parameters, ~1k-token vocabulary) or "
                        "large-vocab (~260M, 262,144 tokens: Gemma 3 270M's shape)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every system")
    parser.add_argument("--parallel", type=int, default=8, help="llama-server slots and "
                        "llm-api model_params.parallel")
    parser.add_argument("--n-ctx", type=int, default=None, help="context per sequence "
                        "(llama-server gets n_ctx x parallel, split into its slots); default "
                        "1024, large-vocab 2048 (its made-up pieces come back from text as ~5 "
                        "tokens each: the chat's turn 2 needs the room)")
    parser.add_argument("--systems", default=f"{OURS},{CPP},{LCP}", help="comma-separated; "
                        "'none': transformers rows only")
    parser.add_argument("--cases", default="", help="comma-separated case names to run "
                        "(default all): 1x128, 1x512, sweep 1, sweep 2, sweep 4, sweep 8, "
                        "sweep 16, staggered, mixed, chat (--quick: 1x32, 1x64, ...)")
    parser.add_argument("--skip-hf", action="store_true", help="no transformers rows")
    parser.add_argument("--hf-tokens", type=int, default=None, help="tokens per request of "
                        "the transformers rows (default 64; 16 with --quick)")
    parser.add_argument("--out", type=Path, default=CACHE, help="where JSON and PNG go")
    parser.add_argument("--report", type=Path, nargs="+", help="only print the tables (and "
                        "plot) of saved results JSON, and llm-api ÷ llama-server pooled over "
                        "the back-to-back pairs of all of them")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.n_ctx = args.n_ctx or (2048 if args.model == "large-vocab" else 1024)
    args.reps = args.reps or (1 if args.quick else 3)
    args.hf_tokens = args.hf_tokens or (16 if args.quick else 64)
    args.systems = [s for s in args.systems.split(",") if s and s != "none"]
    unknown = set(args.systems) - set(STARTERS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; known: {', '.join(STARTERS)}")
    return args


def header(args: argparse.Namespace, plan: Plan) -> str:
    parallel = (f"model_params.parallel={args.parallel}" if llama_knows_parallel() else
                "serial (this llm-api has no model_params.parallel: one request at a time)")
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
            f"model {MODELS[args.model][0]}, threads {args.threads}, per-sequence context "
            f"{args.n_ctx}, medians of "
            f"{args.rounds} alternating round(s) x {args.reps} interleaved run(s) "
            "(llama-cpp-python: 1 run a round) with (min–max); llama-server --parallel "
            f"{args.parallel}; llm-api {parallel}.\nCases: {plan.describe()}.\n"
            "Tokens: usage.completion_tokens of the stream (llama-server, llm-api) or "
            "streamed chunks (llama-cpp-python, one per token); greedy, the model never samples "
            "BOS/EOS, so every request runs to max_tokens.")


def report(data: dict[str, Any], results_json: Path) -> None:
    if data.get("llama"):
        systems = list(data["llama"])
        print("\n## llama.cpp (same GGUF)\n\n" + llama_table(data["llama"], systems))
        for base in (CPP, INPROCESS):
            if base in systems and OURS in systems:
                print(f"\n## paired with {base} (back-to-back runs)\n\n"
                      + paired_table([data["llama"]], base))
    if data.get("hf"):
        print("\n## transformers (8 concurrent requests)\n\n" + hf_table(data["hf"]))
    drawn = plot(results_json, results_json.with_suffix(".png")) if data.get("llama") else \
        "no plot (no llama.cpp rows)"
    print(f"\nraw: {results_json}; {drawn}")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.report:
        runs = [json.loads(path.read_text()) for path in args.report]
        for saved, path in zip(runs, args.report, strict=True):
            report(saved, path)
        pooled = [saved["llama"] for saved in runs if saved.get("llama")]
        if len(pooled) > 1:  # one result: report() printed its pairs already
            print(f"\n## paired, {len(pooled)} result(s) pooled\n\n" + paired_table(pooled))
        return None
    plan = Plan(args.quick, [c.strip() for c in args.cases.split(",") if c.strip()])
    if unknown := set(plan.only) - {name for name, _ in cases(plan)}:
        sys.exit(f"unknown cases {sorted(unknown)}; known: "
                 f"{', '.join(name for name, _ in cases(plan))}")
    print(header(args, plan), flush=True)
    if args.dry_run:
        print(f"systems: {', '.join(args.systems)}; transformers rows: {not args.skip_hf}")
        return
    model = gguf_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    results_json = args.out / f"serving-{time.strftime('%Y%m%d-%H%M%S')}.json"
    data: dict[str, Any] = {"title": f"{model.name}, {args.threads} threads, "
                            f"{args.rounds} round(s)", "header": header(args, plan)}

    def save() -> None:
        results_json.write_text(json.dumps(data, indent=1, default=str))

    with tempfile.TemporaryDirectory() as tmp:
        if args.systems:
            data["llama"] = {}
            run_llama(args, plan, model, Path(tmp), data["llama"], save)
        if not args.skip_hf:
            extra = {"parallel": args.parallel} if hf_knows_parallel() else {}
            data["hf"] = run_hf(args.threads, args.rounds, 8, args.hf_tokens, Path(tmp), extra)
    save()
    report(data, results_json)


#: --model: file name in bench/.cache and the shape given to randmodel.build
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "bench": ("rand-91m-q8_0-noeos.gguf", {}),
    "large-vocab": ("rand-262k-vocab-q8_0-noeos.gguf", LARGE_VOCAB)}


def gguf_model(kind: str = "bench") -> Path:
    """The random GGUF (built once; with the bench venv's gguf if this venv has none)."""
    name, shape = MODELS[kind]
    path = CACHE / name
    if path.is_file():
        return path
    try:
        import gguf  # noqa: F401
    except ImportError:
        code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from randmodel import "
                "build; from pathlib import Path; build(Path(sys.argv[2]), never_special=True,"
                " **json.loads(sys.argv[3]))")
        subprocess.run([str(BENCH_PYTHON), "-c", code, str(BENCH), str(path),
                        json.dumps(shape)], check=True)
        return path
    return build(path, never_special=True, **shape)


def hf_knows_parallel() -> bool:
    from backends.hf import HFParams

    return "parallel" in HFParams.model_fields


if __name__ == "__main__":
    main()
