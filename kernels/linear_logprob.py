r"""Fused LM head + log-prob gather (+ entropy), forward and backward, without `[N, V]` logits.

Math (shared/DESIGN.md). Rows n = 0..N-1 are packed tokens, h[n] the final hidden state,
W the [V, H] LM-head weight, y[n] the next token, τ the temperature:

    z[n, v] = h[n]·W[v] / τ          lse[n] = log Σ_v exp z[n, v]
    logp[n] = z[n, y[n]] − lse[n]    H[n]   = lse[n] − Σ_v p[n, v] z[n, v]

Forward (one pass over the vocabulary, online). A program owns a tile of BLOCK_N rows and one
slice of the vocabulary; for each [BLOCK_N, BLOCK_V] logit tile (tensor-core dots, fp32
accumulation) it updates the running max m, s = Σ exp(z − m), t = Σ z·exp(z − m) and picks
z[n, y[n]] out of the tile where the column matches. The slices' (m, s, t, z_y) are merged
afterwards: lse = M + log Σ s·e^{m−M}, H = lse − Σ t·e^{m−M} / Σ s·e^{m−M}. How the grid is laid
out (v2, issue 13): programs come in groups of GROUP_N = 8 row tiles × all S slices, slices
fastest, with S ≈ SMs / GROUP_N (17 at the reference shapes), so the programs resident at once
share 8 hidden tiles (re-read for every vocabulary tile: they stay in L2) and read each weight
slice once for all 8 row tiles; the loop runs over (vocabulary tile, K step) flat, so the next
tile's loads are in flight during a tile's epilogue; the softmax runs in base 2 (exp2, with
log2(e)/τ folded into one scale); a 128×256 tile is multiplied and reduced as four 128×64 column
slices, which keeps it out of local memory. Splitting the vocabulary also keeps every SM busy
when N is small (N = 1 is a legal input). `PROLIX_LLP_CONFIG=v1` selects the tiles and split
policy measured before (see `config_variant`).

Backward. With g = ∂L/∂logp and g_H = ∂L/∂H per row, p = exp(z − lse) and E[z] = lse − H:

    ∂L/∂z[n, v] = g[n]·(1[v = y[n]] − p) − g_H[n]·p·(z − E[z])        (the entropy term: ∂H/∂z_v = −p_v (z_v − E[z]))
    dh = (∂L/∂z)·W / τ                  dW = (∂L/∂z)ᵀ·h / τ

dz has to meet both W (for dh) and h (for dW) in a GEMM, and a tile of dz feeds a whole row of
dh and a whole row of dW: accumulating them from the tiles with atomics moves
N·V·H·(1/BLOCK_N + 1/BLOCK_V)·4 bytes — 50× the GEMM's own traffic at the reference shapes.
So the backward walks the vocabulary in chunks: a Triton kernel recomputes the logits of one
chunk tile by tile and writes dz/τ (input dtype) into an [N, V_chunk] buffer, then two
cuBLAS GEMMs consume it: dW[chunk] = dzᵀ·h (written once, no accumulation) and
dh += dz·W[chunk] (fp32 accumulator). V_chunk fills a fixed 1 GiB buffer (v2; v1: 3% of the
fp32 logits, which grows with N).

Cost at N = 16384, H = 1536, V = 151936 (bf16):
    naive:  logits N·V·4 B = 10 GB written and read twice, log_softmax, gather, same in backward.
    here:   FLOP = 4 GEMMs of 2·N·H·V (forward, recompute, dh, dW) = 30.6 TFLOP;
            bytes beyond inputs/grads = O(N) vectors + the dz buffer + fp32 dh (N·H·4 = 0.1 GB).
    DRAM traffic of the v2 forward: h once (50 MB) + W once per group of 8 row tiles
            (16 × 467 MB = 7.5 GB, ~2.3 ms at 3.3 TB/s, under the GEMM's ~11 ms of math).
            h is re-read for every vocabulary tile: 128 row tiles × 594 tiles × 393 KB = 30 GB,
            served by L2 (a group's 8 hidden tiles are 3 MB); v1's 64×128 tiles, rows fastest,
            re-read 256 × 1187 × 197 KB = 60 GB, 132 different tiles resident at once.
    measured, v1 only (H100, commit 13b9302, `python -m prolix.benchmarks.breakdown`,
            `benchmarks/results/20261125-H100-breakdown-13b9302.txt`): one GEMM 10.7 ms; forward
            23 ms, backward ~40 ms, about 6 GEMM-times against the 4 the FLOPs need.
    expected of v2, not yet measured: forward ≈ 1.1–1.3 GEMM-times (the no-grad target is
            ≤ 1.3), backward ≈ 3 (recompute + two cuBLAS GEMMs + ~5 dh re-reads instead of ~17),
            fwd+bwd ≤ 4.6. `python -m prolix.benchmarks.device_check` measures v1, v2 and
            v2-narrow side by side on the first GPU run (benchmarks/README.md).
"""

