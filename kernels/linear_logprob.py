r"""Fused LM head + log-prob gather (+ entropy), forward and backward, without `[N, V]` logits.

Rows n = 0..N-1 are packed tokens, h[n] the final hidden state, W the [V, H] LM-head weight,
y[n] the next token, τ the temperature:

    z[n, v] = h[n]·W[v] / τ          lse[n] = log Σ_v exp z[n, v]
    logp[n] = z[n, y[n]] − lse[n]    H[n]   = lse[n] − Σ_v p[n, v] z[n, v]

Forward (one pass over the vocabulary, online). A program owns a tile of BLOCK_N rows and one
slice of the vocabulary; for each [BLOCK_N, BLOCK_V] logit tile (tensor-core dots, fp32
accumulation) it updates the running max m, s = Σ exp(z − m), t = Σ z·exp(z − m) and picks
z[n, y[n]] out of the tile where the column matches. The slices' (m, s, t, z_y) are merged
afterwards: lse = M + log Σ s·e^{m−M}, H = lse − Σ t·e^{m−M} / Σ s·e^{m−M}. Programs come in
groups of GROUP_N row tiles × all S slices, slices fastest, with S ≈ SMs / GROUP_N, so the
programs resident at once share GROUP_N hidden tiles (re-read for every vocabulary tile: they
stay in L2) and read each weight slice once for the whole group; the loop runs over (vocabulary
tile, K step) flat, so the next tile's loads are in flight during a tile's epilogue; the softmax
runs in base 2 (exp2, with log2(e)/τ folded into one scale); a 128×256 tile is multiplied and
reduced as four 128×64 column slices, which keeps it out of local memory. Splitting the
vocabulary also keeps every SM busy when N is small (N = 1 is a legal input).

Backward. With g = ∂L/∂logp and g_H = ∂L/∂H per row, p = exp(z − lse) and E[z] = lse − H:

    ∂L/∂z[n, v] = g[n]·(1[v = y[n]] − p) − g_H[n]·p·(z − E[z])        (the entropy term: ∂H/∂z_v = −p_v (z_v − E[z]))
    dh = (∂L/∂z)·W / τ                  dW = (∂L/∂z)ᵀ·h / τ

dz has to meet both W (for dh) and h (for dW) in a GEMM, and a tile of dz feeds a whole row of
dh and a whole row of dW: accumulating them from the tiles with atomics moves
N·V·H·(1/BLOCK_N + 1/BLOCK_V)·4 bytes, 50× the GEMM's own traffic at the reference shapes.
So the backward walks the vocabulary in chunks: a Triton kernel recomputes the logits of one
chunk tile by tile and writes dz/τ (input dtype) into an [N, V_chunk] buffer, then two
cuBLAS GEMMs consume it: dW[chunk] = dzᵀ·h (written once, no accumulation) and
dh += dz·W[chunk] (fp32 accumulator). V_chunk fills a fixed 1 GiB buffer.

Batch-invariant mode (`batch_invariant=True`). The forward above splits the vocabulary by the
number of rows, so a row's bits follow N. In this mode the forward is the three-GEMM loss's own
pass instead (`invariant_forward`, kernels/three_gemm.py): logp = −log Σ_v exp(z − z_y) over
tiles of a fixed shape, their partial sums added in tile order; a row's bits then depend on the
row alone, and `fused_linear_grpo_loss` gives the same ones. The backward is the same dz +
cuBLAS path, which has no atomics: deterministic run to run.

Cost at N = 16384, H = 1536, V = 151936 (bf16):
    naive:  logits N·V·4 B = 10 GB written and read twice, log_softmax, gather, same in backward.
    here:   FLOP = 4 GEMMs of 2·N·H·V (forward, recompute, dh, dW) = 30.6 TFLOP;
            bytes beyond inputs/grads = O(N) vectors + the dz buffer + fp32 dh (N·H·4 = 0.1 GB).
    DRAM traffic of the forward: h once (50 MB) + W once per group of 8 row tiles
            (16 × 467 MB = 7.5 GB, ~2.3 ms at 3.3 TB/s, under the GEMM's ~11 ms of math);
            h is re-read for every vocabulary tile (30 GB), served by L2 (a group's 8 hidden
            tiles are 3 MB).
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from ._common import (
    BACKENDS,
    INVARIANT_ROWS,
    KernelBackend,
    KernelConfig,
    addmm_fp32,
    check_lm_head_inputs,
    dot_precision,
    pad_rows,
    resolve_batch_invariant,
    sm_version,
)
from .logprob_kernels import dlogits_kernel, logprob_fwd_kernel
from .streaming import torch_backward, torch_forward
from .three_gemm import row_values, shifted_stats

__all__ = ["linear_logprobs", "KernelConfig", "KernelBackend", "BACKENDS", "config_variant", "forward_config",
           "backward_config", "forward_splits", "chunk_width", "BWD_BUFFER_BYTES", "CONFIG_ENV", "CONFIG_VARIANTS",
           "invariant_forward"]

CONFIG_ENV = "PROLIX_LLP_CONFIG"   # "v2" (default), "v2-narrow" or "v1": see config_variant()
CONFIG_VARIANTS = ("v2", "v2-narrow", "v1")
_LOG2E = 1.4426950408889634
# The dz buffer of the backward. Each chunk re-reads and re-writes the fp32 dh accumulator, so
# wider chunks are faster; a fixed 1 GiB keeps the extra memory flat in N.
BWD_BUFFER_BYTES = 1 << 30
_V1_BUFFER_FRACTION = 0.03     # v1: the dz buffer as a fraction of the fp32 logits (grows with N)
_V1_BUFFER_MIN_BYTES = 64 << 20
# Rows per call of the batch-invariant Triton forward: its per-tile partials [3, V/128, rows]
# fp32 stay under 60 MB at V = 152k. Any value gives the same bits.
_INVARIANT_CHUNK = 4096


# ----------------------------------------------------------------------------- configuration


def config_variant() -> str:
    """The configuration set in use: `PROLIX_LLP_CONFIG` = "v2" (default), "v2-narrow" or "v1".

    v2 is the default; v2-narrow and v1 stay only until the device check has timed all three on a GPU.
    "v1": 64×128 forward tiles whose vocabulary is split only to fill two waves, and a dz buffer
    of 3% of the fp32 logits; "v2": the grouped-raster forward at 128×256 and a fixed 1 GiB dz
    buffer; "v2-narrow": v2 with 128×128 forward tiles. All run the same kernel code."""
    variant = os.environ.get(CONFIG_ENV, "v2")
    if variant not in CONFIG_VARIANTS:
        raise ValueError(f"{CONFIG_ENV} must be one of {CONFIG_VARIANTS}, got {variant!r}")
    return variant


def forward_config(dtype: torch.dtype, sm: int = 90, variant: str | None = None) -> KernelConfig:
    """Tiles of the forward kernel.

    v2: 128×256 tiles, 8 warps, 3 stages, groups of 8 row tiles, each tile multiplied and reduced
    as four 128×64 column slices. One [128, 256] accumulator with its epilogue temporaries spills
    on sm_90 (offline compile), four quarters do not; each K step of h is loaded once for the
    four dots, so the h traffic is that of a 256-wide tile. v2-narrow: 128×128 as one slice.
    Before Hopper (sm < 90: mma.sync, no wgmma) v2 is 128×128 in two halves. fp32 inputs (no
    16-bit tensor-core path) use 64×64 tiles that fit without spilling."""
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
    """Tiles of the dz kernel, a GEMM tile with an elementwise epilogue: 128×256 on Hopper, the
    largest that fits the register file; before Hopper (no wgmma, accumulators in more registers)
    128×256 spills, so sm < 90 takes 128×128. The variants differ in the chunk width instead
    (`chunk_width`). The K step is the one that spills with neither Triton 3.6 nor 3.9 (offline
    compile, sm_90, registers/stack per thread): 128×256 K64 is 255 + 24 B of stack without the
    entropy under 3.6, K32 245 / 255 registers and none (3.9: 182 / 254, none); fp32 64×128 K32
    spills 8 B with the entropy under 3.6, K16 none (128 registers)."""
    if dtype == torch.float32:
        return KernelConfig(64, 128, 16, 8, 2, group_n=8)
    return KernelConfig(128, 256, 32, 8, 3, group_n=8) if sm >= 90 else KernelConfig(128, 128, 64, 8, 3, group_n=8)


def forward_splits(N: int, V: int, cfg: KernelConfig, target: int, variant: str | None = None) -> tuple[int, int]:
    """(vocabulary slices, columns per slice, a multiple of block_v) of the forward grid.

    v2: one wave of `target` programs spans `group_n` row tiles × all slices, so the slices
    number target / group_n (at N = 16384, qwen-1.5b, 132 SMs: 17 slices of 35 tiles of 256);
    fewer row tiles than a group (small N) get more slices, up to one tile per slice.
    v1: split only as far as needed to fill `target` programs."""
    n_tiles = triton.cdiv(N, cfg.block_n)
    max_splits = triton.cdiv(V, cfg.block_v)
    rows_per_wave = n_tiles if (variant or config_variant()) == "v1" else min(n_tiles, cfg.group_n)
    splits = max(1, min(max_splits, triton.cdiv(target, rows_per_wave)))
    v_per_split = triton.cdiv(triton.cdiv(V, splits), cfg.block_v) * cfg.block_v
    return triton.cdiv(V, v_per_split), v_per_split


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device, variant: str) -> int:
    """Programs per wave: v2's 128×256 tiles fill an SM each (~150 KB of shared memory), v1 asks
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
    cfg = forward_config(h.dtype, sm_version(h.device), variant)
    splits, v_per_split = forward_splits(N, V, cfg, _target_programs(h.device, variant), variant)
    part = torch.empty((4 if with_entropy else 3, splits, N), device=h.device, dtype=torch.float32)
    m, s, zy = part[0], part[1], part[2]
    t = part[3] if with_entropy else s  # unused pointer when HAS_ENTROPY is False
    logprob_fwd_kernel[(triton.cdiv(N, cfg.block_n) * splits,)](
        h, w, y, m, s, t, zy,
        N, V, H, v_per_split, splits,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1),
        inv_temp * _LOG2E,
        HAS_ENTROPY=with_entropy, DOT_PRECISION=dot_precision(h.dtype),
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



