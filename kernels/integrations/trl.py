"""TRL's `GRPOTrainer` with prolix's fused linear GRPO loss.

    from prolix.kernels.integrations.trl import ProlixGRPOTrainer
    trainer = ProlixGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), ...)
    # or, for a trainer built elsewhere:  patch_grpo_trainer(trainer)

What changes. TRL's `_compute_loss` runs the model with its chunked fused LM head (per-token
log-probs and entropy on the padded [B, T] batch) and then the clipped objective as a dozen
elementwise [B, T] autograd ops. Here the model runs its backbone only (`logits_to_keep` = no
position, so the LM head projects nothing); the final hidden states of the response tokens are
packed to [N, H] (N = Σ loss mask, `cu_seqlens` from the mask) and prolix's fused loss
(`linear_logprobs` → `grpo_loss`, the two halves of `fused_linear_grpo_loss`) computes
log-probs, entropy, the clipped surrogate, the KL to the reference and the aggregation in one
pass over the vocabulary, saving O(N) vectors for the backward instead of [B, T]
intermediates. Generation, rewards, advantages and the old and reference log-probs (no grad)
stay TRL's own.

Option mapping (TRL 1.16 `GRPOConfig` → `GRPOLossConfig` + normalizer; GA = the trainer's
`current_gradient_accumulation_steps` in training, 1 in eval):

    loss_type="grpo"     loss_agg="seq-mean-token-mean",   normalizer = B·GA
    loss_type="bnpo"     loss_agg="token-mean",            normalizer = max(Σ mask, 1)·GA
    loss_type="dr_grpo"  loss_agg="seq-mean-token-sum-norm", max_len = max_completion_length,
                         normalizer = B·GA
    loss_type="dapo"     loss_agg="token-mean",            normalizer = max(num_items_in_batch, 1)
                         / num_processes · GA / steps_per_generation
    beta                 kl_coef, kl_estimator="k3" (TRL's exp(ref − x) − (ref − x) − 1)
    use_bias_correction_kl (TRL's default: True) with beta > 0: TRL weights the KL by the ratio,
                         r·k3, whose gradient is the unbiased −r·δ; prolix's KL is unweighted, so
                         this term is added here as O(N) torch ops on the packed log-probs, with
                         the aggregation weights of the surrogate (kl_coef = 0 in the kernel)
    epsilon, epsilon_high clip_low, clip_high
    delta                dual_clip = delta: for A < 0 both bound the loss at −δ·A, for A > 0 the
                         clamp never binds; equal only when delta > 1 + epsilon_high (checked)
    temperature          temperature (the logits are divided by it, as TRL's fused head does)
    use_vllm + vllm_importance_sampling_correction (every vllm_importance_sampling_mode:
                         token/sequence × truncate/mask)
                         TRL's own per-token weight w = inputs["importance_sampling_ratio"]
                         multiplies the surrogate: prolix's TIS weight min(exp(old − rollout), C)
                         reproduces it exactly with rollout = old − log w and C = ∞. TRL's
                         weights are its own: its sequence modes take the product of the token
                         ratios and its masked tokens stay in the normaliser with weight 0 —
                         prolix's own rules (`GRPOLossConfig.rollout_correction`) take the
                         geometric mean and drop masked tokens from the normaliser
    importance_sampling_level="sequence" (GSPO)
                         ratio_level="sequence": the clipped ratio is exp(mean over the sequence's
                         tokens of (x − old)), TRL's log_importance_weights; with
                         use_bias_correction_kl the KL is weighted by that sequence ratio too
    off_policy_mask_threshold δ (DeepSeek-V3.2's off-policy sequence mask)
                         computed by `prolix.kernels.rollout_correction` with
                         off_policy_logp="current" from the packed log-probs (TRL's KL of
                         sampling_per_token_logps — old_per_token_logps without vLLM — against the
                         current policy, NaN sampling log-probs as no evidence); as in TRL the
                         masked tokens' surrogate gets weight 0 (it joins w above), their KL term
                         and their place in the normaliser stay
    entropy_coef         entropy_coef, with loss_type="bnpo" only (TRL's bonus is a local token
                         mean whatever the loss type; prolix aggregates it like the surrogate)
    cast_lm_head_to_fp32 hidden states and head in fp32; otherwise the autocast dtype, if any

Not supported (ValueError naming the option): loss_type cispo / sapo / vespo / luspo;
top_entropy_quantile < 1; use_adaptive_entropy; entropy_coef with a loss_type other than bnpo; MoE router aux loss;
multimodal inputs; an LM head with a bias, logit soft-capping or a logit scale; DeepSpeed
ZeRO-3 (a partitioned LM head).

Logged metrics: TRL's "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
"clip_ratio/region_mean" (global masked means, as TRL computes them; with
importance_sampling_level="sequence" and [B] advantages, means over sequences, as TRL's); "clip_ratio/low_min" and
"clip_ratio/high_max" (per-sequence extremes) are not logged.

Shapes: B completions of C tokens (padded), P prompt tokens, N = Σ loss mask, H hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..grpo_loss import GRPOLossConfig, grpo_loss
from ..linear_logprob import linear_logprobs
from ..lm_head import plain_lm_head_weight
from ..rollout_correction import RolloutCorrectionConfig, rollout_correction

# ProlixGRPOTrainer is made on first access by the module __getattr__ below (it subclasses trl's
# trainer, and this module imports without trl), which pyflakes cannot see.
__all__ = ["ProlixGRPOTrainer", "patch_grpo_trainer", "loss_config_from_trainer", "compute_loss"]  # noqa: F822

TESTED_TRL = "1.16.0"
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_LOSS_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean",
             "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean"}
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes",
                    "spatial_shapes", "num_tiles", "image_position_ids", "token_type_ids",
                    "mm_token_type_ids", "num_images")
# Attributes of TRL's GRPOTrainer that the mapping reads; missing ones mean an untested TRL.
_TRAINER_ATTRS = ("loss_type", "beta", "epsilon_low", "epsilon_high", "temperature",
                  "importance_sampling_level", "top_entropy_quantile", "off_policy_mask_threshold",
                  "entropy_coef", "use_adaptive_entropy", "aux_loss_enabled", "use_vllm",
                  "vllm_importance_sampling_correction", "max_completion_length", "accelerator")


def _require_trl():
    try:
        import trl
    except ImportError as e:
        raise ImportError(
            "prolix.kernels.integrations.trl needs TRL: `pip install trl` "
            f"(tested with trl=={TESTED_TRL})") from e
    return trl


# ------------------------------------------------------------------------ option mapping


def loss_config_from_trainer(trainer) -> GRPOLossConfig:
    """The GRPOLossConfig equivalent to `trainer`'s GRPO options; ValueError for unsupported ones."""
    missing = [a for a in _TRAINER_ATTRS if not hasattr(trainer, a)]
    if missing:
        raise TypeError(f"trainer: expected a trl.GRPOTrainer (tested with trl=={TESTED_TRL}); "
                        f"it lacks {missing}")
    args = trainer.args
    if trainer.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(f"loss_type={trainer.loss_type!r} is not supported by prolix; "
                         f"use one of {SUPPORTED_LOSS_TYPES}")
    unsupported = [
        ("importance_sampling_level", trainer.importance_sampling_level,
         trainer.importance_sampling_level not in ("token", "sequence"), "'token' or 'sequence'"),
        ("top_entropy_quantile", trainer.top_entropy_quantile, trainer.top_entropy_quantile < 1.0,
         "1.0 (the entropy mask needs the entropies before the loss: a second pass)"),
        ("off_policy_mask_threshold", trainer.off_policy_mask_threshold,
         trainer.off_policy_mask_threshold is not None and not math.isfinite(trainer.off_policy_mask_threshold),
         "a finite number or None"),
        ("use_adaptive_entropy", trainer.use_adaptive_entropy, bool(trainer.use_adaptive_entropy),
         "False (the controller needs window-global entropy statistics)"),
        ("entropy_coef", trainer.entropy_coef, trainer.entropy_coef != 0 and trainer.loss_type != "bnpo",
         "0.0 unless loss_type='bnpo' (TRL's bonus is a local token mean for every loss type)"),
        ("router_aux_loss_coef", getattr(trainer, "router_aux_loss_coef", None), bool(trainer.aux_loss_enabled),
         "0.0 (the MoE load-balancing loss is not computed on the prolix path)"),
    ]
    for name, value, bad, expected in unsupported:
        if bad:
            raise ValueError(f"{name}={value!r} is not supported by prolix's TRL integration; expected {expected}")
    delta = getattr(args, "delta", None)
    if delta is not None and not delta > 1.0 + trainer.epsilon_high:
        raise ValueError(f"delta={delta} must be > 1 + epsilon_high = {1.0 + trainer.epsilon_high} for prolix's "
                         "dual clip to equal TRL's two-sided clipping")
    if not 0 <= trainer.epsilon_low < 1:
        raise ValueError(f"epsilon={trainer.epsilon_low} must lie in [0, 1) (the ratio is clipped at 1 - epsilon)")
    # TRL's vLLM weight and its off-policy mask both scale the surrogate: one constant weight
    weighted = bool(trainer.use_vllm and trainer.vllm_importance_sampling_correction) or \
        trainer.off_policy_mask_threshold is not None
    return GRPOLossConfig(
        clip_low=trainer.epsilon_low, clip_high=trainer.epsilon_high, dual_clip=delta,
        kl_coef=trainer.beta, kl_estimator="k3", entropy_coef=trainer.entropy_coef,
        tis_cap=math.inf if weighted else None, loss_agg=_LOSS_AGG[trainer.loss_type],
        max_len=trainer.max_completion_length if trainer.loss_type == "dr_grpo" else None,
        temperature=trainer.temperature, ratio_level=trainer.importance_sampling_level)


