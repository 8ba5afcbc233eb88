# prolix: the two commands of the README.
#   make test    set up .venv and run the test suite (what CI runs)
#   make bench   the kernel benchmarks at small shapes on whatever device is here (smoke on CPU)
#
# torch is pinned to 2.13.0: on the CPU machines of this project pip takes the CPU wheel that
# lies on disk, so a CPU machine never downloads the multi-GB CUDA build. Override TORCH_SPEC
# on a GPU box that already provides torch (e.g. `make test TORCH_SPEC=torch`).

PYTHON ?= python3
VENV   ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.prolix-installed

.PHONY: test bench venv clean

venv: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/prolix bench all --quick --out benchmarks/results/local

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
