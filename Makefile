# One-command set-up: each target creates the virtual environment and builds the
# extension when missing, so `make test` and `make bench` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-dev
BDEPS  := $(VENV)/.deps-bench
# csrc/cuda too: a CUDA build of torch compiles accelops._C_cuda from them (setup.py)
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h) setup.py
BUILT  := $(VENV)/.built

.PHONY: build test test-fast format bench info clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip

$(DEPS): requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

$(BDEPS): requirements-bench.txt $(DEPS)
	$(BIN)/python -m pip install -q -r requirements-bench.txt
	touch $@

# --no-build-isolation: build against the torch in the venv, not a fresh (CUDA) download.
$(BUILT): $(DEPS) $(SOURCES)
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

test: $(BUILT)
	$(BIN)/python -m pytest -q tests

# The quick tier (under 5 minutes on 2 cores): everything but the slow, multi-rank and Ray tests.
test-fast: $(BUILT)
	$(BIN)/python -m pytest -q -m "not slow and not distributed and not ray" tests

# Import order and layout by ruff (pyproject.toml); tests/test_lint.py checks both.
format: $(DEPS)
	$(BIN)/ruff check --select I --fix .
	$(BIN)/ruff format .

bench: $(BUILT) $(BDEPS)
	$(BIN)/python bench/run.py

info: $(BUILT)
	$(BIN)/accelops info

clean:
	rm -rf build *.egg-info accelops/*.so $(BUILT)
