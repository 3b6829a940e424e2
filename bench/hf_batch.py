"""Aggregate throughput of the huggingface family's continuous batching, in process:
N concurrent requests through our `HFBatchEngine` vs N sequential transformers `generate`
calls vs transformers' own continuous batching (`generate_batch`).

    .venv/bin/python bench/hf_batch.py [--streams 8] [--tokens 64] [--rounds 3] [--threads 2]

Same checkpoint as bench/hf_overhead.py (a random-weight Llama, ~30M parameters, float32,
built once into bench/.cache), greedy, unique prompts (a random prefix each), fixed token
counts (the model never emits EOS). Rounds alternate between the systems; medians printed.
`measure()` is importable (bench/serving.py uses it for its transformers rows).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hf_overhead import CACHE, build  # noqa: E402

from backends.base import Chunk, GenerationParams, GenerationRequest, ModelSpec  # noqa: E402
from backends.hf import HFBackend, HFParams  # noqa: E402

WORDS = "the of and to in is was for on with as by at from that this it be are or".split()


def prompts(count: int, seed: int = 0) -> list[str]:
    """Unique prompts: a random prefix, then a common sentence."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=8)) + " the quick brown fox jumps over the lazy dog"
            for _ in range(count)]


def load(folder: Path, streams: int, threads: int) -> HFBackend:
    backend = HFBackend.load(ModelSpec(name="bench", path=build(folder), params=HFParams(
        device_map="cpu", torch_dtype="float32", n_threads=threads, parallel=streams)))
    assert isinstance(backend, HFBackend)
    return backend


def engine_rate(backend: HFBackend, texts: list[str], tokens: int) -> float:
    """Completion tokens/s of all `texts` admitted together into our batch engine."""
    engine = backend.batch_engine()
    assert engine is not None, "the model did not get a batch engine"
    params = GenerationParams(temperature=0, max_tokens=tokens)
    start = time.perf_counter()
    for key, text in enumerate(texts):
        engine.admit(key, GenerationRequest(prompt=text, params=params))
    produced = 0
    while engine.active():
        for _, chunk in engine.step():
            if isinstance(chunk, Chunk) and chunk.finish_reason:
                produced += chunk.completion_tokens or 0
    return produced / (time.perf_counter() - start)


def sequential_rate(model: Any, tokenizer: Any, texts: list[str], tokens: int) -> float:
    """Completion tokens/s of transformers `generate`, one prompt after the other."""
    produced = 0
    start = time.perf_counter()
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
        produced += out.shape[1] - ids.shape[1]
    return produced / (time.perf_counter() - start)


def generate_batch_rate(model: Any, tokenizer: Any, texts: list[str], tokens: int) -> float:
    """Completion tokens/s of transformers' continuous batching on CPU (sdpa, no CUDA graphs,
    no async batching, no switch to flash attention)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    inputs = [tokenizer(text).input_ids for text in texts]
    config = GenerationConfig(max_new_tokens=tokens, do_sample=False)  # type: ignore[no-untyped-call]
    batching = ContinuousBatchingConfig(use_cuda_graph=False, use_async_batching=False,
                                        auto_switch_to_flash=False,
                                        max_requests_per_batch=len(texts))
    start = time.perf_counter()
    results = model.generate_batch(inputs, generation_config=config,
                                   continuous_batching_config=batching, warmup=False)
    produced = sum(len(r.generated_tokens) for r in results.values())
    return produced / (time.perf_counter() - start)


def measure(streams: int = 8, tokens: int = 64, rounds: int = 3, threads: int = 2,
            folder: Path = CACHE / "rand-llama-hf") -> dict[str, float]:
    """Median aggregate completion tokens/s per system (keys: engine, sequential,
    generate_batch; the last missing when transformers' continuous batching fails here)."""
    backend = load(folder, streams, threads)
    model, tokenizer = backend._model, backend._tokenizer
    rates: dict[str, list[float]] = {"engine": [], "sequential": [], "generate_batch": []}
    engine_rate(backend, prompts(2, seed=99), 4)  # warm up
    for round_ in range(rounds):
        texts = prompts(streams, seed=round_)
        rates["engine"].append(engine_rate(backend, texts, tokens))
        rates["sequential"].append(sequential_rate(model, tokenizer, texts, tokens))
        try:
            rates["generate_batch"].append(generate_batch_rate(model, tokenizer, texts, tokens))
        except Exception as exc:  # noqa: BLE001 - reported, the other rows still count
            print(f"generate_batch failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    backend.close()
    return {name: statistics.median(values) for name, values in rates.items() if values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = measure(args.streams, args.tokens, args.rounds, args.threads)
    base = result["sequential"]
    print(f"{args.streams} streams x {args.tokens} tokens, {args.threads} threads, "
          f"medians of {args.rounds}")
    print(f"{'system':<40} {'tok/s':>8} {'vs sequential':>14}")
    names = {"engine": "llm-api HFBatchEngine (in process)",
             "sequential": "transformers generate, sequential",
             "generate_batch": "transformers generate_batch"}
    for key, rate in result.items():
        print(f"{names[key]:<40} {rate:8.1f} {rate / base:13.2f}x")


if __name__ == "__main__":
    main()
