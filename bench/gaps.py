"""What closing gaps in the running sequence ids is worth, in process (no HTTP).

    .venv/bin/python bench/gaps.py [--rounds 5] [--threads 2] [--parallel 8]

llama.cpp decodes each run of consecutive sequence ids as its own sub-batch. When requests of
mixed lengths run together, the short ones end first and leave gaps; our `LlamaBatchEngine`
moves the sequences left outside the fullest window of ids into the gaps (one copy of a KV
stream each). This runs the same 8 mixed-length greedy requests (unique prompts, the model
never samples EOS) through one engine with moves on (the default) and off, alternating run by
run, and prints medians: aggregate completion tokens/s, decode steps, moves, ratio.
Same random ~91M-parameter Q8_0 GGUF as bench/serving.py.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serving import TEXT, gguf_model  # noqa: E402
from serving_client import unique_prefix  # noqa: E402

from backends.base import Chunk, GenerationParams, GenerationRequest, ModelSpec  # noqa: E402
from backends.llama import LlamaBackend, LlamaParams  # noqa: E402
from backends.llama_batch import LlamaBatchEngine  # noqa: E402

LENGTHS = (24, 192, 48, 168, 72, 144, 96, 120)  # bench/serving.py's mixed case
NEVER = 1 << 30  # move_steps that disables moves


def one_run(engine: LlamaBatchEngine, rng: random.Random, moves: bool) -> dict[str, float]:
    engine.move_steps, saved = (engine.move_steps if moves else NEVER), engine.move_steps
    before, produced, steps = engine.moves, 0, 0
    start = time.perf_counter()
    try:
        for key, length in enumerate(LENGTHS):
            engine.admit(key, GenerationRequest(
                prompt=f"{unique_prefix(rng)} {TEXT}",
                params=GenerationParams(temperature=0, max_tokens=length)))
        while engine.active():
            steps += 1
            for _, chunk in engine.step():
                if isinstance(chunk, Chunk) and chunk.finish_reason:
                    produced += chunk.completion_tokens or 0
    finally:
        engine.move_steps = saved
    wall = time.perf_counter() - start
    return {"tok/s": produced / wall, "steps": steps, "moves": engine.moves - before}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--n-ctx", type=int, default=1024, help="context per sequence")
    args = parser.parse_args(argv)
    backend = LlamaBackend.load(ModelSpec(name="bench", path=gguf_model(), params=LlamaParams(
        n_ctx=args.n_ctx, n_threads=args.threads, parallel=args.parallel)))
    assert isinstance(backend, LlamaBackend)
    engine = backend.batch_engine()
    assert isinstance(engine, LlamaBatchEngine)
    rng = random.Random(0)
    one_run(engine, rng, True)  # warm up
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for r in range(args.rounds):
        for moves in ((True, False) if r % 2 == 0 else (False, True)):
            runs[moves].append(one_run(engine, rng, moves))
    backend.close()

    def median(moves: bool, key: str) -> float:
        return statistics.median(run[key] for run in runs[moves])

    print(f"{len(LENGTHS)} requests together of {', '.join(map(str, LENGTHS))} tokens, "
          f"{args.threads} threads, parallel {args.parallel}, move_steps "
          f"{engine.move_steps}; medians of {args.rounds} alternating runs\n")
    print("| engine | tok/s | decode steps | moves |\n|---|---|---|---|")
    for moves, name in ((True, "moves on (default)"), (False, "moves off")):
        print(f"| {name} | {median(moves, 'tok/s'):.1f} | {median(moves, 'steps'):.0f} | "
              f"{median(moves, 'moves'):.0f} |")
    ratios = [on["tok/s"] / off["tok/s"] for on, off in zip(runs[True], runs[False],
                                                              strict=True)]
    print(f"\nmoves on ÷ off: {median(True, 'tok/s') / median(False, 'tok/s'):.2f}× "
          f"(paired runs {min(ratios):.2f}–{max(ratios):.2f}×)")


if __name__ == "__main__":
    main()
