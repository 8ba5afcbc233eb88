"""The Triton kernels of `linear_logprobs` (kernels/linear_logprob.py has the math, the
configurations and the launchers).

    logprob_fwd_kernel   one pass over a vocabulary slice per program: the online-softmax
                         partials (m, s, t, z_y) of its rows, merged across slices afterwards
    dlogits_kernel       dz/τ of one vocabulary chunk, tile by tile, for the cuBLAS GEMMs of the
                         backward
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import grouped_tile, logit_tile

__all__ = ["logprob_fwd_kernel", "dlogits_kernel"]


@triton.jit
def _dot_sub(h, w_ptr, cols, v_hi, ks, k_ok, stride_wv, stride_wk, acc, DOT_PRECISION: tl.constexpr):
    """acc + h · W[cols, ks]ᵀ: one K step of one sub-tile (weight rows past v_hi load as 0)."""
    w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wv + ks[None, :] * stride_wk,
                mask=(cols < v_hi)[:, None] & k_ok[None, :], other=0.0)
    return tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)


@triton.jit
def _online_update(acc, cols, v_hi, y, m2, s, t2, zy2, scale2, HAS_ENTROPY: tl.constexpr):
    """Fold one [BLOCK_N, width] fp32 logit tile (the raw dot products) into the running base-2
    online-softmax state (m2, s, t2, zy2) of its rows; returns the new state."""
    # Padded columns hold z = 0 (their weight rows load as 0): excluded from the max, and their
    # e is set to 0, so no −inf ever enters the tile (−inf·0 would be NaN in z·e).
    col_ok = cols < v_hi
    z2 = acc * scale2
    # Every tile has at least one valid column, so m_new is finite.
    m_new = tl.maximum(m2, tl.max(tl.where(col_ok[None, :], z2, float("-inf")), axis=1))
    alpha = tl.exp2(m2 - m_new)
    e = tl.where(col_ok[None, :], tl.exp2(z2 - m_new[:, None]), 0.0)
    s = s * alpha + tl.sum(e, axis=1)
    if HAS_ENTROPY:
        t2 = t2 * alpha + tl.sum(z2 * e, axis=1)
    zy2 += tl.sum(tl.where(cols[None, :] == y[:, None], z2, 0.0), axis=1)
    return m_new, s, t2, zy2


@triton.jit
def _fold_open(acc, first, SUB: tl.constexpr, v_hi, y, m2, s, t2, zy2, scale2, HAS_ENTROPY: tl.constexpr):
    """_online_update of the sub-tile of columns [first, first + SUB), skipped when it lies wholly
    past v_hi (in a ragged last tile): the update needs at least one valid column."""
    if first < v_hi:
        m2, s, t2, zy2 = _online_update(acc, first + tl.arange(0, SUB), v_hi, y, m2, s, t2, zy2, scale2,
                                        HAS_ENTROPY)
    return m2, s, t2, zy2


@triton.jit
def logprob_fwd_kernel(
    h_ptr, w_ptr, y_ptr,                # data ptrs: hidden [N, H], weight [V, H], targets [N] int64
    m_ptr, s_ptr, t_ptr, zy_ptr,        # out ptrs: per-slice partials [SPLITS, N] fp32
    N, V, H, v_per_split, n_splits,     # shapes
    stride_hn, stride_hk, stride_wv, stride_wk,  # strides
    scale2,                             # log2(e)/τ: the accumulator times this is z in base-2 units
    HAS_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    SUB_TILES: tl.constexpr,            # 1, 2 or 4: the vocabulary tile as that many column slices
):
    pid_n, pid_s = _slices_fastest(tl.program_id(0), n_splits, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int32)  # ids < V < 2^31
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    k_tiles = tl.cdiv(H, BLOCK_K)
    # int64 offsets: N·H and V·H pass 2^31 at 128k tokens or 256k vocabularies.
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
    SUB: tl.constexpr = BLOCK_V // SUB_TILES

    # Online softmax in base 2 (exp2 is the hardware's instruction; log2(e)/τ is folded into one
    # scale): m2 = max z·log2(e), s = Σ 2^(z2 − m2) = Σ e^(z − m), t2 = Σ z2·2^(z2 − m2).
    m2 = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # SUB_TILES accumulators of [BLOCK_N, SUB] instead of one [BLOCK_N, BLOCK_V]: each K step of
    # h is loaded once for all of them (the full tile's operand reuse), but each sub-tile's
    # epilogue needs only [BLOCK_N, SUB] temporaries, which keeps a 128×256 tile (128 accumulator
    # registers per thread at 8 warps) within the register file.
    acc0 = tl.zeros((BLOCK_N, SUB), dtype=tl.float32)
    if SUB_TILES >= 2:
        acc1 = tl.zeros((BLOCK_N, SUB), dtype=tl.float32)
    if SUB_TILES == 4:
        acc2 = tl.zeros((BLOCK_N, SUB), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N, SUB), dtype=tl.float32)
    # One flat loop over (vocabulary tile, K step) rather than two nested ones, so the software
    # pipeline keeps loading the next tile's operands while this tile's epilogue runs.
    n_iter = tl.cdiv(v_hi - v_lo, BLOCK_V) * k_tiles
    for it in range(0, n_iter):
        ki = it % k_tiles
        v0 = v_lo + (it // k_tiles) * BLOCK_V
        c0 = v0 + tl.arange(0, SUB)
        ks = ki * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        h = tl.load(h_rows + ks[None, :] * stride_hk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc0 = _dot_sub(h, w_ptr, c0, v_hi, ks, k_ok, stride_wv, stride_wk, acc0, DOT_PRECISION)
        if SUB_TILES >= 2:
            acc1 = _dot_sub(h, w_ptr, c0 + SUB, v_hi, ks, k_ok, stride_wv, stride_wk, acc1, DOT_PRECISION)
        if SUB_TILES == 4:
            acc2 = _dot_sub(h, w_ptr, c0 + 2 * SUB, v_hi, ks, k_ok, stride_wv, stride_wk, acc2, DOT_PRECISION)
            acc3 = _dot_sub(h, w_ptr, c0 + 3 * SUB, v_hi, ks, k_ok, stride_wv, stride_wk, acc3, DOT_PRECISION)
        if ki == k_tiles - 1:
            # The first sub-tile always holds a valid column; the others may not (`_fold_open`).
            m2, s, t2, zy2 = _online_update(acc0, c0, v_hi, y, m2, s, t2, zy2, scale2, HAS_ENTROPY)
            acc0 = tl.zeros((BLOCK_N, SUB), dtype=tl.float32)
            if SUB_TILES >= 2:
                m2, s, t2, zy2 = _fold_open(acc1, v0 + SUB, SUB, v_hi, y, m2, s, t2, zy2, scale2, HAS_ENTROPY)
                acc1 = tl.zeros((BLOCK_N, SUB), dtype=tl.float32)
            if SUB_TILES == 4:
                m2, s, t2, zy2 = _fold_open(acc2, v0 + 2 * SUB, SUB, v_hi, y, m2, s, t2, zy2, scale2, HAS_ENTROPY)
                m2, s, t2, zy2 = _fold_open(acc3, v0 + 3 * SUB, SUB, v_hi, y, m2, s, t2, zy2, scale2, HAS_ENTROPY)
                acc2 = tl.zeros((BLOCK_N, SUB), dtype=tl.float32)
                acc3 = tl.zeros((BLOCK_N, SUB), dtype=tl.float32)

    _store_partials(m_ptr, s_ptr, t_ptr, zy_ptr, pid_s.to(tl.int64) * N + rows, row_ok, m2, s, t2, zy2,
                    HAS_ENTROPY)



@triton.jit
def _slices_fastest(pid, n_splits, GROUP_N: tl.constexpr):
    """(row tile, vocabulary slice) of program `pid`: groups of GROUP_N row tiles × all slices,
    slices fastest within a group. The programs resident at once then share GROUP_N hidden tiles
    (re-read for every vocabulary tile, so they must stay in L2) and read each weight slice once
    for all GROUP_N row tiles."""
    per_group = GROUP_N * n_splits
    return (pid // per_group) * GROUP_N + (pid % per_group) // n_splits, pid % n_splits


@triton.jit
def _store_partials(m_ptr, s_ptr, t_ptr, zy_ptr, out, row_ok, m2, s, t2, zy2, HAS_ENTROPY: tl.constexpr):
    """Store one slice's online-softmax state at offsets `out` (int64: SPLITS·N may pass 2^31),
    converted from base-2 to natural-log units."""
    LN2: tl.constexpr = 0.6931471805599453
    tl.store(m_ptr + out, m2 * LN2, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(zy_ptr + out, zy2 * LN2, mask=row_ok)
    if HAS_ENTROPY:
        tl.store(t_ptr + out, t2 * LN2, mask=row_ok)


@triton.jit
def dlogits_kernel(
    h_ptr, w_ptr, y_ptr,                # data ptrs: hidden [N, H], weight [V, H], targets [N] int64
    lse_ptr, g_ptr, gh_ptr, ez_ptr,     # row vectors [N] fp32: lse, ∂L/∂logp, ∂L/∂H, E_p[z]
    dz_ptr,                             # out ptr: dz/τ for columns [v_lo, v_hi): [N, v_hi − v_lo]
    N, H, v_lo, v_hi,                   # shapes
    stride_hn, stride_hk, stride_wv, stride_wk, stride_dzn,  # strides
    inv_temp,
    HAS_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(v_hi - v_lo, BLOCK_V), GROUP_N)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < v_hi
    z = logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H,
                   stride_hn, stride_hk, stride_wv, stride_wk,
                   BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION) * inv_temp

    y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)   # 0 on ignored rows (set by the launcher)
    # Natural exp here, not exp2 as in the forward: with the base-2 form the entropy variant
    # spilled 8–48 B per thread on sm_90 (offline compile), the natural one none.
    p = tl.exp(z - lse[:, None])
    coef = g[:, None]
    if HAS_ENTROPY:
        gh = tl.load(gh_ptr + rows, mask=row_ok, other=0.0)
        ez = tl.load(ez_ptr + rows, mask=row_ok, other=0.0)
        coef = coef + gh[:, None] * (z - ez[:, None])
    dz = tl.where(cols[None, :] == y[:, None], g[:, None], 0.0) - p * coef
    dz = dz * inv_temp
    out = dz_ptr + rows.to(tl.int64)[:, None] * stride_dzn + (cols - v_lo)[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
