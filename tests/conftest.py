"""Session-wide test setup; runs before any test module imports prolix.kernels.

It also holds the fixtures several modules share (the tiny trainer run's model and prompts, one
thread for tiny models); helpers that are plain functions live in `trainer_testing.py` and
`kernel_testing.py`.

1. Without CUDA, Triton kernels run on CPU tensors under the Triton interpreter. Triton reads
   TRITON_INTERPRET when a @triton.jit function is *decorated*, i.e. when prolix.kernels is
   first imported, so it is set here, before that. Tests of the torch backend never call a
   jitted function and are not slowed by it. With CUDA the kernels are compiled for real.
2. The Triton 3.9 interpreter's `tl.dot` multiplies bfloat16 operands as their raw uint16 bit
   patterns (numpy has no bf16, and `create_dot` converts only 8-bit floats). We give it the
   fp32 values instead: exact, since a bf16×bf16 product fits in fp32, which is also what the
   tensor cores compute. Without this every bf16 Triton test would fail on CPU for a reason
   that has nothing to do with our kernels.
"""

import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# On CPU a matmul's reduction order follows the number of threads, so two runs agree bit for bit
# only under the same count. The session computes on one thread (`make test` runs a
# worker per core), and every process a test starts inherits the same count through OMP_NUM_THREADS; the
# bit-exact comparisons pin it on both sides explicitly as well (`one_thread`, OMP_NUM_THREADS="1").
TEST_THREADS = 1
os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)
torch.set_num_threads(TEST_THREADS)


def _patch_interpreter_bf16_dot() -> None:
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot
    if getattr(original, "_prolix_bf16_fix", False):
        return

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(x):
            if x.dtype.scalar != tl.bfloat16:
                return x
            data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)

        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._prolix_bf16_fix = True
    interpreter.InterpreterBuilder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_bf16_dot()


def pytest_configure(config):
    # Long-running checks that still fit the default run; `-m "not soak"` deselects them.
    config.addinivalue_line("markers", "soak: a long run checking memory and live objects stay flat (< 60 s)")
    # `python -m prolix.benchmarks.device_check` runs `pytest -m gpu` on a GPU machine.
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it); selected by `pytest -m gpu`")
    config.addinivalue_line("markers", "sandbox: starts sandboxed programs (`make test` runs these alone, "
                                       "after the rest)")


# The modules that start torchrun worlds, vLLM engines or whole training runs, slowest first.
# `make test` (pytest-xdist, --dist loadfile: each file on one worker, so its module-scoped fixtures,
# a trained run say, are built once) hands out files in collection order, so these go first and no
# worker is still busy with a long one when the other has run out of work.
SLOW_MODULES = ("test_split.py", "test_benchmarks.py", "test_failures.py", "test_checkpoint.py", "test_sinks.py",
                "test_distributed.py", "test_soak.py", "test_kernels_shadowing.py", "test_kernel_resources.py",
                "test_engines.py", "test_loop.py", "test_eval.py", "test_vllm_cpu_eval.py",
                "test_loop_rollout_correction.py")


# The tests that start sandboxed programs (marked `sandbox`): each checks that none outlives its
# run by scanning the machine's processes for the sandbox's uids, and the checks right after a
# kill assume a machine not saturated by other tests' torchrun worlds. `make test` runs
# them after the parallel part, in one process, one after the other.
SANDBOX_TESTS = ("test_sandbox.py", "test_sandbox_native.py", "test_code_reward.py", "test_reward_pool.py",
                 "test_benchmarks.py::test_reward_pool_bench")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:                           # `-m sandbox` / `-m "not sandbox"`, with or without xdist
        if any(f"{item.path.name}::{item.name}".startswith(p) for p in SANDBOX_TESTS):
            item.add_marker(pytest.mark.sandbox)
    # xdist's workers collect too (`workerinput`); the controller has `numprocesses`
    if not (getattr(config.option, "numprocesses", None) or hasattr(config, "workerinput")):
        return                                   # one process (`make test-serial`): the files' own order
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_MODULES)))   # stable: the rest keep their order


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a module's tests, whatever an earlier test left: the count its
    subprocesses get (OMP_NUM_THREADS="1"), so their runs and this process's agree bit for bit.
    Tiny models gain nothing from threads either, and oversubscribed OpenMP threads make each
    small GEMM 100x slower. Modules use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    """A random tiny Qwen2 + the char tokenizer, saved like the demo saves its base model
    (see trainer_testing.py for why it is this size)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from prolix.trainer.model import save_policy
    from prolix.trainer.tokenizer import build_char_tokenizer, save_tokenizer

    out = tmp_path_factory.mktemp("tiny") / "base_model"
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_policy(model, out)
    save_tokenizer(tokenizer, str(out))
    return out


@pytest.fixture(scope="session")
def problems(tmp_path_factory) -> Path:
    """40 JSONL prompts; every other one is marked "same" (constant reward, no signal)."""
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    rows = [{"prompt": f"{'same' if i % 2 else 'add'} {i} {i + 1}", "answer": str(2 * i + 1)} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
