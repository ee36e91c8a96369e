# syntax=docker/dockerfile:1
#
# mae-serve container image: one server process per container, configured only through MAE_* env variables.
#
#   GPU (default):  docker build -t mae-serve:0.1.0 .
#   CPU only:       docker build -t mae-serve:0.1.0-cpu --build-arg BASE=python:3.11-slim-bookworm .
#
# BASE: the official PyTorch runtime image (CUDA 12.6 + cuDNN 9, Python and a CUDA build of torch inside).
# Its torch version is the one the Makefile pins for CI (TORCH ?= torch==2.13.0): change the two together.
# CUDA 12.6 runs on NVIDIA drivers >= 525 (CUDA minor-version compatibility); for Blackwell GPUs (sm_100/120)
# use a cuda12.8 or cuda13.x tag of the same torch version (cuda13.x needs driver >= 580).
#
# Digest: this file was written offline, where the digest of the tag could not be looked up, so the tag is not
# pinned by digest yet. To pin it, run
#   docker buildx imagetools inspect pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime --format '{{json .Manifest.Digest}}'
# and set BASE below (or pass --build-arg BASE=...) to
#   pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime@sha256:<that digest>
# (Public third-party repositories quote sha256:6acf597eeb8e376a96580dde4952f37cc017fef732bb40bfc73f28f25e3f64b4
# for this tag. UNVERIFIED here: check it with the command above before using it.)
ARG BASE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

# ---------------------------------------------------------------------------------------------------------------
# builder: the project's wheel (pure Python, with the bundled demo weights as package data).
# ---------------------------------------------------------------------------------------------------------------
FROM ${BASE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# Exactly what pyproject.toml packages: its metadata (readme = README.md) and the packages app/, client/, photoset/, model/, weights/.
COPY pyproject.toml README.md ./
COPY app/ app/
COPY client/ client/
COPY photoset/ photoset/
COPY model/ model/
COPY weights/ weights/
# --no-deps: only the project's own wheel here; its dependencies are resolved in the runtime stage, against the
# torch that the base image already has. The build fails if the demo weights did not make it into the wheel.
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && python -c "import glob, sys, zipfile; names = zipfile.ZipFile(glob.glob('/dist/mae_serve-*.whl')[0]).namelist(); sys.exit(0 if 'weights/mae_demo.safetensors' in names else 'weights/mae_demo.safetensors is not in the wheel')"

# ---------------------------------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------------------------------
FROM ${BASE} AS runtime
# Used only when BASE has no torch (the CPU variant): the CPU build from the PyTorch CPU index.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

LABEL org.opencontainers.image.title="mae-serve" \
      org.opencontainers.image.description="Serve Masked Autoencoders over HTTP: reconstructions and embeddings." \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# 1. torch: the base image's CUDA build, or (CPU variant) the CPU wheel.
# 2. The project's wheel from the builder stage, with the dependencies pyproject.toml declares, under a constraint
#    that pins torch to the version already installed, so no dependency can swap the CUDA build for another one.
# 3. Checks: the bundled weights are importable package data and the app imports.
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    (python -c "import torch" 2>/dev/null \
     || python -m pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}") \
 && python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
 && python -m pip install --constraint /tmp/torch-constraint.txt /dist/mae_serve-*.whl \
 && rm -f /tmp/torch-constraint.txt \
 && python -c "import importlib.resources as r, sys; sys.exit(0 if (r.files('weights') / 'mae_demo.safetensors').is_file() else 'bundled weights missing')" \
 && python -c "import app.http.main"

# Non-root, numeric (Kubernetes runAsNonRoot can verify a numeric USER). No home directory: the root filesystem is
# meant to be read-only, so everything that caches (torch, triton, matplotlib) writes under /tmp (a tmpfs/emptyDir).
RUN groupadd --system --gid 10001 mae \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mae

ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MAE_HOST=0.0.0.0 \
    MAE_PORT=8000 \
    MAE_SHUTDOWN_TIMEOUT_S=20

WORKDIR /tmp
USER 10001:10001
EXPOSE 8000

# Ready = weights loaded and warmed up; the start period covers loading large official weights. No curl in the
# image: the probe is Python's urllib (an HTTP error such as 503 raises, so the exit status is non-zero).
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('MAE_PORT', '8000'), timeout=4)"]

# SIGTERM: /readyz turns 503, in-flight requests finish (up to MAE_SHUTDOWN_TIMEOUT_S), then exit 0. Give the
# container a stop timeout above that (docker stop -t 30, compose stop_grace_period, k8s grace period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["mae-serve"]
