# syntax=docker/dockerfile:1
#
# Two images from one wheel of this repository:
#
#   docker build --target operator -t ghcr.io/kubetune/kubetune-operator:0.1.0 .   slim: the operator extra, no torch
#   docker build --target job -t ghcr.io/kubetune/kubetune-job:0.1.0 .             torch with CUDA and the job extra
#
# Both run as UID/GID 1000, numeric so that the kubelet can verify runAsNonRoot, and work on a
# read-only root filesystem: what they write goes to /tmp (and /cache for the job), which the pods
# mount as emptyDirs. tests/unit/test_images.py checks this file against the chart and the operator.

# One Python for every stage, pinned to a patch release; a bump is a deliberate edit here.
ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm

# --- builder: the wheel, built once for both images ---------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY api/ api/
COPY job/ job/
COPY operator/ operator/
# The images ship the job and the operator, not the command line: cli/ stays out of the context
# (.dockerignore), so the package finder finds no kubetune_cli, and the `kubetune` script, which
# would point at it, comes out of the copy of pyproject.toml the wheel is built from. So does the
# readme: the wheel needs no long description, and a README edit then rebuilds no image.
RUN sed -i -e '/^\[project.scripts\]/,/^$/d' -e '/^readme = /d' pyproject.toml \
 && pip wheel --no-deps --wheel-dir /wheels .

# --- runtime: what both images share -------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="kubetune" \
      org.opencontainers.image.description="Kubernetes-native fine-tuning of Hugging Face models" \
      org.opencontainers.image.licenses="Apache-2.0"
# pip compiles the installed modules when it installs them, so nothing needs to write bytecode later.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp/home \
    TMPDIR=/tmp
# A passwd entry for UID 1000: getpass.getuser(), which torch's compile caches call, looks the user up.
RUN groupadd --gid 1000 kubetune \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp/home --no-create-home --shell /usr/sbin/nologin kubetune \
 && install -d -o 1000 -g 1000 /tmp/home

# --- operator: kopf and the Kubernetes client, nothing of the job's stack ----------------------
FROM runtime AS operator
# Then what the operator never runs: the kubernetes package's asyncio copy of its client (kubernetes.aio,
# about 68 MB of the package's 126 MB; the operator uses the synchronous client and kopf), and pip,
# setuptools and wheel, which only installing needs.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/kubetune-*.whl)[operator]" \
 && rm -rf "$(python -c 'import kubernetes, os; print(os.path.dirname(kubernetes.__file__))')/aio" \
 && pip uninstall -y -q pip setuptools wheel
USER 1000:1000
ENTRYPOINT ["python", "-m", "kubetune_operator"]

# --- job: torch with CUDA, transformers, datasets, evaluate and the shipped metric modules ------
FROM runtime AS job
# torch from PyPI: its linux x86_64 wheel carries the CUDA runtime, cuDNN and NCCL as nvidia-* wheels,
# versioned together with torch, so the image needs only the node's driver (mounted by the NVIDIA
# container toolkit). A CUDA base image would add a second, possibly mismatched, copy of those
# libraries and its own Python. The pin is the version the project is tested with; the nodes' driver
# must support the CUDA release that wheel was built for (torch.version.cuda).
ARG TORCH_VERSION=2.15.0
# A C compiler for Triton, which builds a small launcher module the first time torch.compile runs
# (spec.hyperparameters.compile); the official Python image already carries Python's headers.
# Not pinned: Debian moves these versions with security updates; the base image's tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# Triton's AMD backend (ROCm code generation, about 100 MB) never runs on the NVIDIA GPUs this image targets.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install "torch==${TORCH_VERSION}" "$(ls /wheels/kubetune-*.whl)[job]" \
 && rm -rf "$(python -c 'import triton, os; print(os.path.dirname(triton.__file__))')/backends/amd"
# The Hub cache lives on the pod's /cache emptyDir. HF_HUB_OFFLINE stays unset: Hub ids must resolve.
ENV HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache
RUN install -d -o 1000 -g 1000 /cache
USER 1000:1000
ENTRYPOINT ["python", "-m", "kubetune_job"]
