# syntax=docker/dockerfile:1.7
# Two images from one file (tests/chart/test_dockerfile.py keeps them in step with pyproject.toml):
#   docker build --target operator -t ghcr.io/finetune-dev/finetune-operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/finetune-dev/finetune-trainer:0.1.0 .
# Both run as the non-root user 10001 (the chart's podSecurityContext assumes that uid).
# `make images` builds both without a daemon (hack/images/build.sh: buildah, local stand-ins for the
# bases where no registry is reachable, the host's uv cache mounted at /root/.cache/uv).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# The trainer needs only the driver from the host: the torch and bitsandbytes wheels carry their
# own CUDA libraries. The base image sets NVIDIA_VISIBLE_DEVICES/NVIDIA_DRIVER_CAPABILITIES for the
# container toolkit, and NVIDIA_REQUIRE_CUDA: its CUDA version is the one PyPI's torch wheel is built
# for (2.14.1: cu130), so a node whose driver is too old (CUDA 13 needs R580+) refuses the container
# with that reason instead of torch failing inside it.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9
# Same pins as pyproject.toml (checked by the test above).
ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.14.1
ARG VERSION=0.1.0

FROM ${UV_IMAGE} AS uv

# ---- operator: slim Python, Kopf and the Kubernetes client, no torch -----------------------------
FROM ${PYTHON_IMAGE} AS operator-build
COPY --from=uv /uv /usr/local/bin/uv
# uv's cache is a build-time cache mount, never a layer; copy (not hard-link) out of it.
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy
RUN --mount=type=cache,target=/root/.cache/uv uv venv /opt/venv
WORKDIR /src
# The dependencies first, from pyproject.toml alone: a change to the sources reinstalls only the project.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python -r pyproject.toml --extra operator
COPY README.md ./
COPY api ./api
COPY cli ./cli
COPY operator ./operator
COPY trainer ./trainer
RUN --mount=type=cache,target=/root/.cache/uv \
    UV_COMPILE_BYTECODE=0 uv pip install --python /opt/venv/bin/python ".[operator]" \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib/python*/site-packages/finetune_*

FROM ${PYTHON_IMAGE} AS operator
RUN groupadd --system --gid 10001 finetune \
 && useradd --system --uid 10001 --gid finetune --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin finetune
COPY --from=operator-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
ARG VERSION
LABEL org.opencontainers.image.title="finetune-operator" \
      org.opencontainers.image.description="FineTuneJob operator (Kopf)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/finetune-dev/finetune-operator" \
      org.opencontainers.image.version="${VERSION}"
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["finetune", "operator"]

# ---- trainer: CUDA-capable base, the pinned training stack -----------------------------------------
FROM ${CUDA_IMAGE} AS trainer
ARG PYTHON_VERSION
ARG TORCH_VERSION
COPY --from=uv /uv /usr/local/bin/uv
# uv's managed CPython under /opt/python (readable by the non-root user), same minor version as the
# operator image and the development venv; a base that has that Python already (a Debian one) uses it.
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_INSTALL_DIR=/opt/python
RUN --mount=type=cache,target=/root/.cache/uv uv venv --python "${PYTHON_VERSION}" /opt/venv
RUN groupadd --system --gid 10001 finetune \
 && useradd --system --uid 10001 --gid finetune --create-home --home-dir /home/finetune --shell /usr/sbin/nologin finetune \
 && mkdir -p /scratch && chown finetune:finetune /scratch
WORKDIR /src
# The dependencies first, from pyproject.toml alone: a change to the sources reinstalls only the project.
# DeepSpeed's setup imports torch, so torch goes in first and DeepSpeed builds without isolation.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python "torch==${TORCH_VERSION}" \
 && uv pip install --python /opt/venv/bin/python --no-build-isolation-package deepspeed \
      -r pyproject.toml --extra trainer --extra deepspeed
COPY README.md ./
COPY api ./api
COPY cli ./cli
COPY operator ./operator
COPY trainer ./trainer
RUN --mount=type=cache,target=/root/.cache/uv \
    UV_COMPILE_BYTECODE=0 uv pip install --python /opt/venv/bin/python ".[trainer,deepspeed]" \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib/python*/site-packages/finetune_* \
 && rm -rf /src
ARG VERSION
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HOME=/scratch/hf-cache
LABEL org.opencontainers.image.title="finetune-trainer" \
      org.opencontainers.image.description="FineTuneJob trainer (transformers, PEFT, TRL, DeepSpeed)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/finetune-dev/finetune-operator" \
      org.opencontainers.image.version="${VERSION}"
WORKDIR /home/finetune
USER 10001:10001
EXPOSE 9400 29500
ENTRYPOINT ["finetune", "train"]
