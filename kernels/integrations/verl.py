"""prolix inside verl: a "prolix" policy loss and a "prolix" fused-kernel backend for the actor.

    import prolix.kernels.integrations.verl as prolix_verl
    prolix_verl.register()          # in every process that builds an actor (see below)

    actor_rollout_ref.actor.policy_loss.loss_mode=prolix
    actor_rollout_ref.model.use_fused_kernels=True
    actor_rollout_ref.model.fused_kernel_options.impl_backend=prolix

`register()` does two things through verl's own extension points:
1. `core_algos.register_policy_loss("prolix")(compute_policy_loss_prolix)`: the PPO/GRPO policy
   loss of verl's "vanilla" computed by `prolix.kernels.grpo_loss` on the valid rows of the
   padded [B, T] batch, packed to [N] (`cu_seqlens` from `response_mask`).
2. a "prolix" value for `fused_kernel_options.impl_backend`: verl's `patch_forward_with_backends`
   gets wrapped so that backend replaces the actor model's forward with
   `forward_with_prolix_backend`, which returns verl's `CausalLMOutputForPPO(log_probs, entropy)`
   from `linear_logprobs` on the remove-padding (packed) hidden states — never [N, V] logits.
   Dense text models only (verl routes its VLMs through model-specific forwards).

Importing this module after `verl` registers both, so it also works as a verl external module
(`VERL_USE_EXTERNAL_MODULES=prolix.kernels.integrations.verl`) or a `verl.plugins` entry point.
Without verl the module still imports; `register()` raises ImportError saying what to install.

Option mapping (verl 0.9 `ActorConfig` → `GRPOLossConfig` + normalizer; D = the normalizer):

    clip_ratio_low / clip_ratio_high (None → clip_ratio)   clip_low / clip_high
    clip_ratio_c (dual clip, verl default 3.0)             dual_clip
    rollout_is_weights (any rollout-correction mode)       tis_cap = ∞, rollout_logp = old − log w:
                                                           prolix's weight min(exp(old − rollout), C) = w
    loss_agg_mode="token-mean"         token-mean,  D = batch_num_tokens / dp_size (local Σ mask if None)
    loss_agg_mode="token-sum"          token-mean,  D = 1 / dp_size
    loss_agg_mode="seq-mean-token-mean" / "seq-mean-token-sum"
                                       same name,   D = global_batch_size / dp_size (local non-empty
                                                    sequences if None)
    loss_agg_mode="seq-mean-token-sum-norm"
                                       same name,   max_len = loss_scale_factor (T if None), D as above
    metrics actor/pg_clipfrac, actor/ppo_kl, actor/pg_clipfrac_lower: as verl computes them.

Rollout correction. verl computes its options (`algorithm.rollout_correction`: rollout_is,
rollout_is_threshold, rollout_rs, rollout_rs_threshold) in its driver, from the trainer's old
and the engine's rollout log-probs, and hands the policy-loss hook only the results: the
weights (`rollout_is_weights`, applied above) and a response_mask without the rejected tokens
(the hook never sees rollout log-probs, except in verl's bypass mode, which runs verl's own
"bypass_mode" loss). `rollout_correction_from_verl` maps those options onto prolix's
`RolloutCorrectionConfig`, and `compute_rollout_correction_prolix` is a drop-in for verl's
`compute_rollout_correction_and_rejection_mask` (same arguments, same outputs) that computes
them with `prolix.kernels.rollout_correction`, for the modes both have:

    rollout_is="token", rollout_is_threshold=C       is_level="token", is_mode="truncate", is_max=C
    rollout_is="token", rollout_is_threshold="l_u"   is_level="token", is_mode="mask", [l, u]
                                                     (IcePop; bounds inclusive in both)
    rollout_rs="seq_mean_k3", threshold t            reject_estimator="k3", reject_threshold=t
    rollout_rs="seq_mean_k1", threshold U (or "1/U_U")  reject_estimator="k1", threshold log U
                                                     (verl keeps log(1/U) ≤ mean k1 ≤ log U)

Not mapped (ValueError naming the option): rollout_is="sequence" (verl's weight is the product
of the token ratios, exp(Σ λ), prolix's the geometric mean exp(mean λ): a different weight),
rollout_is_batch_normalize, the token_k*, seq_sum_k*, seq_max_k* and seq_mean_k2 rejection
modes, several comma-separated rejection modes, an asymmetric k1 range. Differences: an IcePop
token is dropped from the returned response_mask as well as weighted 0 (prolix's rule: it
leaves the normaliser; verl keeps it there with weight 0); verl clamps λ to [−20, 20].

Differences from "vanilla", all below fp32 resolution in practice: verl clamps log r to
[−20, 20] (prolix does not: there both sides are clipped or bounded by the dual clip, and the
unclipped r < e⁻²⁰ branch differs by < 2e-9·|A|); verl adds 1e-8 to per-sequence token counts.
The KL and entropy terms stay verl's own (`use_kl_loss`, `entropy_coeff` in `ppo_loss`).

Shapes: B sequences of T response positions (padded), N = Σ response_mask, H hidden, V vocab,
total_nnz = packed tokens of the remove-padding forward.
"""

