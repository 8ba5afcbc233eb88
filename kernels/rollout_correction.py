"""Rollout correction: the training–inference mismatch, as per-token constants of the loss.

The rollout engine samples from π_rollout (its own kernels, its own precision, perhaps an older
policy); the trainer's behaviour policy π_old is the same weights run by the trainer. Per packed
response token n (mask m = 1) of sequence s, with L_s = Σ_{n∈s} m[n] and

    λ[n]  = old_logp − rollout_logp                  log π_old/π_rollout
    k1[n] = −λ                                       Schulman's k1 of KL(π_rollout ‖ π_old)
    k3[n] = exp(λ) − 1 − λ  (≥ 0)                    Schulman's k3 of the same KL

the rules below give a weight w[n] that multiplies the policy-gradient term and a keep flag
that removes tokens from the loss *and* from its normaliser (`grpo_loss` aggregates over m·keep:
a dropped token counts neither in "token-mean"'s token count nor, once a sequence has no token
left, in the seq-* sequence count; micro-batch losses still add up to the one-batch loss when
the caller counts its global normaliser over m·keep, as `kept_counts` does):

- importance weight of the sampling policy, `is_level`:
    token      w = exp(λ[n])
    sequence   w = exp(Σ_{n∈s} m·λ / L_s), the *geometric mean* of the token weights,
               broadcast to the sequence. The product exp(Σ λ) that verl's "sequence" level and
               TRL's sequence_* modes use goes to 0 or ∞ as the sequence grows (a bias of 1e-3
               per token over 16k tokens is a factor e^±16), so prolix takes the mean.
  and `is_mode`:
    truncate   w ← clamp(w, is_min, is_max)                   (TIS; is_min may be None)
    mask       tokens (level token) or whole sequences (level sequence) with w outside
               [is_min, is_max] are dropped; the others keep their w (ICE-POP, e.g. [0.5, 5]).
               Bounds are inclusive (w = is_max is kept), as in TRL and verl.
- sequence mask, `seq_mask_min` / `seq_mask_max`: whole sequences whose geometric-mean weight
  exp(Σ m·λ / L_s) leaves [seq_mask_min, seq_mask_max] are dropped, whatever the weight rule
  (ProRL v2 / NeMo RL's "seq-mask-tis": token-level truncated weights on the sequences the
  sequence mask keeps). Inclusive bounds.
- rejection by mismatch, `reject_threshold`: sequences whose mean k3 over their response
  tokens exceeds the threshold are dropped; with `reject_estimator="k1"` those whose |mean k1|
  does (k1 is signed; verl's seq_mean_k1 with one threshold U keeps −log U ≤ mean k1 ≤ log U:
  the same rule with threshold log U). Equality keeps the sequence, as in verl.
- DeepSeek-V3.2's off-policy sequence masking, `off_policy_threshold` δ: tokens with advantage
  A < 0 in sequences whose mean (rollout_logp − x) > δ are dropped, x = old_logp
  (`off_policy_logp="old"`: a constant, precomputable) or the current policy's logp.detach()
  (`"current"`, as TRL's `off_policy_mask_threshold`; it needs the whole sequence's current
  log-probs before the loss, see `needs_sequence_logp`).

Every rule reads only old_logp, rollout_logp, advantages, the mask and the sequence ids (and,
for off_policy_logp="current", the detached current logp), so `rollout_correction` runs once
before the loss and hands it two [N] vectors; the loss math stays per token. verl clamps λ to
[−20, 20] before exponentiating; prolix does not (exp overflows only past |λ| ≈ 88 in fp32,
and a weight that large is truncated or masked anyway).

Shapes: N packed tokens, S sequences (offsets `cu_seqlens` [S+1]).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ._common import seq_ids

__all__ = ["RolloutCorrectionConfig", "Correction", "rollout_correction", "kept_counts", "seq_ids"]

IS_LEVELS = ("token", "sequence")
IS_MODES = ("truncate", "mask")
REJECT_ESTIMATORS = ("k1", "k3")
OFF_POLICY_LOGPS = ("old", "current")
PREFIX = "rollout_corr/"


def _check_bounds(name: str, lo: float | None, hi: float | None) -> None:
    """{name}_min: None or finite >= 0; {name}_max: None or > 0; min <= max when both are set."""
    if lo is not None and not (lo >= 0 and math.isfinite(lo)):
        raise ValueError(f"{name}_min must be a finite number >= 0 or None, got {lo}")
    if hi is not None and not hi > 0:
        raise ValueError(f"{name}_max must be > 0 or None, got {hi}")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{name}_min must be <= {name}_max, got {name}_min={lo}, {name}_max={hi}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutCorrectionConfig:
    """The rules of the module docstring; every one is off by default."""

    is_level: str | None = None
    """None (no weight), "token" or "sequence" (geometric mean over the sequence)."""
    is_mode: str = "truncate"
    """"truncate" (clamp to [is_min, is_max]) or "mask" (drop what leaves [is_min, is_max])."""
    is_min: float | None = None
    """C_min ≥ 0 (None: no lower bound)."""
    is_max: float | None = None
    """C_max > 0 (None: no upper bound)."""
    seq_mask_min: float | None = None
    """Drop sequences whose geometric-mean weight is below it; None: no lower bound."""
    seq_mask_max: float | None = None
    """Drop sequences whose geometric-mean weight is above it; None: no upper bound."""
    reject_estimator: str = "k3"
    """"k3" (mean k3 > threshold) or "k1" (|mean k1| > threshold) for the rejection rule."""
    reject_threshold: float | None = None
    """Reject sequences whose mean mismatch exceeds it; None: off."""
    off_policy_threshold: float | None = None
    """δ of DeepSeek-V3.2's off-policy sequence mask; None: off."""
    off_policy_logp: str = "old"
    """Whose log-probs the off-policy divergence is measured against: "old" or "current"."""

    def __post_init__(self) -> None:
        if self.is_level is not None and self.is_level not in IS_LEVELS:
            raise ValueError(f"is_level must be None or one of {IS_LEVELS}, got {self.is_level!r}")
        if self.is_mode not in IS_MODES:
            raise ValueError(f"is_mode must be one of {IS_MODES}, got {self.is_mode!r}")
        _check_bounds("is", self.is_min, self.is_max)
        if self.is_level is not None and self.is_min is None and self.is_max is None:
            raise ValueError(f"is_level={self.is_level!r} needs is_min or is_max (an unbounded weight), got neither")
        _check_bounds("seq_mask", self.seq_mask_min, self.seq_mask_max)
        if self.reject_estimator not in REJECT_ESTIMATORS:
            raise ValueError(f"reject_estimator must be one of {REJECT_ESTIMATORS}, got {self.reject_estimator!r}")
        if self.reject_threshold is not None and not self.reject_threshold >= 0:
            raise ValueError(f"reject_threshold must be >= 0 or None, got {self.reject_threshold}")
        if self.off_policy_threshold is not None and not math.isfinite(self.off_policy_threshold):
            raise ValueError(f"off_policy_threshold must be a finite number or None, got {self.off_policy_threshold}")
        if self.off_policy_logp not in OFF_POLICY_LOGPS:
            raise ValueError(f"off_policy_logp must be one of {OFF_POLICY_LOGPS}, got {self.off_policy_logp!r}")

    @property
    def seq_masks(self) -> bool:
        return self.seq_mask_min is not None or self.seq_mask_max is not None

    @property
    def enabled(self) -> bool:
        return (self.is_level is not None or self.seq_masks or self.reject_threshold is not None
                or self.off_policy_threshold is not None)

    @property
    def needs_sequence_logp(self) -> bool:
        """True when a rule reads the current policy's log-probs across a whole sequence."""
        return self.off_policy_threshold is not None and self.off_policy_logp == "current"


