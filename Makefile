# Two commands for a newcomer: `make serve` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# 2.13.0: a CPU build on our CI machines, the ordinary (CUDA) wheel elsewhere. Change it freely on your host.
TORCH ?= torch==2.13.0

.PHONY: serve test lint bench clean photos demo-model demo-eval wheelhouse

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q "$(TORCH)" -e ".[dev,ray]"
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

# The wheels a lent GPU machine lacks, for CPython 3.12 (README "On a lent GPU"): .wheelhouse/, about 31 MiB.
wheelhouse: $(VENV)/.installed
	$(BIN)/python scripts/gpu/build_wheelhouse.py

# The bundled demo model (weights/MODEL_CARD.md, data/README.md). `make demo-model` rebuilds the photo set from
# Debian packages (apt-get download + dpkg -x, no root-wide install), then trains for about 2 hours of one
# 1-thread process on a 2-core machine, then evaluates. Rerun it to resume an interrupted run (--resume).
# The lead pauses the run during benchmarks with SIGSTOP/SIGCONT on the training process.
DEMO_OUT ?= runs/demo
DEMO_CONFIG ?= mae_vit_demo_patch16
DEMO_STEPS ?= 4500
DEMO_TRAIN_ARGS ?= --batch-size 32 --lr 2e-3 --warmup 250 --threads 1 --cache-side 768 --save-every 100 --snapshot-every 500
SHARED ?= ../shared

photos: $(VENV)/.installed
	$(BIN)/python -m photoset.build build --shared $(SHARED)

demo-model: photos
	$(BIN)/python -m model.train --data data/photos/train --config $(DEMO_CONFIG) --steps $(DEMO_STEPS) \
		$(DEMO_TRAIN_ARGS) --fp16-weights --resume --out $(DEMO_OUT)
	$(MAKE) demo-eval

# Cross-source (sources never trained on), in-source, and the old 6-photo val; 5 masks each at 75 %.
demo-eval: $(VENV)/.installed
	for split in val_cross val_in; do \
		$(BIN)/python -m model.evaluate --weights $(DEMO_OUT)/model.safetensors --data data/photos/$$split \
			--seeds 0 1 2 3 4 --threads 1 --rows-per-source 2 --out $(DEMO_OUT)/eval_$$split || exit 1; \
	done
	$(BIN)/python -m model.evaluate --weights $(DEMO_OUT)/model.safetensors --data $(SHARED)/datasets/photos/val \
		--seeds 0 1 2 3 4 --threads 1 --out $(DEMO_OUT)/eval_old_val

clean:
	rm -rf $(VENV) .pytest_cache
