# The two quick-start commands: `make bench` (the benchmark suite) and `make test` (the tests).
# Each creates a virtual environment in .venv on first use and installs pydl into it, with the
# Numba backend and the test, benchmark and lint tools. `make lint`: ruff's checks (configured
# in pyproject.toml) on the whole tree, and its formatter on the files in FORMATTED.
#   make test ARGS="-k cross_entropy"      extra pytest arguments
#   make test ARGS="--full"                heavy cases too (meant for a GPU)
#   make test JOBS=1                       one process (default: 2 pytest-xdist workers, as
#                                          many as CI's cores; emulation is CPU-bound)
#   make bench ARGS="cross_entropy --shapes full"
# TORCH pins the PyTorch wheel (on Linux x86-64 the PyPI wheel is a CUDA build; on a machine
# without a GPU the same wheel runs on the CPU). A CUDA wheel pins its own triton (torch 2.13:
# 3.7.1), which the install keeps; a wheel that requires none (a CPU build) gets TRITON, the
# release the emulated suite is checked on. tests/constraints.txt holds what the emulation needs
# of the other packages (numpy < 2.4 for Triton's interpreter): the test setup's pins, not pydl's.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRITON ?= triton==3.7.1
JOBS ?= 2
PY := $(VENV)/bin/python
CONSTRAINTS := tests/constraints.txt
# The files the formatter keeps (`ruff format FILE` adds one); the rest of the tree joins later.
FORMATTED := bench/__main__.py tests/test_hygiene.py
# TRITON unless the installed torch requires a triton of its own
TORCH_TRITON := import importlib.metadata as m; \
	print("" if any(r.startswith("triton") for r in m.requires("torch") or []) else "$(TRITON)")

.PHONY: test bench lint install clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[numba,test,bench,lint]" $$($(PY) -c '$(TORCH_TRITON)')
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -n $(JOBS) $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check $(FORMATTED)

bench: $(VENV)/.installed
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks
