r"""LM head + a per-token loss with the gradients computed in the forward: three GEMMs, no recompute.

`fused_linear_grpo_loss` (kernels/grpo_loss.py) knows g = ∂L/∂logp and g_H = ∂L/∂H of every
token inside its forward, because each token's loss depends only on its own log-prob, entropy
and given tensors (the global normaliser and per-sequence token counts come from the mask and
`cu_seqlens`, rollout correction's weight and keep vectors from old/rollout log-probs, all known
before the pass). So the hidden and weight gradients are computed here, in the forward, and the
backward only scales them by the incoming gradient. A loss that couples tokens through their
current log-probs (GSPO's sequence ratio, an off-policy mask against the current policy:
`GRPOLossConfig.needs_sequence_logp`) breaks that premise and takes the four-GEMM path
(`linear_logprobs` + autograd), which `algorithm="auto"` selects for it.

Math (z = h·Wᵀ/τ, rows n of a chunk of C tokens, y[n] the target):

    c[n] = z[n, y[n]] = h[n]·W[y[n]]/τ              gather-dot, O(C·H)
    E    = exp(z − c)                                GEMM 1 (Triton), stored [C, V] (bf16 for 16-bit
    S    = Σ_v E,  T = Σ_v E·(z − c)                 inputs), S and T in fp32 per (row, vocabulary
    logp = z_y − lse = −log S                        tile), merged by a plain sum (no atomics)
    H    = lse − E_p[z] = log S − T/S
    dz   = g·1[y] − p·(g + g_H·(z − E_p[z])),  p = E/S,  z − E_p[z] = ln E − T/S
         = g·1[y] + E·(α + β·ln E),  α = −(g − g_H·T/S)/S,  β = −g_H/S
    dh   = dz·W/τ = (α⊙(E·W) + g·W[y]) / τ          GEMM 2 (cuBLAS; with β ≠ 0 E is first turned
    dW  += dzᵀ·h/τ = (Eᵀ·(α⊙h) + Σ_y g·h) / τ        into E·(α + β ln E) in place)  GEMM 3, fp32 dW

Overflow: exp(z − c) passes 2^64 only where the target sits more than 44 nats below the row
maximum (p(target) < e^-44). The kernel clamps z − c at 64·ln 2 (so S and the GEMMs stay
finite) and records the row maximum of z − c; rows with S > 2^63 are recomputed with the shift
c' = c + max (any shift is exact: logp = (c − c') − log S', H = log S' − T'/S').

Cost per token row (FLOP; bytes beyond the inputs, their gradients and O(N) vectors):
    GEMM 1 2·H·V, GEMM 2 2·H·V, GEMM 3 2·H·V: three GEMMs of 2·N·H·V, against four (forward,
    recompute, dh, dW) for the generic `linear_logprobs`; 30.6 → 23 TFLOP at N = 16384,
    H = 1536, V = 151936. E is written once and read twice (2·C·V·2 B per chunk, 15 GB in all at
    that shape: ~5 ms of HBM traffic, overlapped by nothing but small next to the GEMMs).
Memory: E [C, V] (C·V·2 B; fp32, C·V·4 B, for fp32 inputs and the torch backend), the fp32 dW
    accumulator V·H·4 B, the gathered rows of a chunk, and O(N) vectors. C defaults to the row
    count that makes E ≈ 1.25 GB (`E_BUDGET_BYTES`: 4096 rows at V = 152k in bf16; the torch
    backend 0.25 GB, `TORCH_E_BUDGET_BYTES`), and is set by `chunk_rows`. At N = 16384,
    qwen-1.5b: 1.25 + 0.93 GB, flat in N.
Rows with zero loss weight (prompt tokens, masked rows) are dropped before the GEMMs: they
    contribute nothing to the loss or either gradient.

The torch backend (CPU tensors) runs the same algorithm with torch ops in fp32 (16-bit inputs
are upcast once): GEMM 1 is `addmm` writing z − c straight into E, then `exp_` in place.

Batch-invariant mode: every per-row step has a fixed order whatever the rows around. Triton: the
target logit, the tile-order sum of the per-tile S and T, and the final values are small kernels
(kernels/invariant_kernels.py), GEMM 1 one tile shape with or without T; torch: S and T of each
block of INVARIANT_ROWS rows alone (chunks padded to whole blocks). `linear_logprobs` runs the
same pass (`shifted_stats`, `row_values`), so both give a row the same bits.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import (
    INVARIANT_ROWS,
    KernelConfig,
    addmm_fp32,
    dot_precision,
    grouped_tile,
    logit_tile,
    mm_fp32,
    pad_rows,
    sm_version,
)
from .invariant_kernels import finish_rows, merge_tiles, target_logits

__all__ = ["E_BUDGET_BYTES", "TORCH_E_BUDGET_BYTES", "FOLD_BLOCK", "gemm1_config", "default_chunk_rows",
           "three_gemm_logprob_grads", "attach_gradients", "exp_shifted_kernel", "fold_entropy_kernel",
           "shifted_stats", "row_values", "add_target_rows"]

E_BUDGET_BYTES = 1.25e9        # the E buffer [C, V] of one chunk (Triton backend)
TORCH_E_BUDGET_BYTES = 0.25e9  # the torch backend's (CPU): see default_chunk_rows
_SHIFT_BOUND = 64 * math.log(2.0)   # exp(z − c) is clamped at 2^64: S, E·W, Eᵀ·h stay finite
_REDO_ABOVE = 2.0 ** 63        # S above this: the row may have hit the clamp, redo with the max
FOLD_BLOCK = (4, 1024)         # [rows, cols] tile of the in-place entropy fold
_DW_SLICE = 32768              # vocabulary rows per fp32-output addmm (bounds its temporary)


# ----------------------------------------------------------------------------- kernels


# The row count is not specialised (no C == 1 or 16-divisible variant): one binary for every N,
# so the batch-invariant mode never meets a second compilation of the same tile.
@triton.jit(do_not_specialize=["C"])
def exp_shifted_kernel(
    h_ptr, w_ptr, c_ptr,                # data ptrs: hidden rows [C, H], weight [V, H], shift c [C] fp32
    e_ptr, s_ptr, t_ptr, m_ptr,         # out ptrs: E [C, V]; partials S, T, max(z − c) [V_TILES, C] fp32
    C, V, H,                            # shapes
    stride_hn, stride_hk, stride_wv, stride_wk, stride_en,  # strides
    inv_temp, bound,
    HAS_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    STORE_E: tl.constexpr,              # False: only the partials (linear_logprobs' batch-invariant forward)
):
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(C, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, col_ok = rows < C, cols < V
    acc = logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_hk, stride_wv, stride_wk,
                     BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)

    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
    d = acc * inv_temp - c[:, None]                  # z − c; finite on padded columns (z = 0 there)
    dmax = tl.max(tl.where(col_ok[None, :], d, float("-inf")), axis=1)
    d = tl.minimum(d, bound)
    e = tl.where(col_ok[None, :], tl.exp(d), 0.0)
    part = pid_v.to(tl.int64) * C + rows
    tl.store(s_ptr + part, tl.sum(e, axis=1), mask=row_ok)
    tl.store(m_ptr + part, dmax, mask=row_ok)
    if HAS_ENTROPY:
        tl.store(t_ptr + part, tl.sum(e * d, axis=1), mask=row_ok)
    if STORE_E:
        out = e_ptr + rows.to(tl.int64)[:, None] * stride_en + cols[None, :]
        tl.store(out, e.to(e_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def fold_entropy_kernel(
    e_ptr, a_ptr, b_ptr,                # data ptrs: E [C, V] (in place), α [C], β [C] fp32
    C, V, stride_en,                    # shapes, strides
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """E ← E·(α + β·ln E): the full dz coefficient when the entropy is in the graph."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows < C)[:, None] & (cols < V)[None, :]
    ptrs = e_ptr + rows.to(tl.int64)[:, None] * stride_en + cols[None, :]
    e = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + rows, mask=rows < C, other=0.0)
    b = tl.load(b_ptr + rows, mask=rows < C, other=0.0)
    # E = 0 (underflow) contributes 0; the max keeps ln finite so 0·ln 0 is not NaN
    coef = a[:, None] + b[:, None] * tl.log(tl.maximum(e, 1e-38))
    tl.store(ptrs, (e * coef).to(e_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- configuration


def gemm1_config(dtype: torch.dtype, sm: int = 90, with_entropy: bool = False,
                 batch_invariant: bool = False) -> KernelConfig:
    """Tiles of `_exp_shifted_kernel`, a GEMM tile with an exp/sum epilogue and a [C, V] store,
    chosen from the offline compile (`python -m prolix.kernels.resources`, registers/stack per thread):

        sm_90, 16-bit, 8 warps   128×256 K64: 255 regs + 8 B stack (T: + 80 B);  128×256 K32:
                                 200 regs, no stack (T: 88 B);  128×128 K64: 140 / 150 regs, none
        sm_80, 16-bit            128×128 K64, 8 warps: 176 regs, none

    so the widest tile that does not spill: 128×256 K32 without the entropy's T, 128×128 with it
    (T = Σ E·(z − c) keeps both tiles live). fp32 inputs (no 16-bit tensor cores): 64×128.
    The batch-invariant mode takes the entropy's tile with or without T: the tile width sets how
    S is summed, so a row's log-prob then has the same bits whether the entropy is computed."""
    if dtype == torch.float32:
        return KernelConfig(64, 128, 32, 8, 2)
    if sm >= 90 and not with_entropy and not batch_invariant:
        return KernelConfig(128, 256, 32, 8, 3)
    return KernelConfig(128, 128, 64, 8, 3)


def default_chunk_rows(V: int, e_bytes: int, budget: float = E_BUDGET_BYTES) -> int:
    """Rows per chunk so that E [C, V] holds about `budget` bytes; a multiple of 128, ≥ 128.

    Triton: 1.25 GB (4096 rows at V = 152k in bf16), few enough chunks that the per-chunk
    host work and syncs vanish next to the GEMMs. torch backend: 0.25 GB (384 fp32 rows at
    V = 152k), which keeps the CPU peak below that of Liger's chunked-torch loss
    (benchmarks/cpu_fused_grpo.py compares them), at the price of more, smaller chunks."""
    return max(128, int(budget // (V * e_bytes)) // 128 * 128)


# ----------------------------------------------------------------------------- GEMM 1


def _gemm1_triton(h, w, c, inv_temp, with_entropy, e, invariant=False):
    """E ← exp(z − c) into `e` [C, V] (None: not stored); returns merged (S, T or None,
    max(z − c)), each [C] fp32. `invariant`: the tiles' partials are summed in tile order by
    one kernel, whatever C is."""
    C, H = h.shape
    V = w.shape[0]
    cfg = gemm1_config(h.dtype, sm_version(h.device), with_entropy, invariant)
    v_tiles = triton.cdiv(V, cfg.block_v)
    part = torch.empty((3 if with_entropy else 2, v_tiles, C), device=h.device, dtype=torch.float32)
    s, m = part[0], part[1]
    t = part[2] if with_entropy else s   # unused pointer when HAS_ENTROPY is False
    grid = (triton.cdiv(C, cfg.block_n) * v_tiles,)
    exp_shifted_kernel[grid](
        h, w, c, c if e is None else e, s, t, m,
        C, V, H,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), 0 if e is None else e.stride(0),
        inv_temp, _SHIFT_BOUND,
        HAS_ENTROPY=with_entropy, DOT_PRECISION=dot_precision(h.dtype),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP_N=8, STORE_E=e is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if invariant:
        s_tot, t_tot = merge_tiles(s, t if with_entropy else None)
        return s_tot, t_tot, m.max(0).values   # a max is exact in any order
    # deterministic, no atomics; torch picks the reduction's order from C
    return s.sum(0), (t.sum(0) if with_entropy else None), m.max(0).values


def _gemm1_torch(h, w, c, inv_temp, with_entropy, e):
    """The same in fp32 torch ops: addmm writes z − c into `e`, exp in place. No max: the
    overflow redo finds it (rows with S > 2^63 are rare; the clamp is not needed in fp32,
    whose exp overflows only past 88 nats, and such rows are redone before any GEMM reads E)."""
    torch.addmm(-c[:, None], h, w.T, alpha=inv_temp, out=e)
    t = None
    if with_entropy:   # T = Σ E·(z − c) needs z − c and E together: row blocks bound the temporary
        t = torch.empty_like(c)
        for r0 in range(0, e.shape[0], 256):
            d = e[r0 : r0 + 256]
            ex = torch.exp(d)
            # a product then torch's (cascaded) row sum: half the rounding error of a batched dot
            t[r0 : r0 + 256] = d.mul_(ex).sum(1)
            d.copy_(ex)
    else:
        e.exp_()
    return e.sum(1), t, None


def _redo_overflow(h, w, c, inv_temp, with_entropy, e, s, t, dmax, gemm1):
    """Recompute rows whose S passed 2^63 with the shift c + max(z − c). Returns the per-row
    shift added to c ([C] fp32, 0 on other rows); updates e, s, t in place."""
    shift = torch.zeros_like(c)
    redo = torch.nonzero(~(s <= _REDO_ABOVE)).squeeze(1)   # NaN-safe: a NaN row is redone too
    if redo.numel() == 0:
        return shift
    for i0 in range(0, redo.numel(), 256):   # blocks bound the extra [rows, V] buffer
        idx = redo[i0 : i0 + 256]
        h_r = h[idx]
        if dmax is None:   # torch backend: the row max from the logits of these rows
            dm = (torch.mm(h_r, w.T) * inv_temp - c[idx, None]).max(1).values
        else:
            dm = dmax[idx]
        c_r = c[idx] + dm
        e_r = None if e is None else torch.empty((idx.numel(), e.shape[1]), device=e.device, dtype=e.dtype)
        s_r, t_r, _ = gemm1(h_r, w, c_r, inv_temp, with_entropy, e_r)
        if e is not None:
            e.index_copy_(0, idx, e_r)
        s.index_copy_(0, idx, s_r)
        if with_entropy:
            t.index_copy_(0, idx, t_r)
        shift.index_copy_(0, idx, dm)
    return shift


def _redo_block(h, w, c, inv_temp, with_entropy, e, s, t):
    """The torch backend's batch-invariant redo: the whole fixed-shape block again, with the
    shift c + max(z − c) on the rows whose S passed 2^63 and c itself (so the same bits as
    before) on the others. Returns the per-row shift ([C] fp32); updates e, s, t in place."""
    redo = ~(s <= _REDO_ABOVE)
    if not bool(redo.any()):
        return torch.zeros_like(c)
    dm = (torch.mm(h, w.T) * inv_temp - c[:, None]).max(1).values
    s_r, t_r, _ = _gemm1_torch(h, w, torch.where(redo, c + dm, c), inv_temp, with_entropy, e)
    s.copy_(s_r)
    if with_entropy:
        t.copy_(t_r)
    return torch.where(redo, dm, 0.0)


def shifted_stats(h, w, y, inv_temp: float, with_entropy: bool, e, backend: str, invariant: bool):
    """The target-shifted sums of one chunk of rows: (c = z_y, the shift added to c on rows that
    would overflow, S = Σ_v exp(z − c − shift), T = Σ_v E·(z − c − shift) or None), each [C] fp32;
    E is written into `e` [C, V] unless it is None (Triton only).

    h [C, H], w [V, H]: fp32 for the torch backend; y [C] int64 in [0, V). `invariant`: every
    step has a fixed order per row (Triton: `invariant_kernels`; torch: C is a multiple of
    INVARIANT_ROWS, padded by the caller, and each block of that many rows runs alone)."""
    if backend == "torch" and invariant and h.shape[0] > INVARIANT_ROWS:
        blocks = [shifted_stats(h[i : i + INVARIANT_ROWS], w, y[i : i + INVARIANT_ROWS], inv_temp, with_entropy,
                                e[i : i + INVARIANT_ROWS], backend, True) for i in range(0, h.shape[0], INVARIANT_ROWS)]
        return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*blocks))
    if backend == "torch":
        c = (h * w[y]).sum(1) * inv_temp
        s, t, _ = _gemm1_torch(h, w, c, inv_temp, with_entropy, e)
        if invariant:
            return c, _redo_block(h, w, c, inv_temp, with_entropy, e, s, t), s, t
        return c, _redo_overflow(h, w, c, inv_temp, with_entropy, e, s, t, None, _gemm1_torch), s, t
    c = target_logits(h, w, y, inv_temp) if invariant else (h.float() * w[y].float()).sum(1) * inv_temp
    gemm1 = functools.partial(_gemm1_triton, invariant=invariant)
    s, t, dmax = gemm1(h, w, c, inv_temp, with_entropy, e)
    return c, _redo_overflow(h, w, c, inv_temp, with_entropy, e, s, t, dmax, gemm1), s, t


def row_values(c, shift, s, t, in_kernel: bool):
    """(logp, entropy or None, lse, E_p[z] or None), each [C] fp32, from `shifted_stats`:
    logp = −shift − log S, H = log S − T/S (≥ 0), lse = c + shift + log S, E_p[z] = c + shift + T/S.
    `in_kernel`: one Triton program per block of rows (the batch-invariant Triton path)."""
    if in_kernel:
        return finish_rows(c, shift, s, t)
    log_s = torch.log(s)
    logp, lse = -shift - log_s, c + shift + log_s
    if t is None:
        return logp, None, lse, None
    mean = t / s
    return logp, (log_s - mean).clamp_min(0.0), lse, c + shift + mean   # H ≥ 0 up to fp32 rounding


# ----------------------------------------------------------------------------- GEMMs 2 and 3


def _fold_entropy(e, alpha, beta, use_triton: bool):
    """E ← E·(α + β·ln E) in place: the Triton kernel, or row blocks of torch ops."""
    if use_triton:
        grid = (triton.cdiv(e.shape[0], FOLD_BLOCK[0]), triton.cdiv(e.shape[1], FOLD_BLOCK[1]))
        fold_entropy_kernel[grid](e, alpha, beta, e.shape[0], e.shape[1], e.stride(0),
                                  BLOCK_R=FOLD_BLOCK[0], BLOCK_C=FOLD_BLOCK[1], num_warps=4)
        return
    for r0 in range(0, e.shape[0], 256):   # row blocks bound the ln E temporary
        blk = e[r0 : r0 + 256]
        coef = blk.clamp_min(1e-38).log_().mul_(beta[r0 : r0 + 256, None]).add_(alpha[r0 : r0 + 256, None])
        blk.mul_(coef)


def _addmm_fp32_(acc, a, b):
    """acc (fp32) += a·b, over vocabulary slices so an fp32-output temporary stays small."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    for v0 in range(0, acc.shape[0], _DW_SLICE):
        sl = slice(v0, v0 + _DW_SLICE)
        acc[sl] = addmm_fp32(acc[sl], a[sl], b)


def add_target_rows(dw, y, g_t, h, by_gemm: bool):
    """dW[y[n]] += g_t[n]·h[n] (fp32). CUDA's index_add_ adds the rows of a repeated target
    with atomics, in no fixed order; `by_gemm` (the batch-invariant mode on CUDA) sums the rows
    of one target by a GEMM with a [targets, C] selection matrix instead, then updates each
    distinct target row once. The CPU's index_add_ adds in index order, deterministic as it is."""
    if not by_gemm:
        dw.index_add_(0, y, g_t[:, None] * h.float())
        return
    uniq, inv = torch.unique(y, return_inverse=True)
    select = torch.zeros((uniq.numel(), y.numel()), device=dw.device, dtype=torch.float32)
    select[inv, torch.arange(y.numel(), device=dw.device)] = g_t
    dw.index_add_(0, uniq, select @ h.float())


def _chunk_grads(h_c, w, y_c, e, s, t, g, gh, inv_temp, dh_out, dw, use_triton: bool, invariant: bool = False):
    """dh of the chunk's rows (written into dh_out [C, H] fp32, or skipped when None) and
    dW += (chunk's contribution) in fp32, from E and the per-row g (and g_H); `invariant`: the
    target rows' term in a fixed order (`add_target_rows`)."""
    g_t = g * inv_temp
    if gh is not None:
        alpha = -(g - gh * t / s) / s * inv_temp
        _fold_entropy(e, alpha, -gh / s * inv_temp, use_triton)   # E is now dz/τ off the target column
        scale = None
    else:
        scale = -g_t / s
    if dh_out is not None:
        ew = mm_fp32(e, w)                                                # [C, H] fp32
        if scale is not None:
            ew.mul_(scale[:, None])
        dh_out.copy_(ew.addcmul_(g_t[:, None], w[y_c].float()))
    if dw is not None:
        hs = h_c if scale is None else (h_c.float() * scale[:, None]).to(e.dtype)   # [C, H]
        _addmm_fp32_(dw, e.T, hs)
        add_target_rows(dw, y_c, g_t, h_c, invariant and dw.is_cuda)


# ----------------------------------------------------------------------------- the pass


def three_gemm_logprob_grads(hidden, weight, targets, rows, token_grads, *, inv_temp: float,
                             with_entropy: bool, need_dh: bool, need_dw: bool, backend: str,
                             chunk_rows: int | None = None, batch_invariant: bool = False):
    """Log-probs, entropies and the gradients of a per-token loss, in one pass over row chunks.

    hidden: [N, H] and weight: [V, H] (fp32/bf16/fp16, one dtype); targets: [N] int64 in [0, V)
        on the rows listed in `rows` ([R] int64, the rows with a nonzero loss weight; every other
        row has logp = entropy = 0 and zero gradient).
    token_grads(logp_c [C] fp32, entropy_c [C] fp32 or None, sel) -> (g [C], g_H [C] or None):
        ∂L/∂logp and ∂L/∂H of the chunk's rows; `sel` indexes the chunk's rows in [N] vectors.
        Called only when a gradient is needed.
    backend: "triton" (GEMM 1 and the fold in Triton, GEMMs 2–3 torch) or "torch" (all fp32 torch).
    chunk_rows: C, rows per chunk (default: `default_chunk_rows`, E ≈ 1.25 GB; 0.25 GB for torch).
    batch_invariant: a row's logp and entropy have the same bits whatever the other rows and C
        (the torch backend rounds C up to whole blocks of INVARIANT_ROWS rows, pads the last
        chunk to whole blocks, and computes each block's E and sums alone; the gradient GEMMs
        run on the whole chunk); the gradients are deterministic.

    Returns (logp [N] fp32, entropy [N] fp32 or None, dh [N, H] or None, dW [V, H] or None),
    the gradients in the inputs' dtype (accumulated in fp32).
    """
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    h, w = (hidden.float(), weight.float()) if backend == "torch" else (hidden, weight)
    R = rows.numel()
    budget = E_BUDGET_BYTES if backend == "triton" else TORCH_E_BUDGET_BYTES
    C = chunk_rows or default_chunk_rows(V, torch.finfo(h.dtype).bits // 8, budget)
    pad = batch_invariant and backend == "torch"
    if pad:
        C = triton.cdiv(C, INVARIANT_ROWS) * INVARIANT_ROWS
    every_row = R == N   # slices instead of gathers when no row is dropped
    logp = torch.zeros(N, device=dev, dtype=torch.float32)
    entropy = torch.zeros_like(logp) if with_entropy else None
    dh = torch.zeros(hidden.shape, device=dev, dtype=torch.float32 if backend == "torch" else hidden.dtype) \
        if need_dh else None
    dw = torch.zeros(weight.shape, device=dev, dtype=torch.float32) if need_dw else None
    rows_max = min(C, triton.cdiv(R, INVARIANT_ROWS) * INVARIANT_ROWS if pad else R)
    e_buf = torch.empty((rows_max, V), device=dev, dtype=h.dtype) if R else None
    for r0 in range(0, R, C):
        sel = slice(r0, min(r0 + C, R)) if every_row else rows[r0 : r0 + C]
        h_c, y_c = h[sel], targets[sel]
        n_c = h_c.shape[0]
        if pad:
            whole = triton.cdiv(n_c, INVARIANT_ROWS) * INVARIANT_ROWS
            h_c, y_c = pad_rows(h_c, whole), pad_rows(y_c, whole)
        e = e_buf[: h_c.shape[0]]
        c, shift, s, t = shifted_stats(h_c, w, y_c, inv_temp, with_entropy, e, backend, batch_invariant)
        lp_c, ent_c, _, _ = row_values(c, shift, s, t, batch_invariant and backend == "triton")
        logp[sel] = lp_c[:n_c]
        if with_entropy:
            entropy[sel] = ent_c[:n_c]
        if need_dh or need_dw:
            g, gh = token_grads(logp[sel], None if ent_c is None else ent_c[:n_c], sel)
            g, gh = pad_rows(g.float(), h_c.shape[0]), None if gh is None else pad_rows(gh.float(), h_c.shape[0])
            dh_c = torch.empty((h_c.shape[0], h.shape[1]), device=dev, dtype=torch.float32) if need_dh else None
            _chunk_grads(h_c, w, y_c, e, s, t, g, gh, inv_temp, dh_c, dw, backend == "triton", batch_invariant)
            if need_dh:
                dh[sel] = dh_c[:n_c].to(dh.dtype)
    dh = dh.to(hidden.dtype) if need_dh else None
    dw = dw.to(weight.dtype) if need_dw else None
    return logp, entropy, dh, dw


# ----------------------------------------------------------------------------- autograd


class _PrecomputedGradients(torch.autograd.Function):
    """A loss whose input gradients were computed in the forward: backward = grad_output · them."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, dh, dw):
        ctx.save_for_backward(dh, dw)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        grad_h = dh * grad_loss if dh is not None and ctx.needs_input_grad[1] else None
        grad_w = dw * grad_loss if dw is not None and ctx.needs_input_grad[2] else None
        return None, grad_h, grad_w, None, None


def attach_gradients(loss, hidden, weight, dh, dw):
    """`loss` (a detached 0-d tensor) made differentiable in hidden and weight, with ∂loss/∂hidden
    = dh and ∂loss/∂weight = dw already computed (None where not needed). Saves only dh and dw."""
    if dh is None and dw is None:
        return loss
    return _PrecomputedGradients.apply(loss, hidden, weight, dh, dw)
