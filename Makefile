# Two commands for a newcomer: `make serve` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# 2.13.0: a CPU build on our CI machines, the ordinary (CUDA) wheel elsewhere. Change it freely on your host.
TORCH ?= torch==2.13.0

.PHONY: serve test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q "$(TORCH)" -e ".[dev]"
	$(BIN)/pip install -q --no-deps vit-pytorch==1.16.0 kserve==0.21.0
	touch $@

serve: $(VENV)/.installed
	$(BIN)/mae-serve $(ARGS)

# One layer: make test PYTEST_ARGS="-m unit" (or integration, browser, container, soak).
test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Benchmarks (BENCHMARKS.md): ceiling, end to end vs the baseline, cold start; ~9 min on 2 cores.
# ARGS=--pause-training stops the background training job for each step's window.
bench: $(VENV)/.installed-dev
	$(BIN)/pip install -q "$(TORCH)" -e ".[bench]"
	$(BIN)/python -m bench.run_all $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
