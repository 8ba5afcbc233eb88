"""Float64 references for every kernel in `prolix.kernels`.

These are the definitions the kernels are tested and benchmarked against: plain torch,
whole `[N, V]` logits, no streaming, no tricks. They are slow and memory-hungry on purpose.
With `upcast=True` (the default) every input is converted to float64 first, so the result is
the exact math of the kernels' docstrings up to float64 rounding; with `upcast=False` they compute in
the inputs' own dtype, which is what "torch eager" means in the benchmarks and what a bf16 error
budget is measured against in the tests ("at most k times as wrong as torch in the same dtype").

Autograd works through both functions, so gradient references come from `torch.autograd`.
"""

from __future__ import annotations

import math

import torch

from .grpo_loss import GRPOLossConfig
from .rollout_correction import RolloutCorrectionConfig

__all__ = ["linear_logprobs_ref", "grpo_loss_ref", "rollout_correction_ref"]


def linear_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y | h) and the entropy of the softmax, from the full logits.

    hidden: [..., H]; weight: [V, H]; targets: [...] int64.
    Returns (logp, entropy), each shaped like `targets`, float64 if `upcast` else float32;
    rows whose target is `ignore_index` are 0 in both.
    """
    if upcast:
        hidden, weight = hidden.double(), weight.double()
    h = hidden.reshape(-1, hidden.shape[-1])                      # (N, H)
    y = targets.reshape(-1)                                       # (N,)
    logits = (h @ weight.T).float() if not upcast else h @ weight.T  # (N, V)
    logits = logits / temperature
    logprobs = torch.log_softmax(logits, dim=-1)                  # (N, V)
    valid = y != ignore_index
    safe_y = torch.where(valid, y, torch.zeros_like(y))
    logp = logprobs.gather(1, safe_y[:, None]).squeeze(1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(valid, logp, zero)
    entropy = torch.where(valid, entropy, zero)
    return logp.reshape(targets.shape), entropy.reshape(targets.shape)


def _segment_sum(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums of a packed [N] vector: [S]."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_id = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths)
    return torch.zeros(lengths.numel(), dtype=x.dtype, device=x.device).index_add(0, seq_id, x)


def rollout_correction_ref(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    config: RolloutCorrectionConfig,
    *,
    current_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [N], keep [N]) of kernels/rollout_correction.py, float64, one sequence at a time.

    weight is 1 where config.is_level is None; keep is 1.0 where no rule drops the token."""
    old, rollout, adv, m = (t.detach().double() for t in (old_logp, rollout_logp, advantages, mask))
    current = None if current_logp is None else current_logp.detach().double()
    weight, keep = torch.ones_like(old), torch.ones_like(old)
    lo = -math.inf if config.is_min is None else config.is_min
    hi = math.inf if config.is_max is None else config.is_max
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        on = m[a:b] != 0
        lam = (old[a:b] - rollout[a:b])[on]                      # response tokens of this sequence
        if config.is_level == "token":
            w = torch.exp(old[a:b] - rollout[a:b])
        else:
            w = torch.exp(lam.mean() if lam.numel() else torch.zeros((), dtype=torch.float64)).expand(b - a)
        if config.is_level is not None:
            if config.is_mode == "truncate":
                weight[a:b] = w.clamp(min=config.is_min, max=config.is_max)
            else:
                inside = (w >= lo) & (w <= hi)
                weight[a:b] = torch.where(inside, w, 0.0)
                keep[a:b] *= inside.double()
        if config.seq_masks and lam.numel():
            seq_w = torch.exp(lam.mean())
            inside = (config.seq_mask_min is None or seq_w >= config.seq_mask_min) and \
                (config.seq_mask_max is None or seq_w <= config.seq_mask_max)
            keep[a:b] *= float(inside)
        if config.reject_threshold is not None and lam.numel():
            stat = (-lam).mean().abs() if config.reject_estimator == "k1" else (lam.exp() - 1 - lam).mean()
            keep[a:b] *= float(stat <= config.reject_threshold)
        if config.off_policy_threshold is not None and lam.numel():
            x = old if config.off_policy_logp == "old" else current
            divergence = (rollout[a:b] - x[a:b])[on].mean()
            keep[a:b] *= torch.where((adv[a:b] < 0) & (divergence > config.off_policy_threshold), 0.0, 1.0)
    return weight, keep


