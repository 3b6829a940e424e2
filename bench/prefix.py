"""Shared prompt prefixes: llm-api vs C++ llama-server on the same GGUF, threads, cells and slots.

    bench/build_llama_server.sh      # once: C++ llama-server into bench/.cache (minutes)
    .venv/bin/python bench/prefix.py [--reps 3] [--quick] [--json PATH] [--systems ...]

Both systems serve the bench GGUF of bench/serving.py (random ~91M-parameter Q8_0, BOS/EOS
never sampled: every request runs to max_tokens; `--model PATH` for another) with the same
threads, `--parallel` slots (llama-server `-np`, llm-api `model_params.parallel`) and
`--n-ctx` cells per sequence (llama-server gets n_ctx x parallel). Every request streams,
greedy, `--tokens` new tokens. The context is realistic English prose: passages of the Python
language reference (the standard library's `pydoc_data`), as a RAG service puts retrieved
documents in front of a question, cut to `--prefix-tokens` tokens of the model's own tokenizer.
Every repetition draws new passages behind a new first line (the same for every system), so
nothing cached by an earlier run can be reused.

Cases (each run by both systems in turn, the order alternating run by run):
  shared  `--streams` concurrent /v1/completions: one context + a distinct short question each;
          time to first token (median, last) and wall time. Targets: median TTFT <= 0.25x
          llama-server's, wall <= 0.5x.
  chat    `--streams` users of one assistant over /v1/chat/completions: the context as the
          system message, a distinct question (turn 1); as soon as a user's answer is complete,
          turn 2 (turn 1 + the answer + a follow-up). TTFT of both turns and wall time.
  unique  `--streams` concurrent /v1/completions with a context each (no two share more than a
          few leading tokens): prompt tokens per second of wall time must not regress
          (>= 0.98x llama-server).
Ratios are llm-api / llama-server: the median over back-to-back pairs (same repetition, run one
after the other), with the lowest and highest pair. Also the prompt tokens the servers say they
took from a cache: `usage.prompt_tokens_details.cached_tokens` (both send it when they know it)
or llama-server's `timings.cache_n`, and the tokens llama-server computed (`timings.prompt_n`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import CPP, OURS, STARTERS, gguf_model  # noqa: E402
from serving_client import Stream, stream, together  # noqa: E402
from serving_report import cell  # noqa: E402
from serving_systems import CACHE, Running, Settings, llama_knows_parallel  # noqa: E402

Metrics = dict[str, float]
Samples = dict[str, dict[str, list[float]]]  # system -> metric -> one value per run
SYSTEMS = (OURS, CPP)
FOLLOW_UP = "Thank you. Can you give me a short example of that?"
QUESTIONS = (
    "What does document {k} say about {topic}? Answer in two sentences.",
    "Summarise the main rule that document {k} gives about {topic}.",
    "Which mistake about {topic} does document {k} warn against?",
    "According to document {k}, when would I use {topic}?",
    "Give one example of {topic} that fits what document {k} describes.",
    "How does {topic} in document {k} differ from the other documents?",
    "Explain {topic} from document {k} to a beginner in one paragraph.",
    "List two facts about {topic} that document {k} states.",
)
#: metric -> (bound, higher is better) of llm-api / llama-server
TARGETS = {"shared TTFT p50 s": (0.25, False), "shared wall s": (0.5, False),
           "unique prompt tok/s": (0.98, True)}


class Tokenizer:
    """The GGUF's own tokenizer (llama.cpp, vocabulary only): prompts are sized in its tokens."""

    def __init__(self, model: Path) -> None:
        import llama_cpp

        self._llama = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)

    def count(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode(), add_bos=True, special=False))


