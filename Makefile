# Two commands do everything: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel these machines carry. A user with a GPU can install their own CUDA torch into $(VENV)
# first: `make` only installs torch when none is importable, so an existing build is kept.
TORCH_SPEC ?= torch==2.13.0
# Triton runs segcal's GPU kernels; without a GPU the tests run them in Triton's interpreter. The CUDA builds of
# torch bring their own Triton, which is kept (installed only when none is importable, like torch).
TRITON_SPEC ?= triton==3.9.0
STAMP  := $(VENV)/.segcal-installed

.PHONY: venv demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# nnU-Net v2 (the tests of segcal's nnU-Net trainers) is installed without timm and torchvision: only nnU-Net's
# Primus trainers need them, and PyPI's torchvision is a CUDA build that does not import beside the CPU torch
# wheel. So nnunetv2 and dynamic-network-architectures come without their dependencies, and nnU-Net's other
# dependencies from the extra nnunet-deps (docs/integrations/nnunet.md).
$(STAMP): $(PY) pyproject.toml requirements-pinned.txt
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON_SPEC)"
	$(PY) -m pip install -q -c requirements-pinned.txt -e ".[test,nnunet-deps]"
	$(PY) -m pip install -q -c requirements-pinned.txt --no-deps nnunetv2 dynamic-network-architectures
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/segcal demo --output segcal-demo-output

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -n 2 -q --durations=15

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_binning.py

clean:
	rm -rf $(VENV) segcal-demo-output .pytest_cache
