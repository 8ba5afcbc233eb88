"""Token-level GRPO loss with KL, on packed rows, fused with the LM head (kernels/fused_grpo.py).

Math (shared/DESIGN.md, "Kernel math"). Per packed token n with mask m, advantage A,
log-prob x = logp[n], ratio r = exp(x − old_logp):

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
tokens (Ye et al. 2020, verl; DESIGN.md writes max(·), which would be a floor, not a bound,
and contradicts its own "c > 1"); w carries no gradient; the entropy enters only when c_ent ≠ 0
(otherwise it is a metric).

Analytic per-token derivatives, computed in the forward pass (fp32, or fp64 for fp64 inputs):

    ∂pg/∂x  = −A·r on the unclipped branch, 0 where clipping (or the dual clip) is active
    ∂kl/∂x  = k1: 1 | k2: −δ | k3: 1 − exp(δ)
    ∂loss/∂x[n] = c[n]·(w·∂pg/∂x + β·∂kl/∂x),   ∂loss/∂H[n] = −c[n]·c_ent

so the autograd node saves two [N] vectors and its backward is one multiply by grad_output.
`_grpo_forward` is the one place these derivatives are defined; both fused algorithms call it.

Cost of `fused_linear_grpo_loss` (N tokens, H hidden, V vocabulary; no [N, V] tensor in either):
- algorithm="three_gemm" (the default, kernels/fused_grpo.py): because a token's loss depends
  only on its own logp and entropy (and per-token constants: rollout correction's weight and
  keep vectors are computed before the pass; `needs_sequence_logp` configs take "four_gemm"),
  ∂loss/∂logp is known chunk by chunk inside the forward, so
  the forward also computes ∂hidden and ∂weight: GEMM 1 writes E = exp(z − z_y) for a chunk of
  C rows, then two cuBLAS GEMMs (dh, dW) read it. 3 GEMMs of 2·N·H·V FLOP, the backward a
  multiply by grad_output; extra memory C·V·2 B (E, ≈ 1.25 GB by default) + V·H·4 B (fp32 dW).
  Rows with zero loss weight (prompt tokens) are skipped.
- algorithm="four_gemm": `linear_logprobs` (forward over the vocabulary) then its backward fed
  with this node's ∂loss/∂logp (logit recompute, dh, dW): 4 GEMMs, extra memory the 3% dz buffer.
Verified on CPU (torch backend, and the Triton kernels under the interpreter) against float64
references, and compiled offline for sm_90/sm_80; GPU timings are the device check's to give.
The loss itself is O(N) elementwise work — about 10 reads/writes of [N] fp32 vectors, 40·N
bytes — next to the 2·N·H·V-FLOP GEMMs of the LM head, so it runs as plain torch ops on every
device and needs no kernel of its own.

Shapes: N packed tokens, S sequences, H hidden, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .fused_grpo import attach_gradients, three_gemm_logprob_grads
from .linear_logprob import _check_inputs, linear_logprobs
from .rollout_correction import RolloutCorrectionConfig, rollout_correction, seq_ids

__all__ = ["GRPOLossConfig", "grpo_loss", "fused_linear_grpo_loss", "FusedLinearGRPOLoss"]

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


# ---------------------------------------------------------------------------- validation


def _check_vector(name: str, t, n: int | None, device, *, floating: bool = True, ref: str = "logp") -> None:
    """Shape/dtype/device checks of one per-token input against `ref`; `n=None` for `ref` itself."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor of packed rows [N], got shape {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name}: expected length N={n} (that of {ref}), got {t.shape[0]}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device} (that of {ref}), got {t.device}")


def _raise_failed(checks: list[tuple[torch.Tensor, str]]) -> None:
    """Evaluate all data-dependent checks with one host transfer; raise the first failure."""
    if not checks:
        return
    dev = checks[0][0].device
    failed = torch.stack([flag.reshape(()).to(dev) for flag, _ in checks]).tolist()
    for bad, (_, message) in zip(failed, checks):
        if bad:
            raise ValueError(message)