@dataclasses.dataclass
class Correction:
    """What `rollout_correction` returns: weight [N] (None without is_level), keep [N] (0/1 in
    the mask's dtype, 1 where no rule drops the token) and detached 0-d metrics."""

    weight: torch.Tensor | None
    keep: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _seq_mean(x: torch.Tensor, m: torch.Tensor, seq_id: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Σ_{n∈s} m·x / max(L_s, 1) per sequence, [S]; masked rows never enter (inf·0 guarded)."""
    total = torch.zeros_like(lengths).index_add_(0, seq_id, torch.where(m != 0, x * m, 0.0))
    return total / lengths.clamp(min=1.0)


def _dropped_fractions(drop: torch.Tensor, m: torch.Tensor, seq_id: torch.Tensor, lengths: torch.Tensor):
    """(fraction of response tokens dropped, fraction of non-empty sequences with one dropped)."""
    d = (drop & (m != 0)).to(m.dtype)
    seq_any = torch.zeros_like(lengths).index_add_(0, seq_id, d) > 0
    return (d.sum() / m.sum().clamp(min=1.0),
            seq_any.to(m.dtype).sum() / (lengths > 0).to(m.dtype).sum().clamp(min=1.0))


def _mismatch(lam, m, seq_id, lengths):
    """(mean k1 [S], mean k3 [S], the mismatch metrics) of the response tokens."""
    k1, k3 = -lam, torch.expm1(lam) - lam
    seq_k1, seq_k3 = _seq_mean(k1, m, seq_id, lengths), _seq_mean(k3, m, seq_id, lengths)   # [S]
    has, zero, count = lengths > 0, m.new_zeros(()), m.sum().clamp(min=1.0)
    return seq_k1, seq_k3, {
        "mismatch_k1": torch.where(m != 0, k1 * m, zero).sum() / count,
        "mismatch_k3": torch.where(m != 0, k3 * m, zero).sum() / count,
        "mismatch_k1_seq_max": torch.where(has, seq_k1.abs(), zero).max() if has.numel() else zero,
        "mismatch_k3_seq_max": torch.where(has, seq_k3, zero).max() if has.numel() else zero}


def _importance_weight(lam, m, seq_id, lengths, config: RolloutCorrectionConfig):
    """(w [N], dropped [N] bool) of the is_level/is_mode rule."""
    log_w = lam if config.is_level == "token" else _seq_mean(lam, m, seq_id, lengths)[seq_id]
    w = torch.exp(log_w)
    if config.is_mode == "truncate":
        return w.clamp(min=config.is_min, max=config.is_max), torch.zeros_like(w, dtype=torch.bool)
    lo = -math.inf if config.is_min is None else config.is_min
    hi = math.inf if config.is_max is None else config.is_max
    dropped = (w < lo) | (w > hi)
    return torch.where(dropped, 0.0, w), dropped


def _weight_stats(weight: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean, min and max of the importance weight over response tokens (0 when there are none)."""
    zero = m.new_zeros(())
    on = m != 0
    count = on.to(m.dtype).sum()
    # ±inf fill keeps other rows out of min/max; no response token at all reports 0 (no host sync)
    w_min = torch.where(on, weight, math.inf).min() if on.numel() else zero
    w_max = torch.where(on, weight, -math.inf).max() if on.numel() else zero
    return {"is_weight_mean": torch.where(on, weight, zero).sum() / count.clamp(min=1.0),
            "is_weight_min": torch.where(count > 0, w_min, zero),
            "is_weight_max": torch.where(count > 0, w_max, zero)}


def rollout_correction(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    config: RolloutCorrectionConfig,
    *,
    current_logp: torch.Tensor | None = None,
) -> Correction:
    """The per-token weight and keep flags of `config`, and the mismatch metrics.

    old_logp, rollout_logp, advantages: [N] float constants (no gradient is taken).
    mask:         [N] float (fp32 or fp64: the computation dtype), 1 on response tokens.
    cu_seqlens:   [S+1] integer sequence offsets (0, ..., N).
    current_logp: [N] float, the current policy's log-probs (detached); required only by
                  off_policy_logp="current".
    Returns a Correction; its metrics (names prefixed "rollout_corr/") are over this call's
    response tokens: mismatch_k1, mismatch_k3 (token means), mismatch_k1_seq_max (largest
    |mean k1| of a sequence), mismatch_k3_seq_max, and per enabled rule is_weight_mean/min/max,
    is_masked_tokens/seqs (mask mode), seq_masked_tokens/seqs, rejected_tokens/seqs,
    off_policy_tokens/seqs: the
    fraction of response tokens a rule drops, and of non-empty sequences it drops a token of.
    Inputs are assumed validated (`grpo_loss` checks shapes and devices).
    """
    dt, m = mask.dtype, mask
    seq_id = seq_ids(cu_seqlens, m.shape[0])                                                 # [N]
    lengths = torch.zeros(cu_seqlens.shape[0] - 1, dtype=dt, device=m.device).index_add_(0, seq_id, m)  # [S]
    old, rollout = old_logp.detach().to(dt), rollout_logp.detach().to(dt)
    lam = old - rollout                                                                      # [N]
    seq_k1, seq_k3, metrics = _mismatch(lam, m, seq_id, lengths)
    keep = torch.ones_like(m, dtype=torch.bool)
    weight = None
    if config.is_level is not None:
        weight, dropped = _importance_weight(lam, m, seq_id, lengths, config)
        metrics.update(_weight_stats(weight, m))
        if config.is_mode == "mask":
            metrics["is_masked_tokens"], metrics["is_masked_seqs"] = _dropped_fractions(dropped, m, seq_id, lengths)
            keep &= ~dropped
    if config.seq_masks:
        seq_w = torch.exp(_seq_mean(lam, m, seq_id, lengths))                              # [S]
        lo = -math.inf if config.seq_mask_min is None else config.seq_mask_min
        hi = math.inf if config.seq_mask_max is None else config.seq_mask_max
        dropped = ((seq_w < lo) | (seq_w > hi))[seq_id]
        metrics["seq_masked_tokens"], metrics["seq_masked_seqs"] = _dropped_fractions(dropped, m, seq_id, lengths)
        keep &= ~dropped
    if config.reject_threshold is not None:
        stat = seq_k1.abs() if config.reject_estimator == "k1" else seq_k3
        dropped = (stat > config.reject_threshold)[seq_id]
        metrics["rejected_tokens"], metrics["rejected_seqs"] = _dropped_fractions(dropped, m, seq_id, lengths)
        keep &= ~dropped
    if config.off_policy_threshold is not None:
        if config.off_policy_logp == "current" and current_logp is None:
            raise ValueError("current_logp: required by off_policy_logp='current', got None")
        x = old if config.off_policy_logp == "old" else current_logp.detach().to(dt)
        divergence = _seq_mean(rollout - x, m, seq_id, lengths)[seq_id]                   # [N]
        dropped = (advantages.detach().to(dt) < 0) & (divergence > config.off_policy_threshold)
        metrics["off_policy_tokens"], metrics["off_policy_seqs"] = _dropped_fractions(dropped, m, seq_id, lengths)
        keep &= ~dropped
    return Correction(weight, keep.to(dt), {PREFIX + k: v.detach() for k, v in metrics.items()})


def kept_counts(mask: torch.Tensor, keep: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[float, float]:
    """(response tokens, sequences with ≥ 1 response token) left after `keep`: the global
    normalisers of token-mean and seq-* when summed over every micro-batch and rank."""
    m = mask.to(keep.dtype) * keep
    lengths = torch.zeros(cu_seqlens.shape[0] - 1, dtype=m.dtype, device=m.device)
    lengths.index_add_(0, seq_ids(cu_seqlens, m.shape[0]), m)
    return float(m.sum()), float((lengths > 0).sum())