def _normalizer(trainer, inputs, mask: torch.Tensor, training: bool):
    """TRL's per-loss-type denominator (grpo_trainer._compute_loss), global over GA steps."""
    ga = trainer.current_gradient_accumulation_steps if training else 1
    if trainer.loss_type in ("grpo", "dr_grpo"):
        return float(mask.shape[0] * ga)                    # sequences, empty ones included
    if trainer.loss_type == "bnpo":
        return mask.sum().clamp(min=1.0) * ga               # local response tokens
    normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes  # dapo
    if training:
        normalizer = normalizer * ga / trainer.args.steps_per_generation
    return normalizer


# --------------------------------------------------------------------- model plumbing


def _backbone_and_head(trainer, model):
    """(decoder module whose output is the final hidden states, LM-head module), checked."""
    inner = trainer.accelerator.unwrap_model(model)
    if hasattr(inner, "get_base_model"):                    # PEFT
        inner = inner.get_base_model()
    plain_lm_head_weight(inner)        # a bias or a logit transform: ValueError naming it
    head = inner.get_output_embeddings()
    return inner.base_model, head


def _last_hidden_states(trainer, model, input_ids, attention_mask) -> torch.Tensor:
    """Final hidden states [B, P+C, H] from the (wrapped) model, with the LM head projecting nothing.

    The call goes through `model` (so DDP/FSDP wrappers see a forward) and a forward hook on the
    backbone captures its output; `logits_to_keep` = an empty index makes the head project zero
    positions, so no logits exist and nothing holds on to the full hidden-state tensor."""
    backbone, _ = _backbone_and_head(trainer, model)
    captured = []

    def hook(module, args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = backbone.register_forward_hook(hook)
    try:
        with trainer.accelerator.autocast():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                  logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device))
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the backbone {type(backbone).__name__} did not run in the model's forward")
    return captured[-1]


def _head_weight(trainer, model, dtype_hint: torch.dtype):
    """The LM-head weight [V, H] (gathered if FSDP2 shards it) and the dtype to run the head in."""
    _, head = _backbone_and_head(trainer, model)
    weight = head.weight
    if getattr(weight, "ds_id", None) is not None:
        raise ValueError("DeepSpeed ZeRO-3 partitions the LM head, which prolix's fused backward needs whole; "
                         "use ZeRO-2 or FSDP")
    if hasattr(weight, "full_tensor"):                      # FSDP2 DTensor
        weight = weight.full_tensor()
    if getattr(trainer.args, "cast_lm_head_to_fp32", False):
        dtype = torch.float32
    elif torch.is_autocast_enabled(weight.device.type):
        dtype = torch.get_autocast_dtype(weight.device.type)
    else:
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.bfloat16, torch.float16) else dtype_hint
    return weight.to(dtype), dtype


# --------------------------------------------------------------------------- the loss


def _log_ratio(logp, old, seq_lens, config: GRPOLossConfig) -> torch.Tensor:
    """TRL's log_importance_weights on packed rows [N]: x − old per token, or (GSPO) the mean
    of x − old over each sequence broadcast to its rows; differentiable in logp."""
    log_r = logp - (logp.detach() if old is None else old)
    if config.ratio_level == "token":
        return log_r
    seq_id = torch.repeat_interleave(torch.arange(seq_lens.shape[0], device=logp.device), seq_lens)   # [N]
    total = torch.zeros(seq_lens.shape[0], dtype=log_r.dtype, device=logp.device).index_add(0, seq_id, log_r)
    return (total / seq_lens.clamp(min=1).to(log_r.dtype))[seq_id]