from __future__ import annotations

import math
import sys

import torch

from ..grpo_loss import GRPOLossConfig, grpo_loss
from ..linear_logprob import linear_logprobs
from ..rollout_correction import RolloutCorrectionConfig, rollout_correction

__all__ = ["register", "compute_policy_loss_prolix", "linear_logprobs_rmpad", "forward_with_prolix_backend",
           "patch_model_forward", "rollout_correction_from_verl", "compute_rollout_correction_prolix"]

TESTED_VERL = "0.9.1"
LOSS_NAME = BACKEND_NAME = "prolix"
# verl loss_agg_mode → (prolix loss_agg, what the normalizer counts)
_AGGREGATIONS = {
    "token-mean": ("token-mean", "batch_num_tokens"),
    "token-sum": ("token-mean", None),
    "seq-mean-token-mean": ("seq-mean-token-mean", "global_batch_size"),
    "seq-mean-token-sum": ("seq-mean-token-sum", "global_batch_size"),
    "seq-mean-token-sum-norm": ("seq-mean-token-sum-norm", "global_batch_size"),
}
# model types whose verl forward is model-specific (vision-language): not covered by this backend
_VLM_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5", "qwen3_5_moe", "kimi_vl")


def _import(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"prolix.kernels.integrations.verl needs verl (tested with verl=={TESTED_VERL}); {module} failed "
            f"to import: {e}. On a CPU machine: `pip install --no-deps verl=={TESTED_VERL}` plus "
            "`pip install ray 'tensordict>=0.8,<=0.10,!=0.9.0' omegaconf codetiming`") from e


# ------------------------------------------------------------------------ policy loss


