# Each target creates .venv and installs the project into it when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-deep bench lint services

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Test tools (prometheus, chromium, docker-compose) are installed when missing; Redis and
# RabbitMQ are installed and started on loopback when they do not answer, and `test`, `bench`
# and `test-deep` stop what they started when they end. `make services` leaves them running.
SERVICES := bash scripts/ensure-services.sh

services: $(VENV)/.installed
	bash scripts/install-test-tools.sh
	$(SERVICES)

demo: $(VENV)/.installed
	$(BIN)/throttle demo $(ARGS)

# The suite runs on JOBS pytest-xdist workers, a whole test file each at a time (the tests
# of a file share queue names and servers); JOBS=0 runs it in this process alone.
JOBS ?= 2
test: $(VENV)/.installed
	bash scripts/install-test-tools.sh
	$(SERVICES) $(BIN)/python -m pytest -n $(JOBS) --dist loadfile $(ARGS)

# The property tests under SEEDS random Hypothesis seeds (the normal run replays fixed
# examples); a failure prints its seed: replay it with ARGS=--hypothesis-seed=N.
SEEDS ?= 20
PROPERTY_TESTS := tests/integration/test_gate_properties.py tests/integration/test_pools.py
test-deep: $(VENV)/.installed
	THROTTLE_HYPOTHESIS_PROFILE=deep $(SERVICES) bash scripts/hypothesis-seeds.sh $(SEEDS) \
		$(BIN)/python -m pytest -q $(PROPERTY_TESTS) $(ARGS)

bench: $(VENV)/.installed
	$(SERVICES) bash -c '$(BIN)/python -m bench.gate && $(BIN)/python -m bench.overrides \
		&& $(BIN)/python -m bench.celery && $(BIN)/python -m bench.gateway'

lint: $(VENV)/.installed
	$(BIN)/ruff check throttle workers tests bench
	$(BIN)/mypy
