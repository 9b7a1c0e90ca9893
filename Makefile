# Set-up and checks. `make demo` and `make test` each build .venv/ on first use.
#
# torch is installed first and pinned: a bare `torch` requirement pulls a multi-GB CUDA
# build on Linux. Elsewhere, point pip at the CPU wheels:
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PIP := $(VENV)/bin/pip

.PHONY: demo test lint bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) install -q -e '.[test]'
	touch $@

demo: $(VENV)/.runtime
	$(VENV)/bin/pseudolabel demo

test: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest

bench: $(VENV)/.test
	$(VENV)/bin/python -m bench.all

clean:
	rm -rf $(VENV) demo_output bench/out
