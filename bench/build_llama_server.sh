#!/usr/bin/env bash
# Build the C++ llama-server from the llama.cpp sources vendored in the llama-cpp-python sdist
# (the same llama.cpp our wheel runs), with the same cmake flags as our wheel. Output:
# bench/.cache/llama-server (git-ignored). Several minutes on 2 cores; runs at nice 10.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="$HERE/.cache"
BIN="$CACHE/llama-server"
JOBS="${JOBS:-2}"
if [[ -x "$BIN" ]]; then echo "$BIN"; exit 0; fi
mkdir -p "$CACHE/sdist"
PY="${PYTHON:-python3}"
SDIST="$(ls "$CACHE"/sdist/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)"
if [[ -z "$SDIST" ]]; then
  "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$CACHE/sdist" \
    "llama-cpp-python==$VERSION"
  SDIST="$(ls "$CACHE"/sdist/llama_cpp_python-"$VERSION".tar.gz)"
fi
SRC="$CACHE/sdist/llama_cpp_python-$VERSION"
[[ -d "$SRC" ]] || tar -xzf "$SDIST" -C "$CACHE/sdist"
BUILD="$CACHE/llama-server-build"
nice -n 10 cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DBUILD_SHARED_LIBS=OFF >"$CACHE/cmake.log"
nice -n 10 cmake --build "$BUILD" --target llama-server -j "$JOBS" >"$CACHE/build.log"
cp "$BUILD/bin/llama-server" "$BIN"
echo "$BIN"
