r"""The GRPO loss entry points: `grpo_loss` on given log-probs, and `fused_linear_grpo_loss` (and
its module `FusedLinearGRPOLoss`) from hidden states through the LM head, never holding [N, V].

The objective, its aggregations and its per-token derivatives are in kernels/grpo_objective.py.
`fused_linear_grpo_loss` runs one of two algorithms (N tokens, H hidden, V vocabulary):
- "three_gemm" (the default, kernels/three_gemm.py): because a token's loss depends only on its
  own logp and entropy (and per-token constants: rollout correction's weight and keep vectors
  are computed before the pass; `needs_sequence_logp` configs take "four_gemm"), ∂loss/∂logp is
  known chunk by chunk inside the forward, so the forward also computes ∂hidden and ∂weight:
  GEMM 1 writes E = exp(z − z_y) for a chunk of C rows, then two cuBLAS GEMMs (dh, dW) read it.
  3 GEMMs of 2·N·H·V FLOP, the backward a multiply by grad_output; extra memory C·V·2 B (E,
  ≈ 1.25 GB by default) + V·H·4 B (fp32 dW). Rows with zero loss weight (prompt tokens) are
  skipped.
- "four_gemm": `linear_logprobs` (forward over the vocabulary) then its backward fed with the
  loss node's ∂loss/∂logp (logit recompute, dh, dW): 4 GEMMs, extra memory the dz buffer.

Shapes: N packed tokens, S sequences, H hidden, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import check_lm_head_inputs, resolve_batch_invariant, seq_ids
from .grpo_config import ALGORITHMS, GRPOLossConfig
from .grpo_objective import GRPOLossFunction, aggregation_weights, correct, grpo_forward, metric_names
from .linear_logprob import linear_logprobs
from .three_gemm import attach_gradients, three_gemm_logprob_grads

__all__ = ["GRPOLossConfig", "grpo_loss", "fused_linear_grpo_loss", "FusedLinearGRPOLoss"]


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


def _grpo_loss(logp, advantages, mask, old_logp, ref_logp, rollout_logp, entropy, cu_seqlens,
               config, normalizer):
    """grpo_loss on validated inputs."""
    m = mask.detach().to(torch.promote_types(logp.dtype, torch.float32))  # [N] fp32 (fp64 for fp64 logp)
    m, is_weight, corr_metrics = correct(logp, advantages, m, old_logp, rollout_logp, cu_seqlens, config)
    weights = aggregation_weights(m, cu_seqlens, config, normalizer)        # [N], same dtype
    seqs = None
    if config.ratio_level == "sequence":
        seqs = (seq_ids(cu_seqlens, m.shape[0]), cu_seqlens.shape[0] - 1)
    if config.entropy_coef == 0 and entropy is not None:
        entropy = entropy.detach()  # metric only: keep it out of the graph
    # old/ref log-probs, weights and advantages are constants: the Function returns no grad for them.
    loss, metrics = GRPOLossFunction.apply(
        logp, entropy, advantages, m, old_logp, ref_logp, is_weight, weights, seqs, config)
    names = metric_names(config, ref_logp is not None, entropy is not None)
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
    batch_invariant: bool = False,
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
    algorithm: "auto" | "three_gemm" | "four_gemm". three_gemm (kernels/three_gemm.py) computes
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
              (None: E ≈ 1.25 GB, `three_gemm.default_chunk_rows`).
    batch_invariant: each row's logp and entropy (and so its loss terms) have the same bits
              whatever the number of rows, their order, their neighbours (ignored rows included)
              and chunk_rows, on the same hardware, thread count and library versions; both
              algorithms give the bits `linear_logprobs(batch_invariant=True)` gives, and the
              gradients are deterministic run to run. Also on inside `prolix.kernels.batch_invariant()`.

    Returns (loss, metrics) as `grpo_loss`: loss 0-d fp32, differentiable w.r.t. hidden and weight.
    """
    # dtypes, vocabulary range and the weight are checked by linear_logprobs; here what the loss needs
    invariant = resolve_batch_invariant(batch_invariant)
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
        out = linear_logprobs(hidden, weight, targets, temperature=config.temperature, ignore_index=ignore_index,
                              return_entropy=want_entropy, backend=backend, batch_invariant=invariant)
        logp, entropy = out if want_entropy else (out, None)
        return _grpo_loss(logp, advantages, mask, old_logp, ref_logp, rollout_logp, entropy, cu_seqlens,
                          config, normalizer)
    backend = check_lm_head_inputs(hidden, weight, targets, config.temperature, ignore_index, backend)
    return _three_gemm_loss(hidden, weight, targets.to(torch.int64), advantages, mask, old_logp, ref_logp,
                            rollout_logp, cu_seqlens, config, normalizer, want_entropy, backend, chunk_rows,
                            invariant)


