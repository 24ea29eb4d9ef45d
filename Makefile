# The two quick-start commands: `make bench` (the benchmark suite) and `make test` (the tests).
# Each creates a virtual environment in .venv on first use and installs pydl into it.
#   make test ARGS="-k cross_entropy"      extra pytest arguments
#   make test ARGS="--full"                heavy cases too (meant for a GPU)
#   make test JOBS=1                       one process (default: 2 pytest-xdist workers, as
#                                          many as CI's cores; emulation is CPU-bound)
#   make bench ARGS="cross_entropy --shapes full"
# TORCH pins the PyTorch wheel (on Linux x86-64 the PyPI wheel is a CUDA build; on a machine
# without a GPU the same wheel runs on the CPU).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
JOBS ?= 2
PY := $(VENV)/bin/python

.PHONY: test bench install clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -n $(JOBS) $(ARGS)

bench: $(VENV)/.installed
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks
