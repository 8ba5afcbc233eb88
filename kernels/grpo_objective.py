r"""The token-level GRPO objective with KL on packed rows: the loss, its per-token derivatives
and the autograd node that applies them.

Per packed token n with mask m, advantage A, log-prob x = logp[n], ratio r = exp(x − old_logp):

    pg   = −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A)       PPO clip
    pg   ← min(pg, −c·A)                   if A < 0          dual clip (loss bounded by −c·A)
    pg   ← w·pg,  w = min(exp(old_logp − rollout_logp), C)   truncated IS weight, a constant
                  (or the weight of `config.rollout_correction`, kernels/rollout_correction.py)
    kl   = k1: −δ | k2: δ²/2 | k3: exp(δ) − δ − 1             δ = ref_logp − x
    loss_tok = pg + β·kl − c_ent·H
    loss = Σ_n c[n]·loss_tok[n]

The aggregation weights c[n] (m = mask, D = the normaliser, L_s = Σ m over sequence s):

    token-mean                c = m / D             D = response tokens
    seq-mean-token-mean       c = m / (L_s·D)       D = sequences (with ≥ 1 response token)
    seq-mean-token-sum        c = m / D
    seq-mean-token-sum-norm   c = m / (max_len·D)   (Dr.GRPO)

Passing the *global* D of the whole mini-batch makes the loss a plain sum over tokens, so
micro-batch losses (and gradients) add up to the one-batch loss (and gradient).

Rollout correction (`config.rollout_correction`) is computed before the loss from per-token
constants: a weight w (replacing the TIS weight) and a keep flag; m becomes m·keep everywhere
above (the loss, L_s, the local D), so a dropped token leaves the normaliser as it leaves the
loss, in every aggregation. A global D must then be counted over m·keep (`kept_counts`).

GSPO (`ratio_level="sequence"`, Zheng et al. 2025): r is the sequence's geometric-mean ratio
r_s = exp(Σ_{n∈s} m·(x − old) / L_s), broadcast to its tokens; the clip, the dual clip and w act
on it per token as above. Its derivative couples the tokens of a sequence:
∂loss/∂x[t] = (m[t]/L_s)·Σ_{n∈s} c[n]·w[n]·∂pg[n]/∂log r_s, so it needs the whole sequence's
current log-probs (`GRPOLossConfig.needs_sequence_logp`), which a chunk-local fused pass lacks.
Conventions: the dual clip is min(pg, −c·A), an upper bound on the loss of negative-advantage
tokens (Ye et al. 2020, verl; a max(·) would be a floor, not a bound, and contradict c > 1);
w carries no gradient; the entropy enters only when c_ent ≠ 0 (otherwise it is a metric).

Analytic per-token derivatives, computed in the forward pass (fp32, or fp64 for fp64 inputs):

    ∂pg/∂x  = −A·r on the unclipped branch, 0 where clipping (or the dual clip) is active
    ∂kl/∂x  = k1: 1 | k2: −δ | k3: 1 − exp(δ)
    ∂loss/∂x[n] = c[n]·(w·∂pg/∂x + β·∂kl/∂x),   ∂loss/∂H[n] = −c[n]·c_ent

so the autograd node saves two [N] vectors and its backward is one multiply by grad_output.
`grpo_forward` is the one place these derivatives are defined; both fused algorithms call it.
The loss is O(N) elementwise work, next to the 2·N·H·V-FLOP GEMMs of the LM head, so it runs
as plain torch ops on every device and needs no kernel of its own.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._common import seq_ids
from .grpo_config import GRPOLossConfig
from .rollout_correction import rollout_correction

__all__ = ["aggregation_weights", "metric_names", "grpo_forward", "GRPOLossFunction", "correct"]


def aggregation_weights(m: torch.Tensor, cu_seqlens, config: GRPOLossConfig, normalizer) -> torch.Tensor:
    """c[n] of the module docstring, [N] in m's dtype: loss = Σ c · loss_tok."""
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.reshape(()).to(device=m.device, dtype=m.dtype)
    if config.loss_agg == "token-mean":
        denom = m.sum().clamp(min=1.0) if normalizer is None else normalizer
        return m / denom
    n, s = m.shape[0], cu_seqlens.shape[0] - 1
    seq_id = seq_ids(cu_seqlens, n)                                                        # [N]
    seq_tokens = torch.zeros(s, dtype=m.dtype, device=m.device).index_add_(0, seq_id, m)  # [S]
    n_seqs = (seq_tokens > 0).sum().to(m.dtype).clamp(min=1.0) if normalizer is None else normalizer
    if config.loss_agg == "seq-mean-token-mean":
        return m / (seq_tokens.clamp(min=1.0)[seq_id] * n_seqs)
    if config.loss_agg == "seq-mean-token-sum":
        return m / n_seqs
    return m / (n_seqs * config.max_len)  # seq-mean-token-sum-norm


