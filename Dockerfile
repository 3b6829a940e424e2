# llm-api, CPU image: llama.cpp backend only (no torch).
#   docker build -t llm-api .
#   docker run -v $PWD/models:/models -v $PWD/config.yaml:/llm-api/config.yaml:ro -p 8000:8000 llm-api
# BLAS variants: --build-arg BLAS=openblas (default: none, llama.cpp's own CPU kernels).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: compile llama-cpp-python once, with portable flags, into a wheel ----
FROM ${PYTHON_IMAGE} AS builder
ARG BLAS=none
ARG LLAMA_CPP_VERSION=0.3.36
# hadolint ignore=DL3008
RUN blas_dev="" \
 && if [ "$BLAS" = openblas ]; then blas_dev=libopenblas-dev; fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git pkg-config $blas_dev \
 && rm -rf /var/lib/apt/lists/*
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" \
 && if [ "$BLAS" = openblas ]; then \
      CMAKE_ARGS="$CMAKE_ARGS -DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS"; fi \
 && CMAKE_ARGS="$CMAKE_ARGS" pip wheel --no-cache-dir --no-deps --wheel-dir /wheels \
      "llama-cpp-python==${LLAMA_CPP_VERSION}"

# ---- runtime ----
FROM ${PYTHON_IMAGE}
ARG BLAS=none
# hadolint ignore=DL3008
RUN blas_lib="" \
 && if [ "$BLAS" = openblas ]; then blas_lib=libopenblas0; fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 $blas_lib \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home --uid 1000 llm-api \
 && mkdir -p /models /llm-api && chown llm-api /models /llm-api
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    LLM_API_MODELS_DIR=/models \
    LLM_API_DATA_DIR=/models/.llm-api \
    LLM_API_SERVER__HOST=0.0.0.0 \
    LLM_API_SERVER__PORT=8000 \
    HF_HOME=/models/.hf-home
COPY --from=builder /wheels /wheels
COPY pyproject.toml README.md /src/
COPY app /src/app
COPY backends /src/backends
COPY scripts /src/scripts
COPY docker /src/docker
RUN /src/docker/install-app /opt/venv llama,postgres,redis --find-links /wheels \
 && rm -rf /wheels /src
COPY --chown=llm-api config.yaml /llm-api/config.yaml
USER 1000
WORKDIR /llm-api
VOLUME /models
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LLM_API_SERVER__PORT', '8000') + '/health', timeout=4)"]
ENTRYPOINT ["llm-api"]
CMD ["serve"]
