"""Single-stream overhead of the huggingface family: tokens/s through /agenerate ÷ in-process
transformers `generate` with a `TextIteratorStreamer`.

    .venv/bin/python bench/hf_overhead.py [--threads 1,2] [--rounds 3] [--tokens 128]

Same checkpoint (a random-weight Llama of realistic shape, ~30M parameters, float32, built
once into bench/.cache with the tiny fixture's tokenizer), same torch threads, greedy, fixed
max_tokens. Rounds alternate between the systems; medians are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import PROMPT, ours, serve_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-llama-hf"


def build(folder: Path) -> Path:
    """A random Llama (hidden 512, 8 layers) that never emits BOS/EOS/UNK greedily."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1408,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[:3] = 0.0
        model.lm_head.weight[3:] *= 50  # peaky logits: the specials (logit 0) never win
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(FIXTURE / name, folder / name)
    return folder


def baseline(model: Any, tokenizer: Any, tokens: int) -> float:
    from transformers import TextIteratorStreamer

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict[str, int] = {}

    def run() -> None:
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, streamer=streamer)
        result["count"] = out.shape[1] - ids.shape[1]

    start = time.perf_counter()
    worker = threading.Thread(target=run)
    worker.start()
    for _ in streamer:
        pass
    worker.join()
    return result["count"] / (time.perf_counter() - start)


def start_server(model: Path, threads: int, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    return serve_config({
        "model_family": "huggingface", "setup_params": {"model_path": str(model)},
        "model_params": {"device_map": "cpu", "n_threads": threads}}, port, workdir)


def measure(model_dir: Path, threads: int, rounds: int, tokens: int,
            port: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results: dict[str, list[float]] = {"ours": [], "generate": []}
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(model_dir, threads, port, Path(tmp))
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
        try:
            ours(client, 8)  # warm up both
            baseline(model, tokenizer, 8)
            for _ in range(rounds):
                results["ours"].append(ours(client, tokens))
                results["generate"].append(baseline(model, tokenizer, tokens))
        finally:
            client.close()
            proc.terminate()
            proc.wait(30)
    return {k: statistics.median(v) for k, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()

    model_dir = build(CACHE / "rand-llama-hf")
    print(f"\nsingle stream, {args.tokens} tokens, median of {args.rounds} alternating rounds, "
          f"random Llama hidden 512 x 8 layers (float32), {os.cpu_count()} cores\n")
    print(f"| threads | {'system':52} | tokens/s | llm-api ÷ system |")
    print(f"|--------:|{'-' * 54}|---------:|-----------------:|")
    rows = [("llm-api /agenerate (HTTP, SSE), huggingface family", "ours"),
            ("in-process model.generate + TextIteratorStreamer", "generate")]
    for threads in (int(t) for t in args.threads.split(",")):
        med = measure(model_dir, threads, args.rounds, args.tokens, args.port)
        for label, key in rows:
            print(f"| {threads:7} | {label:52} | {med[key]:8.1f} | "
                  f"{med['ours'] / med[key]:16.3f} |", flush=True)


if __name__ == "__main__":
    main()
