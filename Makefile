# Two commands do everything: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel these machines carry. A user with a GPU can install their own CUDA torch into $(VENV)
# first: `make` only installs torch when none is importable, so an existing build is kept.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.segcal-installed

.PHONY: venv demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml requirements-pinned.txt
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c requirements-pinned.txt -e ".[test]"
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
