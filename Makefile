# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL := models/digits/1
HOST ?= 127.0.0.1
PORT ?= 8000
PERF := .venv-perf/bin/perf_analyzer

.PHONY: run test bench lint typecheck docs screenshot model clean lock docker-test

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[train,serve,parquet,dev]"
	touch $(STAMP)

$(MODEL)/manifest.json: | $(STAMP)  # shipped in the repository; trained only if someone removed it
	$(BIN)/vae-train --dataset digits --out $(MODEL)

run: $(STAMP) $(MODEL)/manifest.json  ## serve the shipped default model (models/digits/1) on $(HOST):$(PORT)
	$(BIN)/vae-serve --models models --host $(HOST) --port $(PORT)

test: $(STAMP) lint typecheck docs  ## ruff, mypy, the docs build, then the whole test suite (browser tests included)
	$(BIN)/python -m pytest -q

docs: $(STAMP)  ## the documentation site (docs/, mkdocs.yml) into build/site: strict, offline, reference pages from the code
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

screenshot: $(STAMP)  ## docs/images/ui.png: the web page at /ui in headless Chromium (needs Debian's chromium)
	VAE_UI_SCREENSHOT=docs/images/ui.png $(BIN)/python -m pytest -q tests/ui -k uploaded_png

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)  ## mypy over the service and the contract package (settings in pyproject.toml)
	$(BIN)/mypy

model: $(STAMP)  ## retrain the shipped default model, deterministically (same machine: same weights)
	$(BIN)/vae-train --dataset digits --out $(MODEL) --force

# perf_analyzer (Triton's load tool) ships in tritonclient 2.51.0's wheel; it needs libb64 (Debian: libb64-0d)
# and links libcudart at start-up, though HTTP never uses CUDA.
$(PERF):
	test -d .venv-perf || $(PYTHON) -m venv .venv-perf
	.venv-perf/bin/pip install --quiet "tritonclient==2.51.0" "nvidia-cuda-runtime-cu12==12.*"
	@ldconfig -p | grep -q libb64.so.0d || echo "perf_analyzer needs libb64: apt-get install libb64-0d"

bench: $(STAMP) $(PERF)  ## speed and memory figures: bench/results.json and bench/results.md
	$(BIN)/python -m bench.run --model $(MODEL)

lock:  ## regenerate requirements/*.txt, the exact versions the images install, from pyproject.toml
	PYTHON=$(PYTHON) requirements/lock.sh

docker-test:  ## needs a Docker engine: build the images, docker compose up, call the API, tear down
	scripts/docker_test.sh

clean:
	rm -rf $(VENV) .venv-perf .pytest_cache .ruff_cache .mypy_cache
