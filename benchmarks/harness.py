"""Measuring on whatever device is here: timing, peak memory, the device's ceilings, metadata.

One timing helper picks its method from the device, so every benchmark times the same way:
- CUDA: `triton.testing.do_bench` (CUDA events, L2 flushed between reps, warm-up first), the
  median with the p20 and p80 quantiles, as Liger-Kernel's benchmark scripts report them.
- CPU: `time.perf_counter` around each call after one warm-up call, the same quantiles over a
  few reps. CPU numbers prove that the suite runs; they are never quoted as performance.

Peak memory is `torch.cuda.max_memory_allocated()` above what was allocated before the call
(the inputs), reset per case. CPU has no allocator statistics, so it is reported as null with
the reason.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import re
import sys
import time
from typing import Callable, Sequence

import torch

from prolix.trainer import sinks

QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80
CPU_NO_PEAK = "CPU: torch keeps no allocator statistics; peak memory is measured on CUDA only"

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device() -> torch.device:
    """The device every benchmark of a run uses: the first GPU if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error on any device (CUDA's own class, or the CPU allocator's)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    """Give cached blocks back after a case so the next one starts clean (matters after an OOM)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    grad_to_none: Sequence[torch.Tensor] = (),
    quick: bool = False,
) -> tuple[float, float, float]:
    """Milliseconds of one call of `fn`: (median, p20, p80).

    `grad_to_none` are the leaves whose `.grad` is reset between calls, so that a backward
    never pays for accumulating into the previous call's gradient.
    """
    if device.type == "cuda":
        import triton.testing

        warmup, rep = (5, 20) if quick else (25, 100)
        ms = triton.testing.do_bench(
            fn, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none), quantiles=list(QUANTILES)
        )
        return float(ms[0]), float(ms[1]), float(ms[2])
    _clear_grads(grad_to_none)
    fn()  # warm-up: first-call allocations, lazy initialisation, compilation
    reps = 3 if quick else 10
    times = []
    for _ in range(reps):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def peak_memory_gb(
    fn: Callable[[], object], device: torch.device, *, grad_to_none: Sequence[torch.Tensor] = ()
) -> tuple[float | None, str | None]:
    """(GB allocated at the peak of one call of `fn` above what was allocated before it, reason).

    What is allocated before the call (the inputs) does not count; what the call creates and
    keeps (outputs, saved activations, gradients) does. On CPU: (None, reason).
    """
    if device.type != "cuda":
        return None, CPU_NO_PEAK
    _clear_grads(grad_to_none)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    _clear_grads(grad_to_none)
    return peak / 1e9, None


def _time_matmul(size: int, device: torch.device, dtype: torch.dtype, *, quick: bool) -> float:
    """Median ms of a [size, size] × [size, size] matmul in `dtype`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return time_fn(lambda: torch.matmul(a, b), device, quick=quick)[0]


def _time_copy(n_bytes: int, device: torch.device, *, quick: bool) -> float:
    """Median ms of a device-to-device copy of `n_bytes` (fp32)."""
    src = torch.empty(n_bytes // 4, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device, quick=quick)[0]


def measure_ceilings(device: torch.device, dtype: torch.dtype, *, quick: bool) -> dict:
    """The device's measured peaks, once per run: matmul TFLOP/s in `dtype`, copy GB/s.

    A large square `torch.matmul` (8192³ on CUDA) and a 1 GiB device-to-device copy (read +
    write counted); on CPU small sizes, so the smoke stays fast.
    """
    on_cuda = device.type == "cuda"
    size = 8192 if on_cuda else 512
    n_bytes = (1 << 30) if on_cuda else (1 << 24)
    mm_ms = _time_matmul(size, device, dtype, quick=quick)
    cp_ms = _time_copy(n_bytes, device, quick=quick)
    free_memory(device)              # the operands died with the helpers' frames
    return {
        "matmul_tflops": 2 * size**3 / (mm_ms * 1e-3) / 1e12,
        "matmul_shape": [size, size, size],
        "matmul_dtype": dtype_name(dtype),
        "copy_gbps": 2 * n_bytes / (cp_ms * 1e-3) / 1e9,
        "copy_bytes": n_bytes,
    }


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """A file-name-safe short name: 'NVIDIA-H100-80GB-HBM3', 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-")


def git_commit() -> str:
    """The short commit of this checkout, '+dirty' when tracked files differ from it (the numbers
    then belong to uncommitted code); 'unknown' outside a git checkout."""
    return sinks.git_commit(short=12)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Versions of everything whose speed the results depend on (None: not installed)."""
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "liger_kernel": package_version("liger-kernel"),
        "cut_cross_entropy": package_version("cut-cross-entropy"),
        "trl": package_version("trl"),
        "transformers": package_version("transformers"),
        "prolix": package_version("prolix"),
    }


def timestamp() -> tuple[str, str]:
    """(ISO time for the JSON, 'YYYYMMDD-HHMMSS' for the file name), both UTC."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.isoformat(timespec="seconds"), now.strftime("%Y%m%d-%H%M%S")