def _cfg(config, name: str, default):
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def compute_policy_loss_prolix(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """verl's "vanilla" clipped policy loss (with dual clip) through `prolix.kernels.grpo_loss`.

    old_log_prob, log_prob, advantages: [B, T] float; gradients flow into log_prob.
    response_mask: [B, T] bool/0-1, the tokens in the loss.
    loss_agg_mode: one of verl's five modes (module docstring).
    config: verl ActorConfig (or a DictConfig): clip_ratio(_low/_high), clip_ratio_c,
            global_batch_info {dp_size, batch_num_tokens, global_batch_size, loss_scale_factor}.
    rollout_is_weights: [B, T] float or None, verl's rollout-correction weights on the surrogate.
    Returns (pg_loss 0-d fp32, metrics dict of floats) like verl's registered losses.
    """
    if config is None:
        raise ValueError("config: the prolix policy loss needs verl's actor config (clip ratios), got None")
    if loss_agg_mode not in _AGGREGATIONS:
        raise ValueError(f"loss_agg_mode: expected one of {tuple(_AGGREGATIONS)}, got {loss_agg_mode!r}")
    if log_prob.dim() != 2 or response_mask.shape != log_prob.shape:
        raise ValueError(f"log_prob/response_mask: expected equal [B, T] shapes, got {tuple(log_prob.shape)} "
                         f"and {tuple(response_mask.shape)}")
    clip = _cfg(config, "clip_ratio", 0.2)
    info = dict(_cfg(config, "global_batch_info", {}))
    dp_size = info.get("dp_size") or 1
    agg, counted = _AGGREGATIONS[loss_agg_mode]
    count = info.get(counted) if counted else None
    if counted and count is None and dp_size > 1:
        raise ValueError(f"global_batch_info[{counted!r}] is required for loss_agg_mode={loss_agg_mode!r} "
                         f"when dp_size={dp_size} > 1")
    normalizer = (1.0 / dp_size) if counted is None else (None if count is None else count / dp_size)
    max_len = None
    if agg == "seq-mean-token-sum-norm":
        max_len = info.get("loss_scale_factor") or response_mask.shape[-1]
    loss_config = GRPOLossConfig(
        clip_low=_cfg(config, "clip_ratio_low", clip), clip_high=_cfg(config, "clip_ratio_high", clip),
        dual_clip=_cfg(config, "clip_ratio_c", 3.0), loss_agg=agg, max_len=max_len,
        tis_cap=None if rollout_is_weights is None else math.inf)

    rows = response_mask.bool()                                                           # [B, T]
    cu_seqlens = torch.nn.functional.pad(rows.sum(1).cumsum(0), (1, 0))                  # [B+1]
    logp, old = log_prob[rows], old_log_prob[rows].detach()                               # [N]
    rollout = None
    if rollout_is_weights is not None:       # exp(old − rollout) = w exactly; w = 0 gives weight 0
        rollout = old - torch.log(rollout_is_weights[rows].detach().to(old.dtype))
    loss, metrics = grpo_loss(logp, advantages[rows].detach(), torch.ones_like(logp), old_logp=old,
                              rollout_logp=rollout, cu_seqlens=cu_seqlens, config=loss_config,
                              normalizer=normalizer)
    ppo_kl = (old - logp.detach()).mean() if logp.numel() else logp.new_zeros(())
    return loss, {"actor/pg_clipfrac": metrics["clip_frac"].item(), "actor/ppo_kl": ppo_kl.item(),
                  "actor/pg_clipfrac_lower": metrics["dual_clip_frac"].item()}


# ------------------------------------------------------------------ rollout correction


def _bounds(spec, name: str) -> tuple[float | None, float]:
    """verl's threshold spec: a number / "u" (upper only) or "l_u" → (lower or None, upper)."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise TypeError(f"{name}: expected a number or a 'lower_upper' string, got {spec!r}")
    text = str(spec).strip()
    try:
        lower, upper = text.split("_", 1) if "_" in text else (None, text)
        return (None if lower is None else float(lower)), float(upper)
    except ValueError:
        raise ValueError(f"{name}: expected a number or a 'lower_upper' string, got {spec!r}") from None


def rollout_correction_from_verl(config) -> RolloutCorrectionConfig | None:
    """prolix's RolloutCorrectionConfig for verl's rollout-correction options (a verl
    RolloutCorrectionConfig, DictConfig or dict); None when none is on. ValueError naming an
    option prolix does not have (module docstring)."""
    level = _cfg(config, "rollout_is", None)
    rs = _cfg(config, "rollout_rs", None)
    if _cfg(config, "rollout_is_batch_normalize", False):
        raise ValueError("rollout_is_batch_normalize=True is not supported by prolix's rollout correction")
    kw = {}
    if level is not None:
        if level != "token":
            raise ValueError(f"rollout_is={level!r}: verl's sequence weight is the product of the token ratios, "
                             "prolix's (is_level='sequence') their geometric mean; only 'token' maps")
        lower, upper = _bounds(_cfg(config, "rollout_is_threshold", 2.0), "rollout_is_threshold")
        kw.update(is_level="token", is_mode="truncate" if lower is None else "mask", is_min=lower, is_max=upper)
    if rs is not None:
        options = [o.strip() for o in str(rs).split(",") if o.strip()]
        if options not in (["seq_mean_k1"], ["seq_mean_k3"]):
            raise ValueError(f"rollout_rs={rs!r}: prolix rejects by one of 'seq_mean_k1', 'seq_mean_k3'")
        lower, upper = _bounds(_cfg(config, "rollout_rs_threshold", None), "rollout_rs_threshold")
        if options == ["seq_mean_k3"]:
            if lower is not None:
                raise ValueError(f"rollout_rs_threshold: seq_mean_k3 takes one upper bound, got lower {lower}")
            kw.update(reject_estimator="k3", reject_threshold=upper)
        else:
            if lower is not None and not math.isclose(lower * upper, 1.0, rel_tol=1e-9):
                raise ValueError(f"rollout_rs_threshold: prolix's k1 rule is symmetric (lower = 1/upper), got "
                                 f"{lower}_{upper}")
            kw.update(reject_estimator="k1", reject_threshold=math.log(upper))
    rc = RolloutCorrectionConfig(**kw)
    return rc if rc.enabled else None


def compute_rollout_correction_prolix(old_log_prob, rollout_log_prob, response_mask, rollout_is=None,
                                      rollout_is_threshold=2.0, rollout_is_batch_normalize=False, rollout_rs=None,
                                      rollout_rs_threshold=None):
    """verl's `compute_rollout_correction_and_rejection_mask` computed by prolix's rules.

    old_log_prob, rollout_log_prob: [B, T] float; response_mask: [B, T] bool/0-1.
    Options as verl's (module docstring for the mapping).
    Returns (weights [B, T] fp32 — 0 on padding and dropped tokens — or None without rollout_is,
    response_mask [B, T] in its dtype without the dropped tokens, metrics {"rollout_corr/…": float}).
    """
    rc = rollout_correction_from_verl(dict(
        rollout_is=rollout_is, rollout_is_threshold=rollout_is_threshold, rollout_rs=rollout_rs,
        rollout_is_batch_normalize=rollout_is_batch_normalize, rollout_rs_threshold=rollout_rs_threshold))
    if old_log_prob.shape != rollout_log_prob.shape or old_log_prob.shape != response_mask.shape:
        raise ValueError(f"old_log_prob/rollout_log_prob/response_mask: expected equal [B, T] shapes, got "
                         f"{tuple(old_log_prob.shape)}, {tuple(rollout_log_prob.shape)}, {tuple(response_mask.shape)}")
    if rc is None:
        return None, response_mask, {}
    rows = response_mask.bool()                                                           # [B, T]
    cu_seqlens = torch.nn.functional.pad(rows.sum(1).cumsum(0), (1, 0))                  # [B+1]
    ones = torch.ones(int(rows.sum()), dtype=torch.float32, device=rows.device)         # [N]
    corr = rollout_correction(old_log_prob[rows].float(), rollout_log_prob[rows].float(), torch.zeros_like(ones),
                              ones, cu_seqlens, rc)
    weights = None
    if corr.weight is not None:
        weights = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
        weights[rows] = corr.weight
    keep = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
    keep[rows] = corr.keep
    return weights, (response_mask * keep).to(response_mask.dtype), {k: v.item() for k, v in corr.metrics.items()}


# --------------------------------------------------------------- log-probs for the actor


def linear_logprobs_rmpad(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids_rmpad_rolled: torch.Tensor,
    temperature: float = 1.0,
    calculate_entropy: bool = True,
):
    """Log-probs (and entropy) of the next tokens on verl's remove-padding layout.

    hidden_states: [total_nnz, H] or [1, total_nnz, H], final hidden states of the packed tokens.
    lm_head_weight: [V, H] (an FSDP2 DTensor is gathered); hidden_states is cast to its dtype.
    input_ids_rmpad_rolled: [total_nnz] or [1, total_nnz] int, the input ids rolled by −1 (the
                  next token of each position; the last one of a sequence wraps and is ignored
                  by verl's response mask).
    Returns (log_probs, entropy or None), fp32, shaped like input_ids_rmpad_rolled;
    differentiable in hidden_states and lm_head_weight.
    """
    weight = lm_head_weight.full_tensor() if hasattr(lm_head_weight, "full_tensor") else lm_head_weight
    if hidden_states.shape[:-1] != input_ids_rmpad_rolled.shape:
        raise ValueError(f"input_ids_rmpad_rolled: expected shape {tuple(hidden_states.shape[:-1])} "
                         f"(hidden_states without H), got {tuple(input_ids_rmpad_rolled.shape)}")
    with torch.autocast(hidden_states.device.type, enabled=False):   # the kernel picks its own precision
        out = linear_logprobs(hidden_states.to(weight.dtype), weight, input_ids_rmpad_rolled,
                              temperature=float(temperature), return_entropy=calculate_entropy)
    return out if calculate_entropy else (out, None)


def forward_with_prolix_backend(
    self,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values=None,
    inputs_embeds: torch.FloatTensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
    return_dict: bool | None = None,
    cache_position: torch.LongTensor | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    temperature: float = 1.0,
    shift_labels: torch.LongTensor | None = None,
    **loss_kwargs,
):
    """verl's `forward_with_torch_backend` with prolix's kernel: the backbone, then
    `linear_logprobs_rmpad` on its output; returns verl's `CausalLMOutputForPPO`."""
    dense_common = _import("verl.models.transformers.dense_common")
    if return_dict is False:
        raise NotImplementedError("forward_with_prolix_backend has to return_dict")
    backbone_kwargs = {k: v for k, v in dict(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
        output_attentions=output_attentions, output_hidden_states=output_hidden_states).items() if v is not None}
    outputs = self.get_decoder()(use_cache=bool(use_cache), **backbone_kwargs)
    hidden_states = outputs[0]                                               # [1, total_nnz, H]
    # verl passes labels already rolled over the global sequence (shift_labels) under sequence parallelism
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise RuntimeError("forward_with_prolix_backend needs labels, shift_labels or input_ids")
    log_probs, entropy = linear_logprobs_rmpad(hidden_states, self.get_output_embeddings().weight, rolled,
                                               temperature=temperature)
    return dense_common.CausalLMOutputForPPO(
        log_probs=log_probs, entropy=entropy, hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None))


def patch_model_forward(model) -> None:
    """Route one actor model's forward through `forward_with_prolix_backend` (dense text models)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in _VLM_TYPES:
        raise ValueError(f"fused_kernels_backend='prolix' supports dense text models; {model_type!r} uses a "
                         "model-specific verl forward")
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise ValueError("fused_kernels_backend='prolix': an LM head with a bias is not supported")
    model._verl_fused_kernels_backend = BACKEND_NAME
    model.forward = forward_with_prolix_backend.__get__(model)   # this instance only, not its class


# --------------------------------------------------------------------------- registration


def register() -> None:
    """Register the "prolix" policy loss and fused-kernel backend with verl (idempotent)."""
    core_algos = _import("verl.trainer.ppo.core_algos")
    monkey_patch = _import("verl.models.transformers.monkey_patch")
    if core_algos.POLICY_LOSS_REGISTRY.get(LOSS_NAME) is not compute_policy_loss_prolix:
        core_algos.register_policy_loss(LOSS_NAME)(compute_policy_loss_prolix)
    original = monkey_patch.patch_forward_with_backends
    if getattr(original, "_prolix_wrapped", False):
        return

    def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str = None):
        if use_fused_kernels and fused_kernels_backend == BACKEND_NAME:
            return patch_model_forward(model)
        return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)

    patch_forward_with_backends._prolix_wrapped = True
    patch_forward_with_backends.__wrapped__ = original
    monkey_patch.patch_forward_with_backends = patch_forward_with_backends


if sys.modules.get("verl") is not None:   # imported by verl's plugin / external-module loader, or after verl
    register()
