# Images of vae-serve (usage: deploy/README_SNIPPET.md).
#   docker build -t vae-serve .                          the default: the torch-free serving image
#   docker build --target train -t vae-serve-train .     vae-train with CPU-only torch
# Dependencies come pinned from requirements/*.txt (regenerate: make lock). The Dockerfile needs no
# BuildKit-only feature, so the classic builder builds it too; it then builds every stage before the
# target, which is why the training stages come after `serve` and the last stage is an alias of `serve`.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# One unprivileged user with fixed ids (Kubernetes' runAsNonRoot checks the numeric USER).
RUN groupadd --system --gid 10001 vae \
 && useradd --system --uid 10001 --gid vae --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vae

# ---- serving dependencies and the project in a venv; pip and setuptools leave it at the end
FROM base AS build-serve
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/serve.txt requirements/build.txt requirements/
RUN pip install --no-deps -r requirements/serve.txt
COPY . .
# PIP_CONSTRAINT pins the build backend inside pip's isolated build environment too.
RUN PIP_CONSTRAINT=/src/requirements/build.txt pip install --no-deps . \
 && pip check \
 && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') and 'torch in the serving venv')" \
 && pip uninstall --yes --quiet pip setuptools \
 && chmod -R a+rX,go-w models

# ---- the serving image
FROM base AS serve
COPY --from=build-serve /opt/venv /opt/venv
# The model repository baked in (root-owned, world-readable); a mount at /models replaces it.
COPY --from=build-serve /src/models/ /models/
ENV PATH=/opt/venv/bin:$PATH \
    VAE_HOST=0.0.0.0 \
    VAE_PORT=8000 \
    VAE_MODELS_DIR=/models \
    VAE_LOG_LEVEL=info
LABEL org.opencontainers.image.title="vae-serve" \
      org.opencontainers.image.description="VAE models served over HTTP; no torch inside"
USER 10001:10001
EXPOSE 8000
# Ready = the models are loaded, verified and warmed up. urllib: the slim image has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('VAE_PORT', '8000'), timeout=2)"]
# One uvicorn worker per container: scale with replicas (each keeps its own /metrics).
ENTRYPOINT ["vae-serve"]

# ---- torch wheels: requirements/wheels/ by default (empty but for a README); with BuildKit, replace the
# whole stage by any folder: --build-context torch-wheels=/path/to/wheels
FROM scratch AS torch-wheels
COPY requirements/wheels/ /

# ---- training dependencies: torch from the CPU index (TORCH_INDEX_URL; empty = none) or the wheels above
FROM base AS build-train
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/train.txt requirements/build.txt requirements/
COPY --from=torch-wheels / /tmp/torch-wheels/
RUN pip install --no-deps --find-links /tmp/torch-wheels \
      ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r requirements/train.txt \
 && python -c "import torch, sys; sys.exit(torch.version.cuda and 'not a CPU build of torch: %s' % torch.__version__)"
COPY . .
RUN PIP_CONSTRAINT=/src/requirements/build.txt pip install --no-deps . \
 && pip check \
 && pip uninstall --yes --quiet pip

# ---- the training image: docker run --rm -v "$PWD/models:/models" vae-serve-train --dataset digits --out /models/digits/2
FROM base AS train
COPY --from=build-train /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib
LABEL org.opencontainers.image.title="vae-serve-train" \
      org.opencontainers.image.description="vae-train and vae-ood-eval with CPU-only PyTorch"
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["vae-train"]
CMD ["--help"]

# ---- the default target (last stage): the serving image
FROM serve AS default
