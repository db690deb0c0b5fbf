# pyvision_ops: a newcomer types `make test` or `make bench` on a fresh machine.
# The venv (.venv) and the in-place build are made on first use and reused after.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS   := torch==2.14.1 torchvision==0.29.1 numpy pybind11 ninja pytest pytest-benchmark hypothesis \
	      matplotlib ruff expecttest

# CUDA builds on the machines without a GPU (CI compiles every .cu file for sm_90).
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

.PHONY: venv build test bench lint gpu-check clean

venv: $(VENV)/.installed
$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q $(DEPS)
	PYVISION_OPS_NO_EXT=1 $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# ninja recompiles only what changed; --force relinks so FORCE_CUDA on/off always takes effect.
build: venv
	$(VPY) setup.py -q build_ext --inplace --force
	$(VPY) -m pyvision_ops

test: build
	$(VPY) -m pytest tests -q

bench: build
	$(VPY) -m benchmarks.run

lint: venv
	$(VPY) -m ruff check pyvision_ops kernels benchmarks tests setup.py

# For the lent GPU machine: its own python3/torch/triton, no venv, no network.
# Writes logs and <gpu>.{json,md,png} to $$OUT, or to benchmarks/results when OUT is unset.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build pyvision_ops/_C*.so *.egg-info
