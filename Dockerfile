# Images of vae-serve (usage: deploy/README_SNIPPET.md).
#   docker build --target serve -t vae-serve .           the torch-free serving image (also the default target)
#   docker build --target serve --build-arg FAST_PATH=0 -t vae-serve .   the same without openvino (~100 MB less)
#   docker build --target train -t vae-serve-train .     vae-train with CPU-only torch
# Dependencies come pinned from requirements/*.txt (regenerate: make lock). The Dockerfile needs no
# BuildKit-only feature, so the classic builder builds it too; it then builds every stage before the
# target, which is why the training stages come after `serve`: name `--target serve` there, since the last
# stage (the default target, an alias of `serve` for BuildKit) comes after the training stages.

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
# FAST_PATH=0 leaves out openvino (the bf16 scoring fast path; 98 MB after the trimming below): the service
# then scores on onnxruntime fp32, as it does anyway on CPUs without bf16 instructions.
ARG FAST_PATH=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/serve.txt requirements/build.txt requirements/
RUN if [ "$FAST_PATH" = 0 ]; then grep -vE '^openvino(-telemetry)?==' requirements/serve.txt >/tmp/pins.txt; \
    else cp requirements/serve.txt /tmp/pins.txt; fi \
 && pip install --no-deps -r /tmp/pins.txt
COPY . .
# PIP_CONSTRAINT pins the build backend inside pip's isolated build environment too.
RUN PIP_CONSTRAINT=/src/requirements/build.txt pip install --no-deps . \
 && pip check \
 && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') and 'torch in the serving venv')" \
 && pip uninstall --yes --quiet pip setuptools \
 && chmod -R a+rX,go-w models
# Trim what the service cannot use: ~150 MB of the venv's 392 MB (the image is 486 MB instead of 635 MB):
#  - OpenVINO: the service only compiles ONNX graphs on the CPU plugin (service/engine.py), so of libs/ only
#    libopenvino, the CPU plugin, the ONNX and IR frontends, TBB and hwloc stay; the GPU and NPU plugins (and
#    the GPU's kernel cache.json), the AUTO/HETERO/BATCH plugins, the TensorFlow, TFLite, PyTorch, Paddle, JAX
#    and GGUF frontends (also their python modules), the C API, C++ headers, cmake files and the benchmark_app
#    and ovc tools go. The wheel has no plugins.xml: a plugin whose file is gone is simply not registered.
#  - onnxruntime: libonnxruntime.so (the C API; the python module links its own copy) and the transformers,
#    quantization and tools subpackages (model optimisation tools, never imported by onnxruntime itself).
#  - swagger-ui-bundle: source maps and the ES-module bundles (/docs loads swagger-ui-bundle.js and the css).
#  - every tests directory (numpy's test suite).
# The bytecode (__pycache__, 17 MB) stays: the root filesystem is read-only at run time, so without it every
# start would compile the service's imports again (~1 s of CPU per start and replica).
# The check at the end fails the build if the trimmed OpenVINO no longer compiles the shipped ONNX graphs on CPU.
RUN sp=/opt/venv/lib/python3.11/site-packages \
 && ov=$sp/openvino \
 && if [ -d "$ov" ]; then \
      find "$ov/libs" ! -type d ! -name 'libopenvino.so*' ! -name libopenvino_intel_cpu_plugin.so \
        ! -name 'libopenvino_onnx_frontend.so*' ! -name 'libopenvino_ir_frontend.so*' ! -name 'libtbb*' \
        ! -name 'libhwloc*' -delete \
      && rm -rf "$ov/include" "$ov/cmake" "$ov/tools/benchmark" "$ov/tools/ovc" /opt/venv/bin/benchmark_app \
        /opt/venv/bin/ovc "$ov/frontend/tensorflow" "$ov/frontend/pytorch" "$ov/frontend/paddle" "$ov/frontend/jax"; \
    fi \
 && rm -rf "$sp"/onnxruntime/capi/libonnxruntime.so* "$sp/onnxruntime/transformers" \
      "$sp/onnxruntime/quantization" "$sp/onnxruntime/tools" /opt/venv/bin/onnxruntime_test \
 && rm -f "$sp"/swagger_ui_bundle/vendor/*/*.map "$sp"/swagger_ui_bundle/vendor/*/swagger-ui-es-bundle* \
 && find "$sp" -depth -type d -name tests -exec rm -rf {} + \
 && python -c "import onnxruntime as ort; assert 'CPUExecutionProvider' in ort.get_available_providers()" \
 && python -c "from swagger_ui_bundle import swagger_ui_path as p; import os; open(os.path.join(p, 'swagger-ui-bundle.js'))" \
 && if [ "$FAST_PATH" = 0 ]; then \
      python -c "import importlib.util as u, sys; sys.exit(u.find_spec('openvino') and 'openvino with FAST_PATH=0')"; \
    else \
      python -c "import glob, openvino as ov; c = ov.Core(); \
        fes = ov.frontend.FrontEndManager().get_available_front_ends(); assert 'onnx' in fes, fes; \
        graphs = [c.compile_model(g, 'CPU') for g in glob.glob('models/*/*/*.onnx')]; \
        print('openvino', ov.get_version(), c.available_devices, fes, len(graphs), 'graphs compiled', \
              c.get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))"; \
    fi

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
# Ready = the models are loaded, verified and warmed up. urllib: the slim image has no curl. The start period
# covers the fast-path check at load, which grows with a model's cost: a 32x32 colour conv version was ready
# after 42 s (the digits after ~6 s); the container is healthy at the first check that passes.
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
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
