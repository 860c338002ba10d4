# Every target sets itself up: uv (bootstrapped with pip if absent) + the committed uv.lock.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(PYTHON) -m uv
RUN := $(UV) run --frozen --no-sync
# Ray (>= 2.43) sees `uv run` in the driver's ancestry and restarts every worker with
# `uv run` in a copy of the working dir, which has no venv: keep workers on this venv.
export RAY_ENABLE_UV_RUN_RUNTIME_ENV := 0

.PHONY: setup demo ui test test-all lint format bench

setup:
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --disable-pip-version-check uv
	@$(UV) sync --frozen --quiet --compile-bytecode  # PYTHONDONTWRITEBYTECODE=1 machines: precompile once

demo: setup
	$(RUN) monoray sweep search_spaces/demo.yaml --name demo-$$(date +%Y%m%d-%H%M%S)

ui: setup
	$(RUN) monoray ui

lint: setup
	$(RUN) ruff check monoray tests bench jobs
	$(RUN) ruff format --check monoray tests bench jobs

# What CI runs (`.ci/run` is `make test`): CI=true, a throwaway PostgreSQL and Chromium around pytest.
# ARGS narrows it, e.g. `make test ARGS=tests/test_postgres.py`.
WITH_CI := bash .ci/with-services.sh

# Two pytest-xdist workers, whole files each (module fixtures run once): the suite waits on
# Ray, subprocesses and I/O for much of its time, so two share the 2 CI cores well.
XDIST := -n 2 --dist loadfile

test: lint
	$(WITH_CI) $(RUN) pytest $(XDIST) $(ARGS)

test-all: lint
	$(WITH_CI) $(RUN) pytest $(XDIST) -m "slow or not slow" $(ARGS)

format: setup
	$(RUN) ruff format monoray tests bench jobs
	$(RUN) ruff check --fix monoray tests bench jobs

bench: setup
	$(RUN) python bench/monoscore.py
	$(RUN) python bench/sae_step.py
