# syntax=docker/dockerfile:1
# One image for the operator and the trainer (both console scripts from pyproject.toml).
#   docker build -t ghcr.io/ratatouille-dev/ratatouille:0.1.0 --build-arg VERSION=0.1.0 .
# The operator Deployment uses the default CMD; child Jobs set their own command
# (`ratatouille-trainer <stage> --job-json ...`), so ENTRYPOINT stays unset.
#
# Base images are pinned by exact tag. A digest (@sha256:...) cannot be looked up on the
# machines this file was written on (no registry access); pin one in CI with
# `docker buildx imagetools inspect python:3.11.9-slim-bookworm` and append it to both FROM lines.
ARG PYTHON_IMAGE=python:3.11.9-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Compilers only here, for any dependency that ships no wheel for this platform.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/ratatouille
ENV PATH=/opt/ratatouille/bin:$PATH
# torch first, in its own layer: the PyPI default wheel of torch 2.14.1 is the CUDA build
# (CUDA runtime libraries come as nvidia-* wheels), so GPU nodes need nothing else in the image.
RUN pip install --upgrade pip setuptools wheel \
 && pip install torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY pyproject.toml ./
COPY operator ./operator
COPY trainer ./trainer
RUN pip install ".[trainer,operator]" \
 && ratatouille --help >/dev/null \
 && ratatouille-trainer --help >/dev/null

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG SOURCE=https://github.com/ratatouille-dev/ratatouille
LABEL org.opencontainers.image.title="ratatouille" \
      org.opencontainers.image.description="Model Ratatouille operator and trainer" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/ratatouille/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache
# Only the virtual environment crosses over: no compilers, no sources, no pip cache.
COPY --from=builder /opt/ratatouille /opt/ratatouille
RUN groupadd --gid 10001 ratatouille \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin ratatouille
WORKDIR /tmp
# Numeric, so `runAsNonRoot: true` can verify it without an explicit runAsUser.
USER 10001:10001
EXPOSE 8080 9090 9400
CMD ["ratatouille", "operator"]
