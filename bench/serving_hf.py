"""Transformers rows of bench/serving.py: llm-api (huggingface family) with N concurrent
streamed `/v1/completions` over HTTP vs in-process `generate_batch` (transformers' continuous
batching, CPU config: sdpa, no CUDA graphs, no async batching, no switch to flash) vs N
sequential `generate` calls. Same random checkpoint (bench/hf_overhead.py's, which never emits
specials), same torch threads, greedy, unique prompts; alternating rounds.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_overhead import build  # noqa: E402
from overhead import PROMPT as TEXT_PROMPT  # noqa: E402
from serving_client import together, unique_prefix  # noqa: E402
from serving_systems import CACHE, Settings, start_llm_api  # noqa: E402

OURS = "llm-api 8 concurrent (HTTP)"
BATCH = "in-process generate_batch"
SEQUENTIAL = "in-process sequential generate"


def prompts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{unique_prefix(rng)} {TEXT_PROMPT}" for _ in range(n)]


def generate_batch_rate(model: Any, tokenizer: Any, texts: list[str], tokens: int) -> float:
    from transformers.generation import ContinuousBatchingConfig, GenerationConfig

    inputs = [tokenizer(t).input_ids for t in texts]
    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=None)
    batching = ContinuousBatchingConfig(use_cuda_graph=False, use_async_batching=False,
                                        auto_switch_to_flash=False)
    start = time.perf_counter()
    out = model.generate_batch(inputs, generation_config=config,
                               continuous_batching_config=batching, progress_bar=False,
                               warmup=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.generated_tokens) for o in out.values()) / elapsed


def sequential_rate(model: Any, tokenizer: Any, texts: list[str], tokens: int) -> float:
    count = 0
    start = time.perf_counter()
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        count += out.shape[1] - ids.shape[1]
    return count / (time.perf_counter() - start)


def http_rate(settings: Settings, texts: list[str], tokens: int) -> float:
    running = start_llm_api(settings, "huggingface",
                            {"device_map": "cpu", "n_threads": settings.threads,
                             **settings.extra})
    try:
        warm = {"model": "bench", "prompt": "warm up", "max_tokens": 4, "temperature": 0}
        together(running.port, "/v1/completions", [warm])
        bodies = [{"model": "bench", "prompt": t, "max_tokens": tokens, "temperature": 0}
                  for t in texts]
        streams, wall = together(running.port, "/v1/completions", bodies)
    finally:
        running.stop()
    return sum(s.tokens for s in streams) / wall


def run_hf(threads: int, rounds: int, n: int, tokens: int, workdir: Path,
           extra: dict[str, Any]) -> dict[str, list[float]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build(CACHE / "rand-llama-hf")
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    settings = Settings(folder, threads, n, 0, workdir, extra)
    generate_batch_rate(model, tokenizer, prompts(-1, 2), 4)  # warm up
    sequential_rate(model, tokenizer, prompts(-2, 1), 4)
    results: dict[str, list[float]] = {OURS: [], BATCH: [], SEQUENTIAL: []}
    runners = {OURS: lambda t: http_rate(settings, t, tokens),
               BATCH: lambda t: generate_batch_rate(model, tokenizer, t, tokens),
               SEQUENTIAL: lambda t: sequential_rate(model, tokenizer, t, tokens)}
    names = list(runners)
    for r in range(rounds):
        texts = prompts(r, n)
        for name in names[r % 3:] + names[:r % 3]:
            with torch.inference_mode():
                results[name].append(runners[name](texts))
            print(f"  hf {name}: {results[name][-1]:.1f} tok/s", file=sys.stderr, flush=True)
    return results
