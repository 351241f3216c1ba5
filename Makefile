# Each target creates .venv and installs the project into it when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench lint services

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The demo runs on the embedded default unless THROTTLE_REDIS_URL is set in the environment.
services: $(VENV)/.installed
	bash scripts/install-test-tools.sh
	bash scripts/ensure-services.sh

demo: $(VENV)/.installed
	$(BIN)/throttle demo $(ARGS)

test: services
	$(BIN)/python -m pytest $(ARGS)

bench: services
	$(BIN)/python -m bench.gate
	$(BIN)/python -m bench.celery
	$(BIN)/python -m bench.gateway

lint: $(VENV)/.installed
	$(BIN)/ruff check throttle workers tests bench
	$(BIN)/mypy