def _ratio_weighted_kl(logp, old, ref, seq_lens, config: GRPOLossConfig, normalizer):
    """TRL's bias-corrected KL, Σ c·r·k3 with r = TRL's coef_1 (`_log_ratio`), δ = ref − x (x = logp [N]).

    c[n] are the surrogate's aggregation weights for packed rows (all in the loss mask):
    1/D (token-mean), 1/(L_s·D) (seq-mean-token-mean), 1/(max_len·D) (Dr.GRPO). Returns the
    term and the per-token r·k3 (detached) for the metric."""
    r = torch.exp(_log_ratio(logp, old, seq_lens, config))   # value 1 on-policy, gradient r
    delta = ref - logp
    kl = r * (torch.expm1(delta) - delta)                             # [N]
    if config.loss_agg == "token-mean":
        c = 1.0 / normalizer
    elif config.loss_agg == "seq-mean-token-mean":
        c = 1.0 / (seq_lens.repeat_interleave(seq_lens).to(kl.dtype) * normalizer)
    else:
        c = 1.0 / (config.max_len * normalizer)
    return config.kl_coef * (c * kl).sum(), kl.detach()


def compute_loss(trainer, model, inputs) -> torch.Tensor:
    """Drop-in for `GRPOTrainer._compute_loss(model, inputs)`: same scalar, same gradients, same scaling."""
    present = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
    if present:
        raise ValueError(f"inputs: multimodal fields {present} are not supported by prolix's TRL integration")
    config = loss_config_from_trainer(trainer)
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    B, P = prompt_ids.shape
    C = completion_ids.shape[1]
    if P == 0:
        raise ValueError("inputs: prompt_ids has no column; the first completion token needs a predecessor")
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]  # [B, C]
    rows = mask.bool()                                                                              # [B, C]

    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)                                      # [B, P+C]
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    hidden = _last_hidden_states(trainer, model, input_ids, attention_mask)                         # [B, P+C, H]
    # position P−1+j predicts completion token j; pack the rows of the loss mask
    h = hidden[:, P - 1 : P + C - 1][rows]                                                          # [N, H]
    with trainer.accelerator.autocast():                    # TRL runs its head in the autocast dtype too
        weight, dtype = _head_weight(trainer, model, h.dtype)
    targets = completion_ids[rows]                                                                  # [N]
    seq_lens = rows.sum(1)                                                                          # [B]
    cu_seqlens = torch.nn.functional.pad(seq_lens.cumsum(0), (1, 0))                                # [B+1]

    advantages = inputs["advantages"]
    advantages = (advantages[:, None] if advantages.dim() == 1 else advantages).expand(B, C)[rows]  # [N]
    old = inputs.get("old_per_token_logps")
    old = None if old is None else old[rows]
    ref = inputs["ref_per_token_logps"][rows] if config.kl_coef != 0 else None
    bias_corrected = ref is not None and getattr(trainer.args, "use_bias_correction_kl", False)
    kernel_config = dataclasses.replace(config, kl_coef=0.0) if bias_corrected else config

    training = trainer.model.training
    normalizer = _normalizer(trainer, inputs, mask, training)
    with torch.autocast(h.device.type, enabled=False):      # the kernel picks its own precision
        logp, entropy = linear_logprobs(h.to(dtype), weight, targets, temperature=config.temperature,
                                        return_entropy=True)                                        # [N] fp32
    rollout = _surrogate_weight(trainer, inputs, rows, logp, old, advantages, cu_seqlens, config)
    loss, metrics = grpo_loss(logp, advantages, torch.ones_like(targets), old_logp=old,
                              ref_logp=None if bias_corrected else ref, rollout_logp=rollout, entropy=entropy,
                              cu_seqlens=cu_seqlens, config=kernel_config, normalizer=normalizer)
    if bias_corrected:
        kl_loss, kl = _ratio_weighted_kl(logp, old, ref, seq_lens, config, normalizer)
        loss = loss + kl_loss
        metrics["kl"] = kl.mean() if kl.numel() else kl.new_zeros(())
    if config.ratio_level == "sequence" and inputs["advantages"].dim() == 1:   # TRL: per-sequence clip means
        metrics.update(_sequence_clip_fractions(logp, old, seq_lens, inputs["advantages"], config))
    _log_metrics(trainer, metrics, config, training, loss)
    return loss


