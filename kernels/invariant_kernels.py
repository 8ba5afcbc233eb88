"""The small Triton kernels of the batch-invariant mode, and their launchers.

In that mode a row's log-prob must not depend on the rows computed with it. The GEMM tiles
already compute each row on its own; what a default launch leaves to the library is the rest:
torch's reductions pick their strategy (threads per row, split across blocks) from the number
of rows, so the target logit (a dot product over H) and the merge of the per-tile partials
(a sum over the vocabulary tiles) would round differently at different N. Here each of them is
one program per block of rows, with a fixed loop order per row:

    target_logit_kernel   c[n] = h[n]·W[y[n]]/τ: BLOCK_H-wide fp32 products summed along H in
                          order, then one fixed tree over the BLOCK_H lanes
    merge_tiles_kernel    S[n] = Σ_tiles S_tile[n] (and T) in tile order 0, 1, 2, ...
    finish_rows_kernel    logp = −shift − log S, H = max(log S − T/S, 0), lse, E_p[z]

All three are O(N·H) or O(N·V/BLOCK_V) memory-bound passes next to the GEMM. None is specialised
on the row count C (`do_not_specialize`): one binary serves every N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["target_logit_kernel", "merge_tiles_kernel", "finish_rows_kernel", "ROW_BLOCK", "TARGET_BLOCK",
           "target_logits", "merge_tiles", "finish_rows"]

ROW_BLOCK = 128          # rows per program of the merge and finish kernels
TARGET_BLOCK = (16, 128)  # [rows, H columns] per step of the target-logit kernel


@triton.jit(do_not_specialize=["C"])
def target_logit_kernel(
    h_ptr, w_ptr, y_ptr, c_ptr,         # data ptrs: hidden [C, H], weight [V, H], targets [C] int64; out c [C] fp32
    C, H,                               # shapes
    stride_hn, stride_hk, stride_wv, stride_wk,  # strides
    inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < C
    y = tl.load(y_ptr + rows, mask=ok, other=0)
    # int64 offsets: C·H and V·H pass 2^31 at 128k tokens or 256k vocabularies.
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
    w_rows = w_ptr + y.to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        m = ok[:, None] & (ks < H)[None, :]
        hv = tl.load(h_rows + ks[None, :] * stride_hk, mask=m, other=0.0).to(tl.float32)
        wv = tl.load(w_rows + ks[None, :] * stride_wk, mask=m, other=0.0).to(tl.float32)
        acc += hv * wv
    tl.store(c_ptr + rows, tl.sum(acc, axis=1) * inv_temp, mask=ok)


@triton.jit(do_not_specialize=["C"])
def merge_tiles_kernel(
    s_ptr, t_ptr,                       # data ptrs: per-tile partials [TILES, C] fp32
    s_out, t_out,                       # out ptrs: [C] fp32
    C, n_tiles,                         # shapes
    HAS_T: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < C
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    t = tl.zeros((BLOCK,), dtype=tl.float32)
    s_ptrs = s_ptr + rows
    t_ptrs = t_ptr + rows
    for _ in range(0, n_tiles):   # tile order: the one association of the sum, whatever C is
        s += tl.load(s_ptrs, mask=ok, other=0.0)
        s_ptrs += C               # pointer arithmetic is 64-bit: TILES·C may pass 2^31
        if HAS_T:
            t += tl.load(t_ptrs, mask=ok, other=0.0)
            t_ptrs += C
    tl.store(s_out + rows, s, mask=ok)
    if HAS_T:
        tl.store(t_out + rows, t, mask=ok)


@triton.jit(do_not_specialize=["C"])
def finish_rows_kernel(
    c_ptr, shift_ptr, s_ptr, t_ptr,     # data ptrs: [C] fp32 each (t unused without HAS_T)
    logp_ptr, ent_ptr, lse_ptr, ez_ptr,  # out ptrs: [C] fp32 each (ent, ez unused without HAS_T)
    C,                                  # shapes
    HAS_T: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < C
    c = tl.load(c_ptr + rows, mask=ok, other=0.0)
    shift = tl.load(shift_ptr + rows, mask=ok, other=0.0)
    s = tl.load(s_ptr + rows, mask=ok, other=1.0)
    log_s = tl.log(s)
    tl.store(logp_ptr + rows, -shift - log_s, mask=ok)
    tl.store(lse_ptr + rows, c + shift + log_s, mask=ok)
    if HAS_T:
        mean = tl.load(t_ptr + rows, mask=ok, other=0.0) / s     # E_p[z − c − shift]
        # H = log S − T/S ≥ 0; near-one-hot rows can dip a few ulps below zero in fp32
        tl.store(ent_ptr + rows, tl.maximum(log_s - mean, 0.0), mask=ok)
        tl.store(ez_ptr + rows, c + shift + mean, mask=ok)


def target_logits(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """h: [C, H], w: [V, H], y: [C] int64 in [0, V) → c = h·W[y]ᵀ/τ, [C] fp32."""
    C, H = h.shape
    c = torch.empty(C, device=h.device, dtype=torch.float32)
    if C:
        target_logit_kernel[(triton.cdiv(C, TARGET_BLOCK[0]),)](
            h, w, y, c, C, H, h.stride(0), h.stride(1), w.stride(0), w.stride(1), inv_temp,
            BLOCK_N=TARGET_BLOCK[0], BLOCK_H=TARGET_BLOCK[1], num_warps=4)
    return c


def merge_tiles(s_part: torch.Tensor, t_part: torch.Tensor | None):
    """Per-tile partials [TILES, C] fp32 (contiguous) → (S, T or None), each [C] fp32, summed
    over the tiles in order."""
    tiles, C = s_part.shape
    s = torch.empty(C, device=s_part.device, dtype=torch.float32)
    t = torch.empty_like(s) if t_part is not None else None
    if C:
        merge_tiles_kernel[(triton.cdiv(C, ROW_BLOCK),)](
            s_part, s_part if t_part is None else t_part, s, s if t is None else t, C, tiles,
            HAS_T=t_part is not None, BLOCK=ROW_BLOCK, num_warps=4)
    return s, t


def finish_rows(c, shift, s, t):
    """(logp, entropy or None, lse, E_p[z] or None), each [C] fp32, from the shifted sums."""
    C = c.shape[0]
    logp, lse = torch.empty_like(c), torch.empty_like(c)
    ent = torch.empty_like(c) if t is not None else None
    ez = torch.empty_like(c) if t is not None else None
    if C:
        finish_rows_kernel[(triton.cdiv(C, ROW_BLOCK),)](
            c, shift, s, s if t is None else t, logp, logp if ent is None else ent, lse, lse if ez is None else ez,
            C, HAS_T=t is not None, BLOCK=ROW_BLOCK, num_warps=4)
    return logp, ent, lse, ez