def _validate(n: int, dev, advantages, mask, old_logp, ref_logp, rollout_logp, entropy, cu_seqlens,
              config: GRPOLossConfig, normalizer, *, has_entropy: bool, ref: str = "logp") -> list:
    """Raise on malformed shapes/dtypes/options; return the data-dependent checks (tensors)."""
    if not isinstance(config, GRPOLossConfig):
        raise TypeError(f"config: expected a GRPOLossConfig, got {type(config).__name__}")
    _check_vector("mask", mask, n, dev, floating=False, ref=ref)
    if mask.is_complex():
        raise TypeError(f"mask: expected a bool, integer or float tensor, got dtype {mask.dtype}")
    for name, t in (("advantages", advantages), ("old_logp", old_logp), ("ref_logp", ref_logp),
                    ("rollout_logp", rollout_logp), ("entropy", entropy)):
        if t is not None or name == "advantages":
            _check_vector(name, t, n, dev, ref=ref)
    if config.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"ref_logp: required when config.kl_coef > 0 (got kl_coef={config.kl_coef}), got None")
    if config.entropy_coef != 0 and not has_entropy:
        raise ValueError(f"entropy: required when config.entropy_coef != 0 (got {config.entropy_coef}), got None")
    if config.tis_cap is not None and rollout_logp is None:
        raise ValueError(f"rollout_logp: required when config.tis_cap is set (got {config.tis_cap}), got None")
    if config.corrects_rollout and rollout_logp is None:
        raise ValueError("rollout_logp: required when config.rollout_correction is enabled, got None")
    if config.loss_agg != "token-mean" and cu_seqlens is None:
        raise ValueError(f"cu_seqlens: required by loss_agg={config.loss_agg!r}, got None")
    if cu_seqlens is None and (config.ratio_level == "sequence" or config.corrects_rollout):
        raise ValueError("cu_seqlens: required by ratio_level='sequence' and by rollout_correction, got None")
    checks = []
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.is_floating_point() or \
                cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
            raise TypeError(f"cu_seqlens: expected an integer tensor, got {getattr(cu_seqlens, 'dtype', cu_seqlens)!r}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens: expected a 1-D tensor [S+1], S+1 >= 1, got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.device != dev:
            raise ValueError(f"cu_seqlens: expected device {dev} (that of {ref}), got {cu_seqlens.device}")
        checks.append((cu_seqlens[0] != 0, "cu_seqlens: expected cu_seqlens[0] == 0"))
        checks.append((cu_seqlens[-1] != n, f"cu_seqlens: expected cu_seqlens[-1] == N == {n}"))
        checks.append(((cu_seqlens[1:] < cu_seqlens[:-1]).any(), "cu_seqlens: expected non-decreasing offsets"))
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer: expected a scalar, got shape {tuple(normalizer.shape)}")
        checks.append((~(normalizer > 0), "normalizer: expected > 0 (a count of tokens or sequences)"))
    elif normalizer is not None:
        if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
            raise TypeError(f"normalizer: expected a number or 0-d tensor, got {type(normalizer).__name__}")
        if not normalizer > 0:
            raise ValueError(f"normalizer: expected > 0 (a count of tokens or sequences), got {normalizer}")
    return checks


# ------------------------------------------------------------------ aggregation weights


def _aggregation_weights(m: torch.Tensor, cu_seqlens, config: GRPOLossConfig, normalizer) -> torch.Tensor:
    """c[n] of the module docstring, [N] in m's dtype: loss = Σ c · loss_tok."""
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.reshape(()).to(device=m.device, dtype=m.dtype)
    if config.loss_agg == "token-mean":
        denom = m.sum().clamp(min=1.0) if normalizer is None else normalizer
        return m / denom
    n, s = m.shape[0], cu_seqlens.shape[0] - 1
    # sequence of each row; right=True puts row n after every sequence ending at <= n (empties too)
    rows = torch.arange(n, device=m.device, dtype=cu_seqlens.dtype)
    seq_id = torch.searchsorted(cu_seqlens[1:].contiguous(), rows, right=True)                   # [N]
    seq_tokens = torch.zeros(s, dtype=m.dtype, device=m.device).index_add_(0, seq_id, m)  # [S]
    n_seqs = (seq_tokens > 0).sum().to(m.dtype).clamp(min=1.0) if normalizer is None else normalizer
    if config.loss_agg == "seq-mean-token-mean":
        return m / (seq_tokens.clamp(min=1.0)[seq_id] * n_seqs)
    if config.loss_agg == "seq-mean-token-sum":
        return m / n_seqs
    return m / (n_seqs * config.max_len)  # seq-mean-token-sum-norm


# ------------------------------------------------------------------------ per-token math


def _metric_names(config: GRPOLossConfig, has_kl: bool, has_entropy: bool) -> list[str]:
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


def _grpo_forward(logp, entropy, advantages, m, old_logp, ref_logp, is_weight, weights, seqs, config):
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
    names = _metric_names(config, kl is not None, ent is not None)
    return loss, dlogp, dent, torch.stack([values[k] for k in names])


class _GRPOLossFunction(torch.autograd.Function):
    """Forward: loss and its per-token derivatives; backward: grad_output · saved derivatives."""

    @staticmethod
    def forward(ctx, logp, entropy, advantages, m, old_logp, ref_logp, is_weight, weights, seqs, config):
        loss, dlogp, dent, metrics = _grpo_forward(
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


# ------------------------------------------------------------------------ public API


def _correct(logp, advantages, m, old_logp, rollout_logp, cu_seqlens, config: GRPOLossConfig):
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


def _grpo_loss(logp, advantages, mask, old_logp, ref_logp, rollout_logp, entropy, cu_seqlens,
               config, normalizer):
    """grpo_loss on validated inputs."""
    m = mask.detach().to(torch.promote_types(logp.dtype, torch.float32))  # [N] fp32 (fp64 for fp64 logp)
    m, is_weight, corr_metrics = _correct(logp, advantages, m, old_logp, rollout_logp, cu_seqlens, config)
    weights = _aggregation_weights(m, cu_seqlens, config, normalizer)        # [N], same dtype
    seqs = None
    if config.ratio_level == "sequence":
        seqs = (seq_ids(cu_seqlens, m.shape[0]), cu_seqlens.shape[0] - 1)
    if config.entropy_coef == 0 and entropy is not None:
        entropy = entropy.detach()  # metric only: keep it out of the graph
    # old/ref log-probs, weights and advantages are constants: the Function returns no grad for them.
    loss, metrics = _GRPOLossFunction.apply(
        logp, entropy, advantages, m, old_logp, ref_logp, is_weight, weights, seqs, config)
    names = _metric_names(config, ref_logp is not None, entropy is not None)
    return loss, {**dict(zip(names, metrics.unbind(0))), **corr_metrics}


def grpo_loss(
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO objective on given per-token log-probs (for trainers that compute their own).

    logp:         [N] float, log π(y|h) of the policy being trained; gradients flow into it.
    advantages:   [N] float, per-token advantage (the sequence's advantage broadcast).
    mask:         [N] bool/int/float, 1 on response tokens that enter the loss.
    old_logp:     [N] float or None, the behaviour policy; None = logp.detach() (ratio 1).
    ref_logp:     [N] float or None, the reference policy; required when config.kl_coef > 0.
    rollout_logp: [N] float or None, the rollout engine's log-probs; required by config.tis_cap,
                  ignored by the loss without it.
    entropy:      [N] float or None, per-token entropy; required when config.entropy_coef != 0
                  (gradients flow into it then); otherwise it only feeds the metric.
    cu_seqlens:   [S+1] integer, sequence offsets (0, ..., N); required by the seq-* aggregations.
                  Empty sequences are allowed.
    config:       GRPOLossConfig.
    normalizer:   float or 0-d tensor > 0, the global denominator: response tokens (token-mean)
                  or sequences (seq-*) of the whole mini-batch over all micro-batches and ranks
                  (DDP averages gradients over ranks: pass that count / world_size there).
                  None = the local one (at least 1: an all-masked batch gives loss 0, grads 0).
    old_logp, ref_logp, rollout_logp, advantages are constants (no gradient).

    Returns (loss, metrics):
      loss:    0-d fp32 (fp64 if logp is fp64), differentiable w.r.t. logp (and entropy).
      metrics: dict of detached 0-d tensors, means over masked tokens of this call:
               pg_loss, kl (if ref_logp given), entropy (if given), clip_frac, clip_frac_low,
               clip_frac_high (tokens where the clipped branch is active), dual_clip_frac (if
               dual_clip), tis_weight_mean (if tis_cap), ratio_mean, ratio_max, num_tokens (Σ mask).
    Raises ValueError/TypeError naming the argument on malformed inputs (one host sync).
    """
    _check_vector("logp", logp, None, None)
    _raise_failed(_validate(logp.shape[0], logp.device, advantages, mask, old_logp, ref_logp, rollout_logp,
                            entropy, cu_seqlens, config, normalizer, has_entropy=entropy is not None))
    return _grpo_loss(logp, advantages, mask, old_logp, ref_logp, rollout_logp, entropy, cu_seqlens,
                      config, normalizer)


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    config: GRPOLossConfig = GRPOLossConfig(),
    normalizer: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    entropy_metric: bool = False,
    backend: str = "auto",
    algorithm: str = "auto",
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LM head → log-probs → GRPO loss, the gradients computed in the forward; never holds [N, V].

    hidden:   [N, H] fp32/bf16/fp16, final hidden states of the packed tokens.
    weight:   [V, H] same dtype, the LM-head weight.
    targets:  [N] int64, next tokens; rows equal to `ignore_index` must have mask 0.
    advantages, mask, old_logp, ref_logp, rollout_logp, cu_seqlens, config, normalizer:
              as in `grpo_loss` (per-token tensors [N]; config.temperature scales the logits).
    ignore_index: target id of rows without a next token (their logp and entropy are 0).
    entropy_metric: also compute the entropy for `metrics["entropy"]` when entropy_coef == 0
              (a cheap extra accumulator in the forward; it gets no gradient). With
              entropy_coef != 0 the entropy is always computed and differentiated.
    backend:  "auto" | "torch" | "triton": Triton kernels for CUDA tensors, torch ops otherwise.
    algorithm: "auto" | "three_gemm" | "four_gemm". three_gemm (kernels/fused_grpo.py) computes
              the hidden and weight gradients inside the forward (three GEMMs, the backward only
              scales them); it requires each token's loss to depend only on its own logp and
              entropy and on per-token constants (`config.token_local`: the normaliser and
              per-sequence counts come from mask/cu_seqlens; rollout correction's weight and keep
              vectors from old_logp/rollout_logp, computed before the chunked pass). four_gemm is
              `linear_logprobs` + `grpo_loss` under autograd (forward, logit recompute, dh, dW),
              for losses that couple tokens through the current log-probs and for parity tests.
              "auto" = four_gemm exactly when `config.needs_sequence_logp` (GSPO's sequence ratio,
              an off-policy mask against the current policy) or when rollout correction has no
              old_logp (old = the current logp, which the rules read across whole sequences);
              three_gemm otherwise. three_gemm with such a config or inputs is a ValueError.
    chunk_rows: three_gemm only: token rows per chunk, C; its [C, V] buffer is the extra memory
              (None: E ≈ 1.25 GB, `fused_grpo.default_chunk_rows`).

    Returns (loss, metrics) as `grpo_loss`: loss 0-d fp32, differentiable w.r.t. hidden and weight.
    """
    # dtypes, vocabulary range and the weight are checked by linear_logprobs; here what the loss needs
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor ([N, H] / [V, H]), got {getattr(t, 'shape', t)!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows <= 0):
        raise ValueError(f"chunk_rows: expected a positive int or None, got {chunk_rows!r}")
    _check_vector("targets", targets, hidden.shape[0], hidden.device, floating=False, ref="hidden")
    # has_entropy=True: the entropy is computed below whenever entropy_coef needs it
    checks = _validate(hidden.shape[0], hidden.device, advantages, mask, old_logp, ref_logp, rollout_logp,
                       None, cu_seqlens, config, normalizer, has_entropy=True, ref="hidden")
    checks.append((((targets == ignore_index) & (mask != 0)).any(),
                   f"mask: expected 0 on rows whose target is ignore_index={ignore_index}"))
    _raise_failed(checks)

    want_entropy = config.entropy_coef != 0 or entropy_metric
    coupled = config.needs_sequence_logp or (config.corrects_rollout and old_logp is None)
    if algorithm == "three_gemm" and coupled:
        raise ValueError("algorithm: 'three_gemm' needs each token's loss to depend on its own logp only; this "
                         f"config couples a sequence's tokens (needs_sequence_logp={config.needs_sequence_logp}, "
                         f"rollout correction without old_logp={config.corrects_rollout and old_logp is None}): "
                         "use 'four_gemm' or 'auto'")
    if algorithm == "four_gemm" or (algorithm == "auto" and coupled):
        out = linear_logprobs(hidden, weight, targets, temperature=config.temperature,
                              ignore_index=ignore_index, return_entropy=want_entropy, backend=backend)
        logp, entropy = out if want_entropy else (out, None)
        return _grpo_loss(logp, advantages, mask, old_logp, ref_logp, rollout_logp, entropy, cu_seqlens,
                          config, normalizer)
    backend = _check_inputs(hidden, weight, targets, config.temperature, ignore_index, backend)
    return _three_gemm_loss(hidden, weight, targets.to(torch.int64), advantages, mask, old_logp, ref_logp,
                            rollout_logp, cu_seqlens, config, normalizer, want_entropy, backend, chunk_rows)


def _three_gemm_loss(hidden, weight, targets, advantages, mask, old_logp, ref_logp, rollout_logp,
                     cu_seqlens, config, normalizer, want_entropy, backend, chunk_rows):
    """fused_linear_grpo_loss, algorithm="three_gemm", on validated inputs (config.token_local,
    and old_logp given when rollout correction is on)."""
    m = mask.detach().to(torch.float32)                                   # [N] fp32
    # rollout correction's keep and weight [N] (and tis_cap's weight) read only constants: computed
    # once here and sliced per chunk; without old_logp tis_cap's weight exp(logp − rollout) is
    # per token, from each chunk's own logp
    constants = old_logp is not None or config.tis_cap is None
    m, is_weight, corr_metrics = (_correct(None, advantages, m, old_logp, rollout_logp, cu_seqlens, config)
                                  if constants else (m, None, {}))
    weights = _aggregation_weights(m, cu_seqlens, config, normalizer)     # [N] fp32
    rows = torch.nonzero(weights != 0).squeeze(1)    # only these rows enter the loss or a gradient
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad

    def per_token(t, sel):
        return None if t is None else t[sel]

    def chunk_weight(logp_c, sel):
        if constants:
            return per_token(is_weight, sel)
        return _correct(logp_c, None, m[sel], None, rollout_logp[sel], None, config)[1]

    def token_grads(logp_c, ent_c, sel):
        # the one definition of the per-token loss: _grpo_forward on the chunk's rows
        _, dlogp, dent, _ = _grpo_forward(
            logp_c, ent_c, advantages[sel], m[sel], per_token(old_logp, sel), per_token(ref_logp, sel),
            chunk_weight(logp_c, sel), weights[sel], None, config)
        return dlogp, dent

    with torch.no_grad():
        logp, entropy, dh, dw = three_gemm_logprob_grads(
            hidden.detach(), weight.detach(), targets, rows, token_grads, inv_temp=1.0 / config.temperature,
            with_entropy=want_entropy, need_dh=need_dh, need_dw=need_dw, backend=backend, chunk_rows=chunk_rows)
        if not constants:
            is_weight = chunk_weight(logp, slice(None))
        loss, _, _, metrics = _grpo_forward(logp, entropy, advantages, m, old_logp, ref_logp, is_weight,
                                            weights, None, config)
    loss = attach_gradients(loss, hidden, weight, dh, dw)
    names = _metric_names(config, ref_logp is not None, entropy is not None)
    return loss, {**dict(zip(names, metrics.unbind(0))), **corr_metrics}


class FusedLinearGRPOLoss(nn.Module):
    """nn.Module wrapper of `fused_linear_grpo_loss` with a fixed GRPOLossConfig.

    forward(hidden [N, H], weight [V, H], targets [N], advantages [N], mask [N], **kw)
      -> (loss 0-d fp32, metrics); **kw are the keyword arguments of `fused_linear_grpo_loss`.
    """

    def __init__(self, config: GRPOLossConfig = GRPOLossConfig(), *, ignore_index: int = -100,
                 backend: str = "auto", algorithm: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, GRPOLossConfig):
            raise TypeError(f"config: expected a GRPOLossConfig, got {type(config).__name__}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
        self.config, self.ignore_index, self.backend, self.algorithm = config, ignore_index, backend, algorithm

    def forward(self, hidden, weight, targets, advantages, mask, **kw):
        kw.setdefault("ignore_index", self.ignore_index)
        kw.setdefault("backend", self.backend)
        kw.setdefault("algorithm", self.algorithm)
        return fused_linear_grpo_loss(hidden, weight, targets, advantages, mask, config=self.config, **kw)

    def extra_repr(self) -> str:
        return (f"{self.config}, ignore_index={self.ignore_index}, backend={self.backend!r}, "
                f"algorithm={self.algorithm!r}")
