# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL := models/digits/1
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test bench lint model clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[train,serve,dev]"
	touch $(STAMP)

$(MODEL)/manifest.json: | $(STAMP)
	$(BIN)/vae-train --dataset digits --out $(MODEL)

model: $(MODEL)/manifest.json  ## train the default digits model if it is missing

run: $(STAMP) $(MODEL)/manifest.json  ## train the default model if missing, then serve it
	$(BIN)/vae-serve --models models --host $(HOST) --port $(PORT)

test: $(STAMP)  ## the whole test suite
	$(BIN)/python -m pytest -q

bench: $(STAMP) $(MODEL)/manifest.json  ## speed and memory figures, written to bench/results.json
	$(BIN)/python -m bench.run --model $(MODEL)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check training service tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

.PHONY: lock docker-test

lock:  ## regenerate requirements/*.txt, the exact versions the images install, from pyproject.toml
	PYTHON=$(PYTHON) requirements/lock.sh

docker-test:  ## needs a Docker engine: build the images, docker compose up, call the API, tear down
	scripts/docker_test.sh