def _surrogate_weight(trainer, inputs, rows, logp, old, advantages, cu_seqlens, config: GRPOLossConfig):
    """TRL's constant weight on the surrogate — its vLLM importance weight times its off-policy
    mask — as rollout log-probs [N] for prolix's TIS weight with C = ∞: exp(old − rollout) = w
    (w = 0 gives rollout = +inf, weight 0). None when TRL weights nothing."""
    if config.tis_cap is None:
        return None
    B, C = rows.shape
    x = logp.detach()
    base = x if old is None else old.to(x.dtype)                                   # TRL's old (logp.detach())
    w = torch.ones_like(x)
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        if old is None:
            raise ValueError("inputs: importance sampling correction needs old_per_token_logps, got none")
        w = inputs["importance_sampling_ratio"].expand(B, C)[rows].to(x.dtype)                    # [N]
    if trainer.off_policy_mask_threshold is not None:
        sampling = inputs.get("sampling_per_token_logps")
        sampling = base if sampling is None else sampling[rows].to(x.dtype)
        sampling = torch.where(torch.isnan(sampling), x, sampling)   # TRL: an unscored token is no evidence
        rule = RolloutCorrectionConfig(off_policy_threshold=trainer.off_policy_mask_threshold, off_policy_logp="current")
        w = w * rollout_correction(base, sampling, advantages, torch.ones_like(x), cu_seqlens, rule,
                                   current_logp=x).keep
    return base - torch.log(w)