from __future__ import annotations

import functools
import os
from typing import Literal, NamedTuple, get_args

import torch
import triton
import triton.language as tl

from .streaming import torch_backward, torch_forward

__all__ = ["linear_logprobs", "KernelConfig", "KernelBackend", "BACKENDS", "config_variant", "forward_config",
           "backward_config", "forward_splits"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CONFIG_ENV = "PROLIX_LLP_CONFIG"   # "v2" (default), "v2-narrow" or "v1": see config_variant()
CONFIG_VARIANTS = ("v2", "v2-narrow", "v1")
KernelBackend = Literal["auto", "torch", "triton"]
BACKENDS = get_args(KernelBackend)          # "auto": Triton on CUDA tensors, streaming torch on CPU
_LOG2E = 1.4426950408889634
# The dz buffer of the backward. Each chunk re-reads and re-writes the fp32 dh accumulator, so
# wider chunks are faster: on an H100 at the qwen-1.5b head and N = 16384 the backward took
# 44.1 / 39.7 / 38.4 ms with 1% / 3% / 10% of the fp32 logits (97 / 290 / 970 MB; v1 used 3%).
# v2 takes a fixed 1 GiB, flat in N (the extra-memory target: ≤ 2.5 GB at 16k, flat to 64k).
_BWD_BUFFER_BYTES = 1 << 30
_V1_BUFFER_FRACTION = 0.03
_V1_BUFFER_MIN_BYTES = 64 << 20


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _logit_tile(
    h_ptr, w_ptr,                       # data ptrs: hidden [N, H], weight [V, H]
    rows, cols, row_ok, col_ok,         # [BLOCK_N] / [BLOCK_V] indices (int64) and masks
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
def _logprob_fwd_kernel(
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
def grouped_tile(pid, n_tiles_n, n_tiles_v, GROUP_N: tl.constexpr):
    """(row tile, vocabulary tile) of program `pid` in grouped order: GROUP_N row tiles walk the
    same weight tiles together, so a weight tile is read from L2, not HBM, by the group."""
    group = pid // (GROUP_N * n_tiles_v)
    first_n = group * GROUP_N
    group_size = tl.minimum(n_tiles_n - first_n, GROUP_N)
    pid_n = first_n + (pid % (GROUP_N * n_tiles_v)) % group_size
    pid_v = (pid % (GROUP_N * n_tiles_v)) // group_size
    return pid_n, pid_v


@triton.jit
def _dlogits_kernel(
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
    z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H,
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


# ----------------------------------------------------------------------------- configuration


class KernelConfig(NamedTuple):
    """Tile sizes and launch parameters of one kernel."""

    block_n: int      # rows (tokens) per tile
    block_v: int      # vocabulary columns per tile
    block_k: int      # hidden-size step of the K loop
    num_warps: int
    num_stages: int   # software-pipelining depth of the K loop
    group_n: int = 1  # row tiles per raster group (programs of a group share weight tiles in L2)
    sub_tiles: int = 1  # forward only: the vocabulary tile as 1, 2 or 4 column slices (registers)


def config_variant() -> str:
    """The configuration set in use: `PROLIX_LLP_CONFIG` = "v2" (default), "v2-narrow" or "v1".

    "v1" is the configuration measured on an H100 before issue 13 (forward 64×128 tiles whose
    vocabulary is split only to fill two waves, dz buffer 3% of the fp32 logits); "v2" the
    grouped-raster forward at 128×256 and a fixed 1 GiB dz buffer; "v2-narrow" the same with
    128×128 forward tiles. All run the same kernel code. The variable exists so that
    `python -m prolix.benchmarks.device_check` can time them on the first GPU run; the fastest
    becomes the default then."""
    variant = os.environ.get(CONFIG_ENV, "v2")
    if variant not in CONFIG_VARIANTS:
        raise ValueError(f"{CONFIG_ENV} must be one of {CONFIG_VARIANTS}, got {variant!r}")
    return variant


def forward_config(dtype: torch.dtype, sm: int = 90, variant: str | None = None) -> KernelConfig:
    """Tiles of the forward kernel.

    History (v1), measured with `python -m prolix.benchmarks.breakdown --sweep` on an H100
    (qwen-1.5b head, N = 16384, bf16; one cuBLAS GEMM of the same shape = 10.7 ms), with the
    nested-loop kernel and row tiles fastest:

        64×128 tiles, K step 64, 4 warps, 4 stages    23.2 ms   (8 B of stack: one spilled scalar)
        128×128, 8 warps, 4 stages                     24.1 ms
        128×64,  8 warps, 3 stages (no spill at all)   43.5 ms   (the narrow tile starves wgmma)
        128×256, 8 warps, 3 stages                     21.1 ms   (but ~800 B of stack per thread)

    v2 (not yet timed on a GPU): 128×256 tiles, 8 warps, 3 stages, groups of 8 row tiles, the
    tile multiplied and reduced as four 128×64 column slices. One [128, 256] accumulator plus
    its epilogue temporaries spilled 440–952 B per thread on sm_90 (offline compile), two
    halves 96–192 B, four quarters none (HGMMA in the SASS, 144 KB of shared memory: one
    program per SM). Each K step of h is loaded once for the four dots, so the h traffic is
    that of a 256-wide tile; the price is wgmma at n = 64, which reads its A operand from
    shared memory once per quarter. v2-narrow: 128×128 as one slice (n = 128 wgmma, h traffic
    of a 128-wide tile), also spill-free. Expected of either: about 1.1–1.3 GEMM-times at the
    reference shapes, against v1's 2.2; which is faster is for the first GPU run to say.
    Before Hopper (sm < 90: mma.sync, no wgmma) v2 is 128×128 in two halves at 8 warps.
    fp32 inputs (no 16-bit tensor-core path) use 64×64 tiles that fit without spilling."""
    variant = variant or config_variant()
    if dtype == torch.float32:
        return KernelConfig(64, 64, 32, 4, 2, group_n=1 if variant == "v1" else 8)
    if variant == "v1":
        return KernelConfig(64, 128, 64, 4, 4)
    if sm < 90:
        return KernelConfig(128, 128, 64, 8, 3, group_n=8, sub_tiles=2)
    if variant == "v2-narrow":
        return KernelConfig(128, 128, 64, 8, 3, group_n=8)
    return KernelConfig(128, 256, 64, 8, 3, group_n=8, sub_tiles=4)


def backward_config(dtype: torch.dtype, sm: int = 90, variant: str | None = None) -> KernelConfig:
    """Tiles of the dz kernel, a GEMM tile with an elementwise epilogue; same measurement (v1):
    128×256 (8 warps, 3 stages) 40.9 ms for the whole backward vs 46.0 ms with 128×128. Before
    Hopper (no wgmma, accumulators in more registers) 128×256 spills, so sm < 90 keeps 128×128.
    The tile is already the largest that fits the register file (a 256×256 fp32 accumulator is
    128 registers per thread at 16 warps, the whole budget), so v2 keeps it and widens the
    vocabulary chunks instead (`_chunk_width`)."""
    if dtype == torch.float32:
        return KernelConfig(64, 128, 32, 8, 2, group_n=8)
    return KernelConfig(128, 256, 64, 8, 3, group_n=8) if sm >= 90 else KernelConfig(128, 128, 64, 8, 3, group_n=8)


def forward_splits(N: int, V: int, cfg: KernelConfig, target: int, variant: str | None = None) -> tuple[int, int]:
    """(vocabulary slices, columns per slice, a multiple of block_v) of the forward grid.

    v2: one wave of `target` programs spans `group_n` row tiles × all slices, so the slices
    number target / group_n (at N = 16384, qwen-1.5b, 132 SMs: 17 slices of 35 tiles of 256);
    fewer row tiles than a group (small N) get more slices, up to one tile per slice.
    v1: split only as far as needed to fill `target` programs (measured on an H100: splitting
    further with row tiles fastest was slower, 28.8 vs 23.5 ms at qwen-1.5b, 90 vs 52 ms at
    llama-8b, N = 16384)."""
    n_tiles = triton.cdiv(N, cfg.block_n)
    max_splits = triton.cdiv(V, cfg.block_v)
    rows_per_wave = n_tiles if (variant or config_variant()) == "v1" else min(n_tiles, cfg.group_n)
    splits = max(1, min(max_splits, triton.cdiv(target, rows_per_wave)))
    v_per_split = triton.cdiv(triton.cdiv(V, splits), cfg.block_v) * cfg.block_v
    return triton.cdiv(V, v_per_split), v_per_split


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting, so the fp32 kernels agree with `h @ W.T`.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _sm(device: torch.device) -> int:
    """Compute capability as an integer (90 = Hopper); the interpreter takes Hopper's configs."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device, variant: str) -> int:
    """Programs per wave: v2's 128×256 tiles fill an SM each (~150 KB of shared memory), v1 asked
    for two waves. The interpreter (CPU tensors) gets a small number so that tests exercise the
    vocabulary split and merge at small shapes."""
    if device.type != "cuda":
        return 4
    return (2 if variant == "v1" else 1) * _num_sms(device.index or 0)


# ----------------------------------------------------------------------------- triton backend


def triton_forward(h, w, y, inv_temp, with_entropy):
    """h: [N, H], w: [V, H], y: [N] int64 → (z_y, lse, E_p[z] or None), each [N] fp32."""
    N, H = h.shape
    V = w.shape[0]
    variant = config_variant()
    cfg = forward_config(h.dtype, _sm(h.device), variant)
    splits, v_per_split = forward_splits(N, V, cfg, _target_programs(h.device, variant), variant)
    part = torch.empty((4 if with_entropy else 3, splits, N), device=h.device, dtype=torch.float32)
    m, s, zy = part[0], part[1], part[2]
    t = part[3] if with_entropy else s  # unused pointer when HAS_ENTROPY is False
    _logprob_fwd_kernel[(triton.cdiv(N, cfg.block_n) * splits,)](
        h, w, y, m, s, t, zy,
        N, V, H, v_per_split, splits,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1),
        inv_temp * _LOG2E,
        HAS_ENTROPY=with_entropy, DOT_PRECISION=_dot_precision(h.dtype),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP_N=cfg.group_n,
        SUB_TILES=cfg.sub_tiles, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _merge_partials(m, s, t if with_entropy else None, zy)


def _merge_partials(m, s, t, zy):
    """Merge per-slice online-softmax partials [SPLITS, N] into per-row (z_y, lse, E_p[z])."""
    m_max = m.max(dim=0).values                     # (N,)
    scale = torch.exp(m - m_max)                    # (SPLITS, N); empty slices have m = −inf → 0
    s_tot = (s * scale).sum(dim=0)
    lse = m_max + torch.log(s_tot)
    mean_z = (t * scale).sum(dim=0) / s_tot if t is not None else None
    return zy.sum(dim=0), lse, mean_z


def _chunk_width(N: int, V: int, elt: int, block_v: int, variant: str | None = None) -> int:
    """Vocabulary columns per backward chunk: the [N, width] dz buffer fills the byte budget.

    v2: a fixed `_BWD_BUFFER_BYTES` (1 GiB: ~5 chunks at N = 16384, V = 151936, bf16), so the
    buffer is flat in N and the fp32 dh accumulator is re-read ~5 times instead of ~17.
    v1: `_V1_BUFFER_FRACTION` of the fp32 logits, at least `_V1_BUFFER_MIN_BYTES` (grows with N)."""
    if (variant or config_variant()) == "v1":
        budget = max(_V1_BUFFER_FRACTION * N * V * 4, _V1_BUFFER_MIN_BYTES)
    else:
        budget = _BWD_BUFFER_BYTES
    width = int(budget // (N * elt)) // block_v * block_v
    return max(block_v, min(width, triton.cdiv(V, block_v) * block_v))


def triton_backward(h, w, y, lse, g, gh, ez, inv_temp, need_dh, need_dw):
    """dz by vocabulary chunk (Triton), then dW[chunk] = dzᵀh and dh += dz·W[chunk] (cuBLAS)."""
    N, H = h.shape
    V = w.shape[0]
    variant = config_variant()
    cfg = backward_config(h.dtype, _sm(h.device), variant)
    with_entropy = gh is not None
    width = _chunk_width(N, V, h.element_size(), cfg.block_v, variant)
    dz_buf = torch.empty((N, min(width, V)), device=h.device, dtype=h.dtype)
    dh = torch.zeros((N, H), device=h.device, dtype=torch.float32) if need_dh else None
    dw = torch.empty_like(w) if need_dw else None
    for v_lo in range(0, V, width):
        v_hi = min(v_lo + width, V)
        dz = dz_buf[:, : v_hi - v_lo]
        grid = (triton.cdiv(N, cfg.block_n) * triton.cdiv(v_hi - v_lo, cfg.block_v),)
        _dlogits_kernel[grid](
            h, w, y, lse, g, gh if with_entropy else g, ez if with_entropy else g, dz,
            N, H, v_lo, v_hi,
            h.stride(0), h.stride(1), w.stride(0), w.stride(1), dz.stride(0),
            inv_temp,
            HAS_ENTROPY=with_entropy, DOT_PRECISION=_dot_precision(h.dtype),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP_N=cfg.group_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if need_dw:
            torch.mm(dz.T, h, out=dw[v_lo:v_hi])
        if need_dh:
            dh = _accumulate_dh(dh, dz, w[v_lo:v_hi])
    return dh, dw


@functools.lru_cache(maxsize=None)
def _has_fp32_out_addmm(device_type: str) -> bool:
    """Whether torch.addmm takes out_dtype=fp32 for 16-bit operands here (CUDA, torch ≥ 2.8)."""
    if device_type != "cuda":
        return False
    try:
        a = torch.zeros(16, 16, device="cuda", dtype=torch.bfloat16)
        torch.addmm(torch.zeros(16, 16, device="cuda"), a, a, out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _accumulate_dh(dh: torch.Tensor, dz: torch.Tensor, w_chunk: torch.Tensor) -> torch.Tensor:
    """dh (fp32) + dz·W[chunk]: one cuBLAS call accumulating in fp32 where torch offers it,
    else a 16-bit product added in fp32 (one extra rounding of each chunk's partial sum)."""
    if dh.dtype == dz.dtype:
        return dh.addmm_(dz, w_chunk)
    if _has_fp32_out_addmm(dh.device.type):
        return torch.addmm(dh, dz, w_chunk, out_dtype=torch.float32)
    return dh.add_(dz @ w_chunk)


# ----------------------------------------------------------------------------- autograd


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, with_entropy, backend):
        inv_temp = 1.0 / temperature
        valid = targets != ignore_index
        fwd = triton_forward if backend == "triton" else torch_forward
        zy, lse, mean_z = fwd(hidden, weight, targets, inv_temp, with_entropy)
        logp = torch.where(valid, zy - lse, 0.0)
        # H = lse − E[z] ≥ 0; for near-one-hot rows both terms are large and the fp32 difference
        # can dip a few ulps below zero.
        entropy = torch.where(valid, (lse - mean_z).clamp_min(0.0), 0.0) if with_entropy else None
        ctx.save_for_backward(hidden, weight, targets, lse, mean_z if with_entropy else lse)
        ctx.inv_temp, ctx.ignore_index, ctx.with_entropy, ctx.backend = (
            inv_temp, ignore_index, with_entropy, backend)
        ctx.set_materialize_grads(False)
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, targets, lse, mean_z = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_entropy is None and grad_logp is None or not (need_dh or need_dw):
            return None, None, None, None, None, None, None
        valid = targets != ctx.ignore_index
        # Ignored rows contribute nothing: zero their incoming gradients once, here.
        g = torch.zeros_like(lse) if grad_logp is None else torch.where(valid, grad_logp.float(), 0.0)
        gh = None
        if grad_entropy is not None:
            gh = torch.where(valid, grad_entropy.float(), 0.0)
        bwd = triton_backward if ctx.backend == "triton" else torch_backward
        dh, dw = bwd(hidden, weight, targets, lse, g.contiguous(), gh, mean_z if gh is not None else None,
                     ctx.inv_temp, need_dh, need_dw)
        dh = dh.to(hidden.dtype) if dh is not None else None
        dw = dw.to(weight.dtype) if dw is not None else None
        return dh, dw, None, None, None, None, None


# ----------------------------------------------------------------------------- public function


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_inputs(hidden, weight, targets, temperature, ignore_index, backend) -> str:
    """Validate before any launch; returns the resolved backend."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
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
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = hidden.device.type == "cuda"
    if backend == "auto":
        backend = "triton" if on_cuda else "torch"
    if backend == "triton" and not (on_cuda or _interpreting()):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {hidden.device}")
    capturing = on_cuda and torch.cuda.is_current_stream_capturing()
    if targets.numel() and not capturing:
        bad = ((targets < 0) | (targets >= weight.shape[0])) & (targets != ignore_index)
        if bool(bad.any()):
            first = targets[bad][0].item()
            raise ValueError(f"targets must lie in [0, {weight.shape[0]}) or equal ignore_index="
                             f"{ignore_index}, found {first}")
    return backend


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
):
    """Per-token log p(targets | hidden) under softmax(hidden·Wᵀ/τ), without [N, V] logits.

    Args:
        hidden: [..., H] fp32, bf16 or fp16 final hidden states (any leading shape; packed
            rows [N, H] are the common case).
        weight: [V, H] the LM-head weight, same dtype and device as `hidden`.
        targets: [...] integer next-token ids, shaped like `hidden.shape[:-1]`; rows equal to
            `ignore_index` give 0 and receive no gradient.
        temperature: τ > 0; logits are divided by it (use the sampling temperature).
        ignore_index: the target value that marks a row to skip.
        return_entropy: also return the entropy of softmax(z) per row (differentiable).
        backend: "triton" (CUDA; CPU only under TRITON_INTERPRET=1), "torch" (streams over
            token and vocabulary chunks, fp32 accumulation, any device) or "auto" (triton on
            CUDA, torch elsewhere).

    Returns:
        logp: [...] fp32, or (logp, entropy) both [...] fp32 with `return_entropy=True`.
        Differentiable in `hidden` and `weight`; a weight with requires_grad=False costs no
        weight-gradient GEMM.

    Raises:
        TypeError / ValueError naming the argument, before any kernel launch: dtypes, shapes,
        devices, targets outside [0, V) other than `ignore_index`, temperature ≤ 0.
    """
    backend = _check_inputs(hidden, weight, targets, temperature, ignore_index, backend)
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])                  # (N, H)
    y = targets.reshape(-1).to(torch.int64).contiguous()      # (N,)
    if y.numel() == 0:
        # Still part of the graph, so backward() on an empty micro-batch gives zero gradients.
        empty = hidden.new_zeros(lead, dtype=torch.float32) + 0.0 * (hidden.sum() + weight[:0].sum())
        return (empty, empty.clone()) if return_entropy else empty
    out = _LinearLogprobs.apply(h, weight, y, float(temperature), int(ignore_index),
                                bool(return_entropy), backend)
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)
