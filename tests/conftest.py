"""Session-wide test setup; runs before any test module imports prolix.kernels.

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

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