def passages() -> list[tuple[str, list[str]]]:
    """(title, prose paragraphs) of each topic of the Python language reference that ships
    with the standard library; code, grammar and tables (indented or symbol-heavy) left out."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        text = topics[key]
        title = text.splitlines()[0].strip()
        paragraphs = []
        for block in re.split(r"\n\s*\n", text):
            if not block.strip() or block.startswith(" "):
                continue
            words = " ".join(block.split())
            plain = sum(c.isalpha() or c in " ,.;:'()" for c in words)
            if len(words) >= 160 and plain >= 0.9 * len(words):
                paragraphs.append(words)
        if paragraphs and title:
            out.append((title, paragraphs))
    return out


@dataclass
class Context:
    text: str
    titles: list[str]  # of its documents, in order (the questions name them)


def make_context(rng: random.Random, tokenizer: Tokenizer, tokens: int,
                 library: list[tuple[str, list[str]]]) -> Context:
    """Documents drawn in a random order behind a first line of its own, cut at `tokens`
    tokens (a last paragraph is cut by words)."""
    parts = [f"Reference notes {rng.getrandbits(48):012x}. Answer the user's question from "
             "these documents only, and say which document you used."]
    titles: list[str] = []
    for title, paragraphs in rng.sample(library, len(library)):
        titles.append(title)
        parts.append(f"Document {len(titles)}: {title}")
        for paragraph in paragraphs[:3]:
            candidate = "\n\n".join([*parts, paragraph])
            if tokenizer.count(candidate) < tokens:
                parts.append(paragraph)
                continue
            words = paragraph.split()
            low, high = 0, len(words)  # the most words of it that stay under `tokens`
            while low < high:
                mid = (low + high + 1) // 2
                if tokenizer.count("\n\n".join([*parts, " ".join(words[:mid])])) <= tokens:
                    low = mid
                else:
                    high = mid - 1
            parts.append(" ".join(words[:low]))
            return Context("\n\n".join(parts), titles)
    raise ValueError(f"the library holds fewer than {tokens} tokens")


def question(context: Context, i: int) -> str:
    k = 1 + i % len(context.titles)
    return QUESTIONS[i % len(QUESTIONS)].format(k=k, topic=context.titles[k - 1].lower())


def completion_body(context: Context, i: int, tokens: int) -> dict[str, Any]:
    return {"model": "bench", "prompt": f"{context.text}\n\nQuestion: {question(context, i)}\n"
            "Answer:", "max_tokens": tokens, "temperature": 0}


def chat_body(messages: list[dict[str, str]], tokens: int) -> dict[str, Any]:
    return {"model": "bench", "messages": messages, "max_tokens": tokens, "temperature": 0}


def _ok(streams: list[Stream]) -> list[Stream]:
    errors = [s.error for s in streams if s.error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(streams)} streams failed: {errors[0]}")
    return streams


def cache_metrics(streams: list[Stream], name: str) -> Metrics:
    """Per request: prompt tokens, prompt tokens served from a cache (when the server says)
    and prompt tokens computed (llama-server's timings)."""
    out: Metrics = {}
    prompts = [s.prompt_tokens for s in streams if s.prompt_tokens is not None]
    if prompts:
        out[f"{name} prompt tokens"] = statistics.mean(prompts)
    cached = [s.cached_tokens if s.cached_tokens is not None else s.timings.get("cache_n")
              for s in streams]
    if all(c is not None for c in cached):
        out[f"{name} cached prompt tokens"] = statistics.mean(float(c or 0) for c in cached)
    computed = [s.timings.get("prompt_n") for s in streams]
    if all(c is not None for c in computed):
        out[f"{name} computed prompt tokens"] = statistics.mean(float(c or 0) for c in computed)
    return out


def times(streams: list[Stream], wall: float, name: str) -> Metrics:
    ttfts = [s.ttft for s in streams]
    return {f"{name} TTFT p50 s": statistics.median(ttfts), f"{name} TTFT max s": max(ttfts),
            f"{name} wall s": wall}


def case_shared(port: int, contexts: list[Context], n: int, tokens: int) -> Metrics:
    bodies = [completion_body(contexts[0], i, tokens) for i in range(n)]
    streams, wall = together(port, "/v1/completions", bodies)
    return {**times(_ok(streams), wall, "shared"), **cache_metrics(streams, "shared")}


def case_unique(port: int, contexts: list[Context], n: int, tokens: int) -> Metrics:
    bodies = [completion_body(contexts[i], i, tokens) for i in range(n)]
    streams, wall = together(port, "/v1/completions", bodies)
    prompt = sum(s.prompt_tokens or 0 for s in _ok(streams))
    return {**times(streams, wall, "unique"), "unique prompt tok/s": prompt / wall,
            **cache_metrics(streams, "unique")}


def case_chat(port: int, contexts: list[Context], n: int, tokens: int) -> Metrics:
    """Every user: turn 1, then (once its answer is complete) turn 2 with the history."""
    turns: list[list[Stream]] = [[Stream(), Stream()] for _ in range(n)]
    origin = time.perf_counter()

    def user(i: int) -> None:
        messages = [{"role": "system", "content": contexts[0].text},
                    {"role": "user", "content": question(contexts[0], i)}]
        first = turns[i][0] = stream(port, "/v1/chat/completions", chat_body(messages, tokens))
        if first.error:
            return
        messages += [{"role": "assistant", "content": "".join(first.text)},
                     {"role": "user", "content": FOLLOW_UP}]
        turns[i][1] = stream(port, "/v1/chat/completions", chat_body(messages, tokens))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first, second = [t[0] for t in turns], [t[1] for t in turns]
    _ok(first + second)
    wall = max(s.end for s in second) - origin
    return {"chat turn-1 TTFT p50 s": statistics.median(s.ttft for s in first),
            "chat turn-2 TTFT p50 s": statistics.median(s.ttft for s in second),
            "chat turn-2 TTFT max s": max(s.ttft for s in second), "chat wall s": wall,
            **cache_metrics(first, "chat turn-1"), **cache_metrics(second, "chat turn-2")}


Case = Callable[[int, list[Context], int, int], Metrics]
CASES: dict[str, Case] = {"shared": case_shared, "chat": case_chat, "unique": case_unique}


def run(args: argparse.Namespace, model: Path, workdir: Path, samples: Samples,
        save: Callable[[], None]) -> None:
    """Start the systems, then every case `--reps` times, the systems taking turns run by run
    (the first rotating), each repetition with contexts of its own; stop the systems."""
    tokenizer, library = Tokenizer(model), passages()
    extra = {"parallel": args.parallel} if llama_knows_parallel() else {}
    settings = Settings(model, args.threads, args.parallel, args.n_ctx, workdir, extra)
    running: dict[str, Running] = {}
    rng = random.Random(args.seed)
    try:
        for name in args.systems:
            running[name] = STARTERS[name](settings)
            warm = stream(running[name].port, "/v1/completions",
                          {"model": "bench", "prompt": "warm up", "max_tokens": 4})
            if warm.error:
                raise RuntimeError(f"{name}: {warm.error}")
        for case in args.cases:
            for rep in range(args.reps):
                shift = rep % len(args.systems)
                # the same prompts for every system (each server sees them once: none of
                # them was cached by an earlier run)
                contexts = [make_context(rng, tokenizer, args.prefix_tokens, library)
                            for _ in range(args.streams if case == "unique" else 1)]
                for name in args.systems[shift:] + args.systems[:shift]:
                    began = time.perf_counter()
                    metrics = CASES[case](running[name].port, contexts, args.streams,
                                          args.tokens)
                    for key, value in metrics.items():
                        samples[name].setdefault(key, []).append(value)
                    print(f"  {case} #{rep + 1}: {name} {time.perf_counter() - began:.1f} s",
                          file=sys.stderr, flush=True)
                save()
    finally:
        for name in running:
            running[name].stop()


def pairs(samples: Samples, metric: str) -> list[float]:
    ours, base = samples.get(OURS, {}).get(metric, []), samples.get(CPP, {}).get(metric, [])
    return [a / b for a, b in zip(ours, base, strict=False) if b]


def table(samples: Samples, systems: list[str]) -> str:
    metrics = list(dict.fromkeys(k for s in systems for k in samples.get(s, {})))
    both = OURS in systems and CPP in systems
    head = ["metric", *systems, *([f"{OURS} ÷ {CPP} (pairs)", "lowest–highest", "target"]
                                  if both else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for metric in metrics:
        row = [metric, *(cell(samples.get(s, {}).get(metric)) for s in systems)]
        ratios = pairs(samples, metric) if both else []
        if both and ratios:
            middle = statistics.median(ratios)
            goal = ""
            if metric in TARGETS:
                bound, higher = TARGETS[metric]
                ok = middle >= bound if higher else middle <= bound
                goal = f"{'≥' if higher else '≤'} {bound}× {'✓' if ok else '✗'}"
            row += [f"{middle:.3f}×", f"{min(ratios):.2f}–{max(ratios):.2f}×", goal]
        elif both:
            row += ["–", "–", ""]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=None, help="runs of each case per system "
                        "(default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--systems", default=f"{OURS},{CPP}", help="comma-separated, of "
                        f"{OURS}, {CPP}")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, of "
                        f"{', '.join(CASES)}")
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: the bench "
                        "model of bench/serving.py, built on first use)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8, help="slots of both systems")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context per sequence "
                        "(llama-server gets n_ctx x parallel)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent requests (users)")
    parser.add_argument("--prefix-tokens", type=int, default=None, help="tokens of each "
                        "context (default 1500; 300 with --quick)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the samples here "
                        "(default bench/.cache/prefix-<time>.json)")
    args = parser.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.prefix_tokens = args.prefix_tokens or (300 if args.quick else 1500)
    args.systems = [s for s in args.systems.split(",") if s]
    args.cases = [c for c in args.cases.split(",") if c]
    if unknown := set(args.systems) - set(SYSTEMS):
        parser.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    if unknown := set(args.cases) - set(CASES):
        parser.error(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    return args


def header(args: argparse.Namespace, model: Path) -> str:
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
            f"{model.name}, threads {args.threads}, parallel {args.parallel}, per-sequence "
            f"context {args.n_ctx}; {args.streams} streams, contexts of {args.prefix_tokens} "
            f"tokens, {args.tokens} new tokens each, greedy; medians of {args.reps} "
            f"interleaved run(s) with (min–max); cases: {', '.join(args.cases)}.")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    model = args.model or (CACHE / "rand-91m-q8_0-noeos.gguf")
    print(header(args, model), flush=True)
    if args.dry_run:
        print(f"systems: {', '.join(args.systems)}")
        return
    model = args.model.resolve() if args.model else gguf_model()
    out = args.json or CACHE / f"prefix-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    samples: Samples = {name: {} for name in args.systems}
    data = {"header": header(args, model), "samples": samples}

    def save() -> None:
        out.write_text(json.dumps(data, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        run(args, model, Path(tmp), samples, save)
    save()
    print("\n" + table(samples, args.systems) + f"\n\nraw: {out}")


if __name__ == "__main__":
    main()
