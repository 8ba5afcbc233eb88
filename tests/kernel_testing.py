"""What every kernel test shares: the device, tolerances by dtype, and one comparison.

Errors are relative L2 norms ‖out − ref‖ / ‖ref‖ against the float64 references of
`prolix.kernels.reference`, computed from the *same* (already rounded) inputs, so they
measure the kernel's arithmetic, not the rounding of its inputs.
"""

from __future__ import annotations

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def requires_cuda(test):
    """Skip `test` without CUDA and mark it `gpu`, so `pytest -m gpu` (the device check) selects it."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


# Values (logp, entropy) accumulate in fp32 whatever the input dtype, so they are tight in every
# dtype. Gradients pass through the input dtype once (dz is stored in it and the dh/dW GEMMs
# round their outputs to it): bf16 keeps 8 significant bits (2^-9 ≈ 2e-3 per rounding), fp16 11.
TOLERANCES = {
    torch.float32: {"value": 1e-5, "grad": 1e-4},
    torch.float16: {"value": 1e-4, "grad": 4e-3},
    torch.bfloat16: {"value": 1e-4, "grad": 2e-2},
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """Fail with the error, the tolerance and the worst entries when ‖out − ref‖/‖ref‖ > tol."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values at {torch.nonzero(~torch.isfinite(out))[:5].tolist()}"
    err = rel_err(out, ref)
    if not err <= tol:
        diff = (out.detach().double().cpu() - ref.detach().double().cpu()).abs().flatten()
        worst = torch.topk(diff, min(5, diff.numel())).indices
        rows = [(int(i), out.flatten()[i].item(), ref.flatten()[i].item()) for i in worst]
        raise AssertionError(f"{what}: relative L2 error {err:.3e} > {tol:.1e}; worst (index, out, ref): {rows}")


def run_without(module: str, code: str):
    """Run `code` in a fresh interpreter in which `import <module>` fails (sys.modules[module] =
    None); returns the CompletedProcess. For checking that prolix.kernels.integrations.* import
    without their host library and fail clearly only when used."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    return subprocess.run([sys.executable, "-c", f"import sys; sys.modules[{module!r}] = None\n{code}"],
                          capture_output=True, text=True, env=env, timeout=120)