def metric_names(config: GRPOLossConfig, has_kl: bool, has_entropy: bool) -> list[str]:
    names = ["pg_loss"] + ["kl"] * has_kl + ["entropy"] * has_entropy
    names += ["clip_frac", "clip_frac_low", "clip_frac_high"]
    names += ["dual_clip_frac"] * (config.dual_clip is not None) + ["tis_weight_mean"] * (config.tis_cap is not None)
    return names + ["ratio_mean", "ratio_max", "num_tokens"]


def _ratio(x, old, m, seqs, config: GRPOLossConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(r [N], L [S] or None): the token ratio exp(x − old), or GSPO's sequence ratio broadcast
    to its tokens and the sequences' response-token counts."""
    if config.ratio_level == "token":
        return torch.exp(x - old), None
    seq_id, num_seqs = seqs
    lengths = torch.zeros(num_seqs, dtype=m.dtype, device=m.device).index_add_(0, seq_id, m)
    log_r = torch.zeros_like(lengths).index_add_(0, seq_id, torch.where(m != 0, (x - old) * m, 0.0))
    return torch.exp(log_r / lengths.clamp(min=1.0))[seq_id], lengths


def _kl(delta: torch.Tensor, estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl, ∂kl/∂x) per token for δ = ref − x."""
    if estimator == "k1":
        return -delta, torch.ones_like(delta)
    if estimator == "k2":
        return 0.5 * delta * delta, -delta
    em1 = torch.expm1(delta)            # exp(δ) − 1, exact for small δ
    return em1 - delta, -em1


def _clipped_surrogate(a: torch.Tensor, r: torch.Tensor, config):
    """(pg, ∂pg/∂log r, flags) of the clipped surrogate max(−A·r, −A·clip(r)), dual-clipped if
    config.dual_clip; flags are the bool masks behind the clip_frac* metrics."""
    zero = r.new_zeros(())
    lo, hi = 1.0 - config.clip_low, 1.0 + config.clip_high
    clip_low = (a < 0) & (r < lo)            # −A·lo > −A·r: the clipped branch is the max
    clip_high = (a > 0) & (r > hi)
    clipped = clip_low | clip_high
    pg = torch.where(clipped, -a * r.clamp(lo, hi), -a * r)
    dpg = torch.where(clipped, zero, -a * r)  # ∂(−A·r)/∂log r = −A·r; the clipped branch is constant
    flags = {"clip_frac": clipped, "clip_frac_low": clip_low, "clip_frac_high": clip_high}
    if config.dual_clip is not None:
        bound = -config.dual_clip * a
        dual = (a < 0) & (pg > bound)
        pg, dpg = torch.where(dual, bound, pg), torch.where(dual, zero, dpg)
        flags["dual_clip_frac"] = dual
    return pg, dpg, flags


def grpo_forward(logp, entropy, advantages, m, old_logp, ref_logp, is_weight, weights, seqs, config):
    """Loss, ∂loss/∂logp [N], ∂loss/∂entropy [N] (or None) and the metric vector, in m's dtype.

    m is the mask after rollout correction; is_weight [N] the constant weight w of the
    surrogate (None: 1); seqs = (seq_id [N] int64, S), used by ratio_level="sequence" only."""
    dt = weights.dtype
    x, a = logp.to(dt), advantages.to(dt)
    old = x if old_logp is None else old_logp.to(dt)
    active = weights != 0   # where-guards below keep inf·0 of masked-out rows out of the sums
    zero = x.new_zeros(())

    r, lengths = _ratio(x, old, m, seqs, config)
    pg, dpg, flags = _clipped_surrogate(a, r, config)
    stats = {"dual_clip_frac": flags["dual_clip_frac"]} if "dual_clip_frac" in flags else {}
    if is_weight is not None:
        w = is_weight.to(dt)
        pg, dpg = w * pg, w * dpg
        if config.tis_cap is not None:
            stats["tis_weight_mean"] = w
    dlogp = torch.where(active, weights * dpg, zero)
    if lengths is not None:   # GSPO: log r_s = Σ m·(x − old)/L_s spreads Σ_{n∈s} over the tokens
        seq_id = seqs[0]
        seq_grad = torch.zeros_like(lengths).index_add_(0, seq_id, dlogp)
        dlogp = torch.where(m != 0, seq_grad[seq_id] * m / lengths.clamp(min=1.0)[seq_id], zero)
    loss_tok = pg
    kl = None
    if ref_logp is not None:
        kl, dkl = _kl(ref_logp.to(dt) - x, config.kl_estimator)
        if config.kl_coef != 0:
            loss_tok = loss_tok + config.kl_coef * kl
            dlogp = dlogp + torch.where(active, weights * (config.kl_coef * dkl), zero)
    ent = None if entropy is None else entropy.to(dt)
    if config.entropy_coef != 0:
        loss_tok = loss_tok - config.entropy_coef * ent

    loss = torch.where(active, weights * loss_tok, zero).sum()
    dent = -config.entropy_coef * weights if config.entropy_coef != 0 else None

    # metrics: means over masked tokens (mask-weighted), no host sync
    count = m.sum()

    def mean(v: torch.Tensor) -> torch.Tensor:
        return torch.where(active, v.to(dt) * m, zero).sum() / count.clamp(min=1.0)

    ratio_max = torch.where(active, r, zero).max() if r.numel() else zero   # r > 0: 0 = no token
    values = {"pg_loss": mean(pg), "kl": None if kl is None else mean(kl),
              "entropy": None if ent is None else mean(ent),
              **{k: mean(flags[k]) for k in ("clip_frac", "clip_frac_low", "clip_frac_high")},
              **{k: mean(v) for k, v in stats.items()},
              "ratio_mean": mean(r), "ratio_max": ratio_max, "num_tokens": count}
    names = metric_names(config, kl is not None, ent is not None)
    return loss, dlogp, dent, torch.stack([values[k] for k in names])


class GRPOLossFunction(torch.autograd.Function):
    """Forward: loss and its per-token derivatives; backward: grad_output · saved derivatives."""

    @staticmethod
    def forward(ctx, logp, entropy, advantages, m, old_logp, ref_logp, is_weight, weights, seqs, config):
        loss, dlogp, dent, metrics = grpo_forward(
            logp, entropy, advantages, m, old_logp, ref_logp, is_weight, weights, seqs, config)
        ctx.save_for_backward(dlogp, dent)
        ctx.dtypes = (logp.dtype, None if entropy is None else entropy.dtype)
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_metrics):
        dlogp, dent = ctx.saved_tensors
        logp_dtype, ent_dtype = ctx.dtypes
        grad_ent = (grad_loss * dent).to(ent_dtype) if dent is not None and ctx.needs_input_grad[1] else None
        return (grad_loss * dlogp).to(logp_dtype), grad_ent, None, None, None, None, None, None, None, None


def correct(logp, advantages, m, old_logp, rollout_logp, cu_seqlens, config: GRPOLossConfig):
    """(mask after correction, weight [N] or None, correction metrics): the per-token constants
    of the rollout-correction rules and of tis_cap, computed before the loss. `logp` (detached
    here) is read only when old_logp is None (old = logp) and by an off-policy mask against the
    current policy; with old_logp given and `config.token_local` it may be None (the three-GEMM
    path, which computes these before its chunked pass)."""
    if not config.corrects_rollout and config.tis_cap is None:
        return m, None, {}
    old = (logp if old_logp is None else old_logp).detach()
    if config.corrects_rollout:
        corr = rollout_correction(old, rollout_logp, advantages, m, cu_seqlens, config.rollout_correction,
                                  current_logp=None if logp is None else logp.detach())
        return m * corr.keep, corr.weight, corr.metrics
    return m, torch.exp(old.to(m.dtype) - rollout_logp.to(m.dtype)).clamp(max=config.tis_cap), {}