def _sequence_ratio(log_ratio: torch.Tensor, m: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """GSPO: exp(mean of log r over each sequence's tokens in m), broadcast to its rows [N]."""
    out = []
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        on = m[a:b] != 0
        mean = log_ratio[a:b][on].mean() if on.any() else log_ratio.new_zeros(())
        out.append(torch.exp(mean).expand(b - a))
    return torch.cat(out) if out else log_ratio.new_zeros(0)


def _corrected(logp, old, rollout_logp, adv, m, cu_seqlens, config: GRPOLossConfig, cast):
    """(mask after rollout correction, weight of the surrogate or None)."""
    rc = config.rollout_correction
    if rc is not None and rc.enabled:
        w, keep = rollout_correction_ref(old, rollout_logp, adv, m, cu_seqlens, rc, current_logp=logp.detach())
        return m * keep.to(m.dtype), (w.to(m.dtype) if rc.is_level is not None else None)
    if config.tis_cap is not None and rollout_logp is not None:
        return m, torch.exp(old - cast(rollout_logp)).clamp(max=config.tis_cap).detach()
    return m, None


def grpo_loss_ref(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    config: GRPOLossConfig = GRPOLossConfig(),
    normalizer: float | torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """The GRPO objective of kernels/grpo_objective.py on packed rows, as a scalar loss.

    logp, advantages, mask, old_logp, ref_logp, rollout_logp, entropy: [N];
    cu_seqlens: [S+1] (needed by the seq-mean-* aggregations).
    Gradients flow into `logp` and `entropy`; `old_logp=None` means `logp.detach()`.
    config.rollout_correction drops tokens from m (loss and normaliser) and weights the
    surrogate (`rollout_correction_ref`); config.ratio_level="sequence" is GSPO's ratio.
    """
    cast = (lambda t: t.double()) if upcast else (lambda t: t.float())
    logp = cast(logp)
    adv = cast(advantages)
    m = cast(mask)
    old = logp.detach() if old_logp is None else cast(old_logp)
    m, w = _corrected(logp, old, rollout_logp, adv, m, cu_seqlens, config, cast)

    loss_tok = _clipped_surrogate(logp, old, adv, m, cu_seqlens, config)
    if w is not None:
        loss_tok = w * loss_tok
    if config.kl_coef != 0.0:
        delta = cast(ref_logp) - logp
        if config.kl_estimator == "k1":
            kl = -delta
        elif config.kl_estimator == "k2":
            kl = 0.5 * delta * delta
        else:
            kl = torch.exp(delta) - delta - 1.0
        loss_tok = loss_tok + config.kl_coef * kl
    if config.entropy_coef != 0.0:
        loss_tok = loss_tok - config.entropy_coef * cast(entropy)

    # where(), not a product: a masked row may hold garbage (an overflowing ratio on a prompt
    # token) and inf·0 would be NaN.
    masked = torch.where(m != 0, loss_tok, 0.0) * m
    return _aggregate(masked, m, cu_seqlens, config, normalizer)


def _clipped_surrogate(logp, old, adv, m, cu_seqlens, config: GRPOLossConfig) -> torch.Tensor:
    """Per-token clipped policy-gradient term: max(−A·r, −A·clip(r)), dual-clipped if asked."""
    if config.ratio_level == "sequence":
        ratio = _sequence_ratio(torch.where(m != 0, logp - old, 0.0), m, cu_seqlens)
    else:
        ratio = torch.exp(logp - old)
    clipped = ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high)
    pg = torch.maximum(-adv * ratio, -adv * clipped)
    if config.dual_clip is not None:
        # Bound the loss of negative-advantage tokens whose ratio exploded (Ye et al., 2020).
        pg = torch.where(adv < 0, torch.minimum(pg, -config.dual_clip * adv), pg)
    return pg


def _aggregate(masked, m, cu_seqlens, config: GRPOLossConfig, normalizer) -> torch.Tensor:
    """The scalar loss from masked per-token terms, by config.loss_agg."""
    if config.loss_agg == "token-mean":
        denom = m.sum().clamp(min=1.0) if normalizer is None else normalizer
        return masked.sum() / denom
    seq_tokens = _segment_sum(m, cu_seqlens)
    seq_sum = _segment_sum(masked, cu_seqlens)
    n_seqs = (seq_tokens > 0).sum().clamp(min=1) if normalizer is None else normalizer
    if config.loss_agg == "seq-mean-token-mean":
        per_seq = torch.where(seq_tokens > 0, seq_sum / seq_tokens.clamp(min=1.0), seq_sum)
        return per_seq.sum() / n_seqs
    if config.loss_agg == "seq-mean-token-sum":
        return seq_sum.sum() / n_seqs
    return seq_sum.sum() / (n_seqs * config.max_len)  # seq-mean-token-sum-norm (Dr.GRPO)
