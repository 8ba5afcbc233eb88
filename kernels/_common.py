"""What the kernel modules share: tile configurations, the target GPU, fp32-accumulating matmuls,
the K-loop of a logit tile, the raster of a tiled grid, input checks of an LM head, the
per-token sequence index of packed rows, and the batch-invariant switch."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Literal, NamedTuple, get_args

import torch
import triton
import triton.language as tl

__all__ = ["KernelConfig", "KernelBackend", "BACKENDS", "dot_precision", "sm_version", "has_fp32_out_addmm",
           "mm_fp32", "addmm_fp32", "logit_tile", "grouped_tile", "check_lm_head_inputs", "seq_ids",
           "batch_invariant", "resolve_batch_invariant", "INVARIANT_ROWS", "pad_rows"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KernelBackend = Literal["auto", "torch", "triton"]
BACKENDS = get_args(KernelBackend)          # "auto": Triton on CUDA tensors, streaming torch on CPU


class KernelConfig(NamedTuple):
    """Tile sizes and launch parameters of one kernel."""

    block_n: int      # rows (tokens) per tile
    block_v: int      # vocabulary columns per tile
    block_k: int      # hidden-size step of the K loop
    num_warps: int
    num_stages: int   # software-pipelining depth of the K loop
    group_n: int = 1  # row tiles per raster group (programs of a group share weight tiles in L2)
    sub_tiles: int = 1  # forward only: the vocabulary tile as 1, 2 or 4 column slices (registers)


def dot_precision(dtype: torch.dtype) -> str:
    """The `tl.dot` precision: fp32 inputs follow torch's own matmul setting, so the fp32 kernels
    agree with `h @ W.T`."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def sm_version(device: torch.device) -> int:
    """Compute capability as an integer (90 = Hopper); the interpreter takes Hopper's configs."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- fp32 matmuls


@functools.lru_cache(maxsize=None)
def has_fp32_out_addmm(device_type: str) -> bool:
    """Whether torch.addmm takes out_dtype=fp32 for 16-bit operands here (CUDA, torch ≥ 2.8)."""
    if device_type != "cuda":
        return False
    try:
        a = torch.zeros(16, 16, device="cuda", dtype=torch.bfloat16)
        torch.addmm(torch.zeros(16, 16, device="cuda"), a, a, out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b with an fp32 result (fp32 accumulation of 16-bit operands where torch offers it)."""
    if a.dtype == torch.float32:
        return a @ b
    if has_fp32_out_addmm(a.device.type):
        return torch.addmm(a.new_zeros((a.shape[0], b.shape[1]), dtype=torch.float32), a, b,
                           out_dtype=torch.float32)
    return (a @ b).float()


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc (fp32) + a·b, returned (acc itself where updated in place): one cuBLAS call accumulating
    in fp32 where torch offers it, else a 16-bit product added in fp32 (one extra rounding)."""
    if acc.dtype == a.dtype:
        return acc.addmm_(a, b)
    if has_fp32_out_addmm(a.device.type):
        return torch.addmm(acc, a, b, out_dtype=torch.float32)
    return acc.add_(a @ b)


# ----------------------------------------------------------------------------- Triton helpers


@triton.jit
def logit_tile(
    h_ptr, w_ptr,                       # data ptrs: hidden [N, H], weight [V, H]
    rows, cols, row_ok, col_ok,         # [BLOCK_N] / [BLOCK_V] indices and masks
    H, stride_hn, stride_hk, stride_wv, stride_wk,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """h[rows] · W[cols]ᵀ as a [BLOCK_N, BLOCK_V] fp32 tile (a K-loop of tensor-core dots).

    rows/cols are int32 (N, V < 2^31); the offsets are int64: N·H and V·H pass 2^31 at 128k
    tokens or 256k vocabularies. Keeping the index vectors themselves 32-bit saves registers."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wv
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        h = tl.load(h_rows + ks[None, :] * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :] * stride_wk,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def grouped_tile(pid, n_tiles_n, n_tiles_v, GROUP_N: tl.constexpr):
    """(row tile, vocabulary tile) of program `pid` in grouped order: GROUP_N row tiles walk the
    same weight tiles together, so a weight tile is read from L2, not HBM, by the group."""
    group = pid // (GROUP_N * n_tiles_v)
    first_n = group * GROUP_N
    group_size = tl.minimum(n_tiles_n - first_n, GROUP_N)
    pid_n = first_n + (pid % (GROUP_N * n_tiles_v)) % group_size
    pid_v = (pid % (GROUP_N * n_tiles_v)) // group_size
    return pid_n, pid_v


