# `make report` runs the main job, `make test` the tests. Both build .venv first if needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
KERNEL := reprokit
PROFILE ?= full
export REPROKIT_KERNEL := $(KERNEL)

.PHONY: all setup report report-smoke test lint typecheck unit nbval bench clean

all: test

setup: $(STAMP)

# The stamp depends on pyproject.toml, so a changed dependency list reinstalls.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (reprokit)"
	touch $(STAMP)

# JOBS notebooks at once, each in its own process (each notebook's own `jobs` capped at its share
# of the cores, idle OpenMP threads sleeping). Measured on 2 cores: smoke 66 s with 2, 84 s with 1;
# full 24 min with 2 (notebook 05's study alone 21 min: 140 runs).
JOBS ?= 2
report: $(STAMP)
	$(BIN)/reprokit report --profile $(PROFILE) --out reports --jobs $(JOBS)

report-smoke:
	$(MAKE) report PROFILE=smoke

test: lint typecheck unit nbval

lint: $(STAMP)
	$(BIN)/ruff check reprokit tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

# two workers for two cores; a test file stays on one worker, so its module fixtures run once
unit: $(STAMP)
	REPROKIT_PROGRESS=0 $(BIN)/pytest -n 2 --dist loadfile

# nbval executes each notebook as stored: its parameters cell holds the smoke profile. Two notebooks
# run at once; their idle OpenMP threads sleep instead of spinning on the other's core (100 s -> 54 s).
nbval: $(STAMP)
	REPROKIT_PROGRESS=0 OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -n 2 --dist loadfile --nbval-lax --nbval-kernel-name $(KERNEL) -p no:cacheprovider notebooks/

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_digest.py
	$(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/bench_run.py
	$(BIN)/python benchmarks/bench_trace.py
	$(BIN)/python benchmarks/bench_checkpoint.py

clean:
	rm -rf reports .pytest_cache .mypy_cache .ruff_cache
