"""The choices that shape the GRPO objective: `GRPOLossConfig` and the names it accepts."""

from __future__ import annotations

import dataclasses

from .rollout_correction import RolloutCorrectionConfig

__all__ = ["GRPOLossConfig", "KL_ESTIMATORS", "RATIO_LEVELS", "ALGORITHMS", "LOSS_AGGREGATIONS"]

KL_ESTIMATORS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")
ALGORITHMS = ("auto", "three_gemm", "four_gemm")
LOSS_AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOLossConfig:
    """Everything that shapes the GRPO objective; the kernels take tensors, this takes choices.

    Porting a verl config: verl clamps the log-ratio logp − old_logp to [−20, 20] before its
    ratio (every policy loss in `verl.trainer.ppo.core_algos`), and its `low_var_kl` (k3) clamps
    the log-ratio to [−20, 20] and the estimate to [−10, 10]. prolix clamps neither: the ratio is
    clipped by `clip_low` / `clip_high` (and `dual_clip`) only, and k3 = exp(δ) − δ − 1 is
    unclamped, so a token whose reference log-prob is far above the policy's contributes its
    whole k3 (and gradient) where verl's would saturate at 10."""

    clip_low: float = 0.2
    """ε_low: the ratio is clipped below at 1 − ε_low (for negative advantages)."""
    clip_high: float = 0.2
    """ε_high: the ratio is clipped above at 1 + ε_high (DAPO's clip-higher uses 0.28)."""
    dual_clip: float | None = None
    """c > 1: the loss of a negative-advantage token is bounded by −c·A (dual-clip PPO)."""
    kl_coef: float = 0.0
    """β: weight of the KL penalty to the reference policy (needs `ref_logp` when > 0)."""
    kl_estimator: str = "k3"
    """k1 = logp − ref, k2 = δ²/2, k3 = exp(δ) − δ − 1 with δ = ref − logp (Schulman's estimators)."""
    entropy_coef: float = 0.0
    """c_ent: an entropy bonus, loss −= c_ent · H (needs the entropy)."""
    tis_cap: float | None = None
    """C: truncated importance weight min(exp(old − rollout), C) against the rollout engine.
    Needs `rollout_logp`; `rollout_logp` without `tis_cap` is accepted and not used."""
    loss_agg: str = "token-mean"
    """How per-token losses become one scalar: one of LOSS_AGGREGATIONS."""
    max_len: int | None = None
    """The fixed length that seq-mean-token-sum-norm (Dr.GRPO) divides by."""
    temperature: float = 1.0
    """τ: logits are divided by it before the softmax (the sampling temperature)."""
    ratio_level: str = "token"
    """"token" (PPO/GRPO) or "sequence": GSPO's per-sequence geometric-mean ratio (needs cu_seqlens)."""
    rollout_correction: RolloutCorrectionConfig | None = None
    """Importance weight / rejection / off-policy masking against the rollout engine's log-probs
    (kernels/rollout_correction.py); needs `rollout_logp` and `cu_seqlens` when enabled."""

    @property
    def needs_sequence_logp(self) -> bool:
        """True when the loss of a token depends on the current log-probs of its whole sequence
        (GSPO's ratio, an off-policy mask against the current policy): a fused pass that
        computes ∂L/∂logp chunk by chunk cannot, and falls back to linear_logprobs + grpo_loss."""
        rc = self.rollout_correction
        return self.ratio_level == "sequence" or (rc is not None and rc.needs_sequence_logp)

    @property
    def token_local(self) -> bool:
        """True when each token's loss depends only on its own logp and per-token constants."""
        return not self.needs_sequence_logp

    @property
    def corrects_rollout(self) -> bool:
        return self.rollout_correction is not None and self.rollout_correction.enabled

    def __post_init__(self) -> None:
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError(f"clip_low and clip_high must be >= 0, got {self.clip_low}, {self.clip_high}")
        if self.clip_low >= 1:
            raise ValueError(f"clip_low must be < 1 (the ratio is clipped at 1 - clip_low), got {self.clip_low}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1 or None, got {self.dual_clip}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg!r}")
        if self.loss_agg == "seq-mean-token-sum-norm" and (self.max_len is None or self.max_len <= 0):
            raise ValueError(f"loss_agg='seq-mean-token-sum-norm' needs max_len > 0, got {self.max_len}")
        if self.tis_cap is not None and not self.tis_cap > 0:
            raise ValueError(f"tis_cap must be > 0 or None, got {self.tis_cap}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.ratio_level not in RATIO_LEVELS:
            raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {self.ratio_level!r}")
        rc = self.rollout_correction
        if rc is not None and not isinstance(rc, RolloutCorrectionConfig):
            raise TypeError(f"rollout_correction: expected a RolloutCorrectionConfig or None, got {type(rc).__name__}")
        if self.tis_cap is not None and rc is not None and rc.is_level is not None:
            raise ValueError(f"tis_cap={self.tis_cap} and rollout_correction.is_level={rc.is_level!r} are two "
                             "importance weights; set one (tis_cap = is_level 'token', is_max C)")