def _three_gemm_loss(hidden, weight, targets, advantages, mask, old_logp, ref_logp, rollout_logp,
                     cu_seqlens, config, normalizer, want_entropy, backend, chunk_rows, invariant):
    """fused_linear_grpo_loss, algorithm="three_gemm", on validated inputs (config.token_local,
    and old_logp given when rollout correction is on)."""
    m = mask.detach().to(torch.float32)                                   # [N] fp32
    # rollout correction's keep and weight [N] (and tis_cap's weight) read only constants: computed
    # once here and sliced per chunk; without old_logp tis_cap's weight exp(logp − rollout) is
    # per token, from each chunk's own logp
    constants = old_logp is not None or config.tis_cap is None
    m, is_weight, corr_metrics = (correct(None, advantages, m, old_logp, rollout_logp, cu_seqlens, config)
                                  if constants else (m, None, {}))
    weights = aggregation_weights(m, cu_seqlens, config, normalizer)     # [N] fp32
    rows = torch.nonzero(weights != 0).squeeze(1)    # only these rows enter the loss or a gradient
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad

    def per_token(t, sel):
        return None if t is None else t[sel]

    def chunk_weight(logp_c, sel):
        if constants:
            return per_token(is_weight, sel)
        return correct(logp_c, None, m[sel], None, rollout_logp[sel], None, config)[1]

    def token_grads(logp_c, ent_c, sel):
        # the one definition of the per-token loss: _grpo_forward on the chunk's rows
        _, dlogp, dent, _ = grpo_forward(
            logp_c, ent_c, advantages[sel], m[sel], per_token(old_logp, sel), per_token(ref_logp, sel),
            chunk_weight(logp_c, sel), weights[sel], None, config)
        return dlogp, dent

    with torch.no_grad():
        logp, entropy, dh, dw = three_gemm_logprob_grads(
            hidden.detach(), weight.detach(), targets, rows, token_grads, inv_temp=1.0 / config.temperature,
            with_entropy=want_entropy, need_dh=need_dh, need_dw=need_dw, backend=backend, chunk_rows=chunk_rows,
            batch_invariant=invariant)
        if not constants:
            is_weight = chunk_weight(logp, slice(None))
        loss, _, _, metrics = grpo_forward(logp, entropy, advantages, m, old_logp, ref_logp, is_weight,
                                            weights, None, config)
    loss = attach_gradients(loss, hidden, weight, dh, dw)
    names = metric_names(config, ref_logp is not None, entropy is not None)
    return loss, {**dict(zip(names, metrics.unbind(0))), **corr_metrics}


class FusedLinearGRPOLoss(nn.Module):
    """nn.Module wrapper of `fused_linear_grpo_loss` with a fixed GRPOLossConfig.

    forward(hidden [N, H], weight [V, H], targets [N], advantages [N], mask [N], **kw)
      -> (loss 0-d fp32, metrics); **kw are the keyword arguments of `fused_linear_grpo_loss`.
    """

    def __init__(self, config: GRPOLossConfig = GRPOLossConfig(), *, ignore_index: int = -100,
                 backend: str = "auto", algorithm: str = "auto", batch_invariant: bool = False) -> None:
        super().__init__()
        if not isinstance(config, GRPOLossConfig):
            raise TypeError(f"config: expected a GRPOLossConfig, got {type(config).__name__}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
        self.config, self.ignore_index, self.backend, self.algorithm = config, ignore_index, backend, algorithm
        if not isinstance(batch_invariant, bool):
            raise TypeError(f"batch_invariant: expected a bool, got {type(batch_invariant).__name__}")
        self.batch_invariant = batch_invariant

    def forward(self, hidden, weight, targets, advantages, mask, **kw):
        kw.setdefault("ignore_index", self.ignore_index)
        kw.setdefault("backend", self.backend)
        kw.setdefault("algorithm", self.algorithm)
        kw.setdefault("batch_invariant", self.batch_invariant)
        return fused_linear_grpo_loss(hidden, weight, targets, advantages, mask, config=self.config, **kw)

    def extra_repr(self) -> str:
        return (f"{self.config}, ignore_index={self.ignore_index}, backend={self.backend!r}, "
                f"algorithm={self.algorithm!r}, batch_invariant={self.batch_invariant}")