def chunk_width(N: int, V: int, elt: int, block_v: int, variant: str | None = None) -> int:
    """Vocabulary columns per backward chunk: the [N, width] dz buffer fills the byte budget.

    v2: a fixed `BWD_BUFFER_BYTES` (1 GiB: ~5 chunks at N = 16384, V = 151936, bf16), so the
    buffer is flat in N and the fp32 dh accumulator is re-read ~5 times.
    v1: `_V1_BUFFER_FRACTION` of the fp32 logits, at least `_V1_BUFFER_MIN_BYTES` (grows with N)."""
    if (variant or config_variant()) == "v1":
        budget = max(_V1_BUFFER_FRACTION * N * V * 4, _V1_BUFFER_MIN_BYTES)
    else:
        budget = BWD_BUFFER_BYTES
    width = int(budget // (N * elt)) // block_v * block_v
    return max(block_v, min(width, triton.cdiv(V, block_v) * block_v))


def triton_backward(h, w, y, lse, g, gh, ez, inv_temp, need_dh, need_dw):
    """dz by vocabulary chunk (Triton), then dW[chunk] = dzᵀh and dh += dz·W[chunk] (cuBLAS)."""
    N, H = h.shape
    V = w.shape[0]
    variant = config_variant()
    cfg = backward_config(h.dtype, sm_version(h.device), variant)
    with_entropy = gh is not None
    width = chunk_width(N, V, h.element_size(), cfg.block_v, variant)
    dz_buf = torch.empty((N, min(width, V)), device=h.device, dtype=h.dtype)
    dh = torch.zeros((N, H), device=h.device, dtype=torch.float32) if need_dh else None
    dw = torch.empty_like(w) if need_dw else None
    for v_lo in range(0, V, width):
        v_hi = min(v_lo + width, V)
        dz = dz_buf[:, : v_hi - v_lo]
        grid = (triton.cdiv(N, cfg.block_n) * triton.cdiv(v_hi - v_lo, cfg.block_v),)
        dlogits_kernel[grid](
            h, w, y, lse, g, gh if with_entropy else g, ez if with_entropy else g, dz,
            N, H, v_lo, v_hi,
            h.stride(0), h.stride(1), w.stride(0), w.stride(1), dz.stride(0),
            inv_temp,
            HAS_ENTROPY=with_entropy, DOT_PRECISION=dot_precision(h.dtype),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP_N=cfg.group_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if need_dw:
            torch.mm(dz.T, h, out=dw[v_lo:v_hi])
        if need_dh:
            dh = addmm_fp32(dh, dz, w[v_lo:v_hi])
    return dh, dw


# ----------------------------------------------------------------------------- batch-invariant forward


def invariant_forward(h, w, y, inv_temp, with_entropy, backend):
    """The batch-invariant forward: the three-GEMM loss's own pass (`three_gemm.shifted_stats`,
    S = Σ_v exp(z − z_y) over fixed tiles, summed in a fixed order), with E not stored by the
    Triton kernel, so that `linear_logprobs` and `fused_linear_grpo_loss` give a row the same bits.

    h: [N, H], w: [V, H], y: [N] int64 in [0, V) → (logp, entropy or None, lse, E_p[z] or None),
    each [N] fp32. The torch backend runs blocks of INVARIANT_ROWS rows (the last one padded with
    zero rows) through an fp32 [INVARIANT_ROWS, V] buffer."""
    N, V = h.shape[0], w.shape[0]
    if backend == "torch":
        h, w, rows = h.float(), w.float(), INVARIANT_ROWS
        e = torch.empty((rows, V), device=h.device, dtype=torch.float32)
    else:
        rows, e = _INVARIANT_CHUNK, None
    outs = [torch.empty(N, device=h.device, dtype=torch.float32) if with_entropy or i in (0, 2) else None
            for i in range(4)]
    for r0 in range(0, N, rows):
        h_c, y_c = h[r0 : r0 + rows], y[r0 : r0 + rows]
        n_c = h_c.shape[0]
        if backend == "torch":
            h_c, y_c = pad_rows(h_c, rows), pad_rows(y_c, rows)
        stats = shifted_stats(h_c, w, y_c, inv_temp, with_entropy, e, backend, True)
        for out, value in zip(outs, row_values(*stats, backend == "triton")):
            if out is not None:
                out[r0 : r0 + n_c] = value[:n_c]
    return tuple(outs)


# ----------------------------------------------------------------------------- autograd


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, with_entropy, backend, invariant):
        inv_temp = 1.0 / temperature
        valid = targets != ignore_index
        if invariant:
            logp, entropy, lse, mean_z = invariant_forward(hidden, weight, torch.where(valid, targets, 0),
                                                           inv_temp, with_entropy, backend)
            logp = torch.where(valid, logp, 0.0)
            entropy = torch.where(valid, entropy, 0.0) if with_entropy else None
        else:
            fwd = triton_forward if backend == "triton" else torch_forward
            zy, lse, mean_z = fwd(hidden, weight, targets, inv_temp, with_entropy)
            logp = torch.where(valid, zy - lse, 0.0)
            # H = lse − E[z] ≥ 0; for near-one-hot rows both terms are large and the fp32
            # difference can dip a few ulps below zero.
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
            return None, None, None, None, None, None, None, None
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
        return dh, dw, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public function


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    batch_invariant: bool = False,
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
        batch_invariant: a row's logp and entropy have the same bits whatever the number of
            rows, their order, their neighbours (ignored rows included), on the same hardware,
            thread count and library versions; the backward is deterministic run to run. The
            values are then those `fused_linear_grpo_loss(batch_invariant=True)` computes (both
            algorithms), so a ratio against them is exactly 1. Also on inside
            `prolix.kernels.batch_invariant()`.

    Returns:
        logp: [...] fp32, or (logp, entropy) both [...] fp32 with `return_entropy=True`.
        Differentiable in `hidden` and `weight`; a weight with requires_grad=False costs no
        weight-gradient GEMM.

    Raises:
        TypeError / ValueError naming the argument, before any kernel launch: dtypes, shapes,
        devices, targets outside [0, V) other than `ignore_index`, temperature ≤ 0.
    """
    invariant = resolve_batch_invariant(batch_invariant)
    backend = check_lm_head_inputs(hidden, weight, targets, temperature, ignore_index, backend)
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])                  # (N, H)
    y = targets.reshape(-1).to(torch.int64).contiguous()      # (N,)
    if y.numel() == 0:
        # Still part of the graph, so backward() on an empty micro-batch gives zero gradients.
        empty = hidden.new_zeros(lead, dtype=torch.float32) + 0.0 * (hidden.sum() + weight[:0].sum())
        return (empty, empty.clone()) if return_entropy else empty
    out = _LinearLogprobs.apply(h, weight, y, float(temperature), int(ignore_index),
                                bool(return_entropy), backend, invariant)
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)
