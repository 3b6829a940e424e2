"""Build a random-weight Llama GGUF of realistic shape (no torch needed).

Speed does not depend on weight values, so a random model of a real shape measures what a
real one would. The tokenizer (and chat template) is copied from the tiny test fixture; with
`vocab` larger than its ~1k tokens, the list is extended with made-up word pieces (a random
`▁`-led or inner run of 6-12 lowercase letters each, scored below every real piece): llama.cpp's
SPM tokenizer only forms a piece by merging two pieces it already formed, and no made-up piece
is shorter than 6 letters, so prompts tokenize as before (a made-up piece is reachable only if
it happens to join two real ones: rare), while every
token the model generates is a printable piece that detokenizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-llama-q8_0.gguf"


#: The shape of LARGE_VOCAB: Gemma 3 270M's width, depth and 262,144-token vocabulary (the
#: vocabulary the issue measured) with a tied output matrix, as Llama (~260M parameters, 170M
#: of them the embedding): the output projection is ~2/3 of each step's weight reads.
LARGE_VOCAB = {"hidden": 640, "layers": 18, "heads": 10, "kv_heads": 2, "ffn": 2048,
               "vocab": 262_144, "tied": True}


def build(path: Path, *, hidden: int = 768, layers: int = 12, heads: int = 12,
          kv_heads: int = 4, ffn: int = 2560, seed: int = 0,
          never_special: bool = False, vocab: int | None = None, tied: bool = False) -> Path:
    """Write the model to `path` unless it exists; return the path. `never_special` zeroes
    the output rows of BOS/EOS/UNK: their logit is 0 while the largest of the random logits is
    well above, so greedy decoding never ends early (every request runs to max_tokens).
    `vocab`: extend the fixture's token list to this size (see above). `tied`: no output
    matrix, llama.cpp projects with the token embedding (as Gemma and small Qwen models do)."""
    import gguf

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(FIXTURE)
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    scores = list(reader.fields["tokenizer.ggml.scores"].contents())
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    made_up = extra_pieces(set(tokens), (vocab or 0) - len(tokens), seed)
    tokens += made_up
    scores += [min(scores) - 1.0] * len(made_up)
    types += [int(gguf.TokenType.NORMAL)] * len(made_up)
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path) + ".tmp", "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model(reader.fields["tokenizer.ggml.model"].contents())
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for key, add in (("bos_token_id", writer.add_bos_token_id),
                     ("eos_token_id", writer.add_eos_token_id),
                     ("unknown_token_id", writer.add_unk_token_id)):
        if f"tokenizer.ggml.{key}" in reader.fields:
            add(reader.fields[f"tokenizer.ggml.{key}"].contents())
    if "tokenizer.chat_template" in reader.fields:
        writer.add_chat_template(reader.fields["tokenizer.chat_template"].contents())

    rng = np.random.default_rng(seed)
    head_dim = hidden // heads

    specials = [int(reader.fields[f"tokenizer.ggml.{key}"].contents())
                for key in ("bos_token_id", "eos_token_id", "unknown_token_id")
                if never_special and f"tokenizer.ggml.{key}" in reader.fields]

    def matrix(name: str, rows: int, cols: int, zero_rows: list[int] | None = None) -> None:
        data = rng.standard_normal((rows, cols), dtype=np.float32) * 0.05
        data[zero_rows or []] = 0.0
        quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(hidden, dtype=np.float32))

    matrix("token_embd.weight", vocab, hidden, specials if tied else None)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", hidden, hidden)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn)
    norm("output_norm.weight")
    if not tied:
        matrix("output.weight", vocab, hidden, specials)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(path) + ".tmp").rename(path)
    return path


def extra_pieces(taken: set[str], n: int, seed: int) -> list[str]:
    """`n` made-up word pieces, none in `taken`: runs of 6-12 lowercase letters, two in three
    starting a word (`▁`)."""
    import random

    rng = random.Random(seed)
    out: list[str] = []
    seen = set(taken)
    while len(out) < n:
        piece = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(6, 12)))
        piece = f"\u2581{piece}" if rng.random() < 2 / 3 else piece
        if piece not in seen:
            seen.add(piece)
            out.append(piece)
    return out


def parameter_count(hidden: int = 768, layers: int = 12, heads: int = 12, kv_heads: int = 4,
                    ffn: int = 2560, vocab: int = 1024) -> int:
    kv = kv_heads * hidden // heads
    per_layer = 2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * ffn + 2 * hidden
    return layers * per_layer + 2 * vocab * hidden + hidden