# ----------------------------------------------------------------------------- inputs


def check_lm_head_inputs(hidden, weight, targets, temperature, ignore_index, backend) -> str:
    """Validate the inputs of an LM-head pass before any launch; returns the resolved backend."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype must match hidden ({hidden.dtype}), got {weight.dtype}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"hidden must be [..., H] and weight [V, H], got hidden {tuple(hidden.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight has an empty vocabulary: shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden size mismatch: hidden [..., {hidden.shape[-1]}] vs weight "
                         f"[V, {weight.shape[1]}]")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] "
                         f"= {tuple(hidden.shape[:-1])}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"hidden, weight and targets must be on one device, got {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return _resolve_backend(hidden, weight, targets, ignore_index, backend)


def _resolve_backend(hidden, weight, targets, ignore_index, backend) -> str:
    """The backend `auto` stands for here, after the device and target-range checks."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = hidden.device.type == "cuda"
    if backend == "auto":
        backend = "triton" if on_cuda else "torch"
    if backend == "triton" and not (on_cuda or interpreting()):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {hidden.device}")
    capturing = on_cuda and torch.cuda.is_current_stream_capturing()
    if targets.numel() and not capturing:
        bad = ((targets < 0) | (targets >= weight.shape[0])) & (targets != ignore_index)
        if bool(bad.any()):
            first = targets[bad][0].item()
            raise ValueError(f"targets must lie in [0, {weight.shape[0]}) or equal ignore_index="
                             f"{ignore_index}, found {first}")
    return backend


def seq_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """Sequence index of every packed row, [N] int64 (empty sequences own no row)."""
    rows = torch.arange(n, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), rows, right=True).long()


# ----------------------------------------------------------------------------- batch invariance

# Rows per block of the torch backend's batch-invariant pass. Every matmul and elementwise op of
# that pass runs on [INVARIANT_ROWS, ...] blocks (the last one padded with zero rows), so a row's
# bits do not depend on how many rows share its call; 256 rows × any width is a whole number of
# 512-bit vectors, so no element falls into a scalar remainder loop (whose exp and log round
# differently from the vectorised ones). A CPU GEMM packs the whole weight for every call, which
# costs about as much as 20 rows of compute: at 64 rows a block ran at half the speed of a
# 1024-row chunk, at 256 within a fifth.
INVARIANT_ROWS = 256

_INVARIANT = contextvars.ContextVar("prolix_batch_invariant", default=False)


@contextlib.contextmanager
def batch_invariant(enabled: bool = True):
    """Run every `prolix.kernels` call inside the block in the batch-invariant mode (as with
    `batch_invariant=True` on each call): a row's log-prob and entropy then have the same bits
    whatever the number of rows, their order, their neighbours and the chunk size."""
    token = _INVARIANT.set(bool(enabled))
    try:
        yield
    finally:
        _INVARIANT.reset(token)


def resolve_batch_invariant(flag) -> bool:
    """The mode a call runs in: its `batch_invariant` keyword, or the enclosing context."""
    if not isinstance(flag, bool):
        raise TypeError(f"batch_invariant: expected a bool, got {type(flag).__name__}")
    return flag or _INVARIANT.get()


def pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """`x` with zero rows appended up to `n` rows (itself when it has them already)."""
    if x.shape[0] == n:
        return x
    return torch.cat([x, x.new_zeros((n - x.shape[0], *x.shape[1:]))])
