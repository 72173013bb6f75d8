# Two commands do all set-up on a fresh machine: `make demo` and `make test` (both create .venv if missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Train MambaOut-femto + UNETR decoder on synthetic2d, evaluate (fails below mean Dice 0.80), run inference.
demo: $(STAMP)
	$(BIN)/python tools/demo.py --work-dir work_dirs/demo

## The whole test suite (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## The fast subset: everything not marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check attnseg tools tests

clean:
	rm -rf work_dirs .pytest_cache