def _sequence_clip_fractions(logp, old, seq_lens, seq_adv, config: GRPOLossConfig) -> dict[str, torch.Tensor]:
    """TRL's clip ratios at importance_sampling_level="sequence": per sequence (all B of them,
    empty ones too), as sums with a count, for `_log_metrics`."""
    seq_ratio = torch.exp(_log_ratio(logp.detach(), old, seq_lens, config))               # [N]
    starts = torch.cumsum(seq_lens, 0) - seq_lens
    r = torch.ones_like(seq_adv, dtype=seq_ratio.dtype)
    has = seq_lens > 0
    r[has] = seq_ratio[starts[has]]                    # an empty sequence: TRL's ratio exp(0) = 1
    low = (r < 1 - config.clip_low) & (seq_adv < 0)
    high = (r > 1 + config.clip_high) & (seq_adv > 0)
    count = torch.tensor(float(seq_adv.shape[0]), device=r.device)
    return {"seq_clip/low": low.float().sum(), "seq_clip/high": high.float().sum(),
            "seq_clip/region": (low | high).float().sum(), "seq_clip/count": count}


def _log_metrics(trainer, metrics, config, training: bool, loss) -> None:
    """TRL's metric names, as global (all-process) masked means."""
    mode = "train" if training else "eval"
    count = metrics["num_tokens"]

    def global_mean(name: str) -> float:
        if name.startswith("clip_frac") and "seq_clip/count" in metrics:   # sums over sequences
            key = "seq_clip/" + {"clip_frac": "region", "clip_frac_low": "low", "clip_frac_high": "high"}[name]
            pair = torch.stack([metrics[key], metrics["seq_clip/count"]])
        else:
            pair = torch.stack([metrics[name] * count, count])
        totals = trainer.accelerator.reduce(pair, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    logs = trainer._metrics[mode]
    if config.kl_coef != 0:
        logs["kl"].append(global_mean("kl"))
    logs["entropy"].append(global_mean("entropy"))
    logs["clip_ratio/low_mean"].append(global_mean("clip_frac_low"))
    logs["clip_ratio/high_mean"].append(global_mean("clip_frac_high"))
    logs["clip_ratio/region_mean"].append(global_mean("clip_frac"))
    if config.entropy_coef != 0:           # bnpo: the bonus is −c·(mean entropy)/GA inside the loss
        ga = trainer.current_gradient_accumulation_steps if training else 1
        policy = loss.detach() * ga + config.entropy_coef * metrics["entropy"]
        logs["policy_loss"].append(trainer.accelerator.gather(policy).nanmean().item())


# ----------------------------------------------------------------- trainer entry points


def patch_grpo_trainer(trainer):
    """Make an existing `trl.GRPOTrainer` compute its loss with prolix; returns the trainer.

    Checks the options first (ValueError naming any unsupported one), then replaces the
    instance's `_compute_loss`; `compute_loss`, `training_step` and evaluation are TRL's."""
    trl = _require_trl()
    if not isinstance(trainer, trl.GRPOTrainer):
        raise TypeError(f"trainer: expected a trl.GRPOTrainer, got {type(trainer).__name__}")
    loss_config_from_trainer(trainer)
    trainer._compute_loss = compute_loss.__get__(trainer)
    trainer._prolix_patched = True
    return trainer


def _make_trainer_class():
    trl = _require_trl()

    class ProlixGRPOTrainer(trl.GRPOTrainer):
        """`trl.GRPOTrainer` whose policy loss runs through prolix's fused loss (same arguments).

        The options are checked at construction; see the module docstring for the mapping."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            loss_config_from_trainer(self)

        def _compute_loss(self, model, inputs):
            return compute_loss(self, model, inputs)

    ProlixGRPOTrainer.__module__ = __name__
    return ProlixGRPOTrainer


def __getattr__(name: str):
    # The subclass needs trl at class-creation time: build it on first access, so importing this
    # module works without trl and `from ... import ProlixGRPOTrainer` raises the clear ImportError.
    if name == "ProlixGRPOTrainer":
        cls = _make_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
