# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target operator -t ghcr.io/ratatouille-dev/ratatouille-operator:0.1.0 .
#       the Kubernetes operator alone: no torch (the chart's image.repository)
#   docker build --target trainer -t ghcr.io/ratatouille-dev/ratatouille:0.1.0 .
#       every child Job (torch with CUDA); it runs the operator too (the chart's trainer.image)
# The operator Deployment uses the default CMD; child Jobs set their own command
# (`ratatouille-trainer <stage> --job-json ...`), so ENTRYPOINT stays unset.
#
# BASE is any Debian bookworm image with python3 (3.11) and its venv module. The default is the
# public Python image, pinned by exact tag (pin a digest in CI with
# `docker buildx imagetools inspect python:3.11.9-slim-bookworm`). scripts/images/build.sh builds
# with a base made from Debian's packages instead (debootstrap + podman import), where no
# registry can be reached.
ARG BASE=python:3.11.9-slim-bookworm

# -- dependencies, from pyproject.toml alone: a code change never reinstalls (or re-ships) them --
FROM ${BASE} AS deps-operator
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/ratatouille
ENV PATH=/opt/ratatouille/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
# Empty placeholder packages let pip resolve and install the dependencies of the extras; the
# project itself is installed later into /opt/ratatouille-app.
RUN mkdir -p operator/ratatouille_operator trainer/ratatouille_trainer trainer/ratatouille_contract \
 && touch operator/ratatouille_operator/__init__.py trainer/ratatouille_trainer/__init__.py \
          trainer/ratatouille_contract/__init__.py \
 && pip install ".[operator]" \
 && pip uninstall -y ratatouille \
 && rm -rf operator trainer build *.egg-info

FROM deps-operator AS deps-trainer
# torch in its own layer: the PyPI default wheel of torch 2.14.1 is the CUDA build (CUDA runtime
# libraries come as nvidia-* wheels), so GPU nodes need nothing else in the image.
RUN pip install torch==2.14.1 torchvision==0.29.1
RUN mkdir -p operator/ratatouille_operator trainer/ratatouille_trainer trainer/ratatouille_contract \
 && touch operator/ratatouille_operator/__init__.py trainer/ratatouille_trainer/__init__.py \
          trainer/ratatouille_contract/__init__.py \
 && pip install ".[trainer,operator]" \
 && pip uninstall -y ratatouille \
 && rm -rf operator trainer build *.egg-info

# -- the project's code, a small layer of its own -------------------------------------------------
# (Built on the operator's dependencies, so the operator image needs no torch even to build.)
FROM deps-operator AS app
COPY operator ./operator
COPY trainer ./trainer
RUN pip install --no-deps --target /opt/ratatouille-app . \
 && PYTHONPATH=/opt/ratatouille-app /opt/ratatouille-app/bin/ratatouille --help >/dev/null

# The environments that ship: pip and setuptools were only needed to build them.
FROM deps-operator AS venv-operator
RUN python3 -m pip uninstall -y pip setuptools wheel
FROM deps-trainer AS venv-trainer
RUN python3 -m pip uninstall -y pip setuptools wheel

FROM ${BASE} AS runtime
ARG VERSION=0.1.0
ARG SOURCE=https://github.com/ratatouille-dev/ratatouille
LABEL org.opencontainers.image.title="ratatouille" \
      org.opencontainers.image.description="Model Ratatouille operator and trainer" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/ratatouille-app/bin:/opt/ratatouille/bin:$PATH \
    PYTHONPATH=/opt/ratatouille-app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache
RUN groupadd --gid 10001 ratatouille \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin ratatouille
WORKDIR /tmp
EXPOSE 8080 9090 9400

FROM runtime AS operator
# Only virtual environments cross over: no compilers, no sources, no pip cache.
COPY --from=venv-operator /opt/ratatouille /opt/ratatouille
COPY --from=app /opt/ratatouille-app /opt/ratatouille-app
# Numeric, so `runAsNonRoot: true` can verify it without an explicit runAsUser.
USER 10001:10001
CMD ["ratatouille", "operator"]

FROM runtime AS trainer
COPY --from=venv-trainer /opt/ratatouille /opt/ratatouille
COPY --from=app /opt/ratatouille-app /opt/ratatouille-app
USER 10001:10001
CMD ["ratatouille", "operator"]
