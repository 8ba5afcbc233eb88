"""The implementations compared, per kernel: prolix and its baselines.

A provider's `build(inp, ctx)` returns a zero-argument callable that runs its forward on the
case's inputs and returns the output (log-probs [N] fp32, or a scalar loss); the runner times
it, differentiates it and checks it. A provider that cannot run here raises `Skip(reason)`.

| kernel          | prolix                    | eager / compile               | liger                                  | cce |
|-----------------|---------------------------|-------------------------------|----------------------------------------|-----|
| linear-logprobs | linear_logprobs           | log_softmax(h@Wᵀ).gather      | FLCE(reduction="none"), logp = −CE     | linear_cross_entropy(reduction="none") |
| grpo-loss       | grpo_loss on [N] logp     | grpo_loss_ref(upcast=False)   | skipped (needs [N, V] logits)          | skipped (no GRPO loss) |
| fused-grpo      | fused_linear_grpo_loss    | eager logp + grpo_loss_ref    | LigerFusedLinearGRPOLoss; liger-triton: | CCE logp + grpo_loss_ref |
|                 |                           |                               | h@Wᵀ logits + triton_grpo_loss         |     |

TRL (`trl_providers.py`): "trl" = TRL's `selective_log_softmax` on full logits (+ GRPOTrainer's
`_compute_loss`), "trl-chunked" = TRL's `ChunkedLogProbFunction` (GRPOTrainer 1.16's fused head),
"trl+prolix" = prolix's TRL integration; each runs TRL's own code, or is skipped with the reason.

train (`train_step.py`): the fused-grpo heads on a model's hidden states, prolix called exactly
as `Trainer.update` calls it.

All run at temperature 1 (CCE and Liger's FLCE have no temperature argument).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import trl_providers as T
from .cases import IGNORE_INDEX, Inputs
from .provider_types import Context, Forward, Provider, Skip, padded_sequences

BASELINES = ("eager", "compile", "liger", "cce", "trl")
COMPILE_CHUNK = {"cuda": 4096, "cpu": 256}  # tokens per compiled chunk


def bench_config():
    """The GRPO objective benchmarked: DAPO clip-higher (0.2 / 0.28), k3 KL with β = 0.01
    (ProRL keeps a KL term), token-mean over the micro-batch. Liger's "dapo" loss is the same."""
    from prolix.kernels import GRPOLossConfig

    return GRPOLossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.01, kl_estimator="k3",
                          loss_agg="token-mean")


# ----------------------------------------------------------------------------- torch baselines


def eager_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The eager baseline: log_softmax(h @ Wᵀ).gather(y) over the full logits.

    hidden [N, H], weight [V, H] (bench dtype); returns logp [N] fp32, 0 on ignored rows.
    The GEMM runs in the bench dtype and the softmax on fp32 logits [N, V], exactly as
    `linear_logprobs_ref(upcast=False)`, minus the entropy that the reference always computes
    (two more [N, V] passes that no other provider here pays for).
    """
    logits = (hidden @ weight.T).float()                          # [N, V] fp32
    valid = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(valid, logp, torch.zeros_like(logp))


def eager_loss(logp: torch.Tensor, inp: Inputs, config) -> torch.Tensor:
    """grpo_loss_ref in fp32 (upcast=False): the GRPO loss in plain torch ops."""
    from prolix.kernels.reference import grpo_loss_ref

    return grpo_loss_ref(logp, inp.advantages, inp.mask, old_logp=inp.old_logp,
                         ref_logp=inp.ref_logp, cu_seqlens=inp.cu_seqlens, config=config,
                         upcast=False)


_COMPILED: dict[str, Callable] = {}


def _compiled(name: str, fn: Callable) -> Callable:
    """One torch.compile object per function for the whole run (shapes recompile, not reset).

    Run it under `no_donated_buffers()`: with donated buffers a compiled backward refuses
    `retain_graph=True`, which the backward-only timing needs (it replays one graph's backward).
    """
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def no_donated_buffers():
    """A context for the whole sweep: the forward and the (lazily compiled) backward of every
    compiled baseline keep their saved tensors, so their backward can be replayed."""
    import torch._functorch.config as functorch_config

    return functorch_config.patch(donated_buffer=False)


def compiled_logprobs(hidden, weight, targets, device: torch.device) -> torch.Tensor:
    """torch.compile of `eager_logprobs`, chunked over tokens: [chunk, V] logits at a time."""
    fn = _compiled("logprobs", eager_logprobs)
    chunk = COMPILE_CHUNK[device.type]
    return torch.cat([fn(hidden[s : s + chunk], weight, targets[s : s + chunk])
                      for s in range(0, hidden.shape[0], chunk)])


def _compiled_loss(logp, adv, mask, old, ref, cu, config):
    from prolix.kernels.reference import grpo_loss_ref

    return grpo_loss_ref(logp, adv, mask, old_logp=old, ref_logp=ref, cu_seqlens=cu,
                         config=config, upcast=False)


def compiled_loss(logp: torch.Tensor, inp: Inputs, config) -> torch.Tensor:
    fn = _compiled("loss", _compiled_loss)
    return fn(logp, inp.advantages, inp.mask, inp.old_logp, inp.ref_logp, inp.cu_seqlens, config)


# ----------------------------------------------------------------------------- external baselines


def _need_cuda(ctx: Context, what: str) -> None:
    """Triton baselines need a GPU. (The Triton interpreter could run them on CPU, but slowly
    enough to dominate a smoke run, and the pytest session sets TRITON_INTERPRET=1.)"""
    if ctx.device.type != "cuda":
        raise Skip(f"{what} is a Triton kernel for CUDA; on CPU it fails (Triton finds no GPU driver)")


def _liger():
    try:
        import liger_kernel  # noqa: F401
    except ImportError as e:
        raise Skip(f"liger-kernel is not installed ({e}); pip install 'prolix[bench]'") from e


def _cce():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise Skip(f"cut-cross-entropy is not installed ({e}); pip install cut-cross-entropy") from e
    return linear_cross_entropy


def cce_logprobs(inp: Inputs, ctx: Context) -> Callable[[], torch.Tensor]:
    linear_cross_entropy = _cce()
    _need_cuda(ctx, "Cut Cross-Entropy (impl='cce')")
    return lambda: -linear_cross_entropy(inp.hidden, inp.weight, inp.targets,
                                         ignore_index=IGNORE_INDEX, reduction="none").float()


def liger_flce(inp: Inputs, ctx: Context) -> Forward:
    _liger()
    _need_cuda(ctx, "Liger's LigerFusedLinearCrossEntropyLoss")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    ce = LigerFusedLinearCrossEntropyLoss(reduction="none", ignore_index=IGNORE_INDEX)

    def fwd():
        out = ce(inp.weight, inp.hidden, inp.targets)
        return -(out[0] if isinstance(out, tuple) else out).float()
    return fwd


def liger_grpo(inp: Inputs, ctx: Context) -> Forward:
    _liger()
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    cfg = ctx.config
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=cfg.kl_coef, epsilon_low=cfg.clip_low, epsilon_high=cfg.clip_high, loss_type="dapo",
        use_ref_model=True, chunk_size=1, temperature=1.0,
        compiled=ctx.device.type == "cuda",  # its torch.compile of the loss math: GPU only
    )
    return lambda: loss_fn(
        padded_sequences(inp.hidden, inp), inp.weight, padded_sequences(inp.safe_targets, inp), padded_sequences(inp.mask, inp),
        inp.adv_seq, ref_per_token_logps=padded_sequences(inp.ref_logp, inp),
        old_per_token_logps=padded_sequences(inp.old_logp, inp),
    )[0]


def liger_triton_grpo(inp: Inputs, ctx: Context) -> Forward:
    _liger()
    _need_cuda(ctx, "Liger's triton_grpo_loss")
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    cfg, (S, H) = ctx.config, (inp.S, inp.shape.H)

    def fwd():
        # Its logits are [S, L+1, V] (the last position has no target): one dummy row per sequence.
        h = torch.cat([padded_sequences(inp.hidden, inp), inp.hidden.new_zeros(S, 1, H)], dim=1)
        logits = h @ inp.weight.T                                   # [S, L+1, V], bench dtype
        loss, _ = triton_grpo_loss(
            logits, padded_sequences(inp.old_logp, inp), padded_sequences(inp.ref_logp, inp), padded_sequences(inp.safe_targets, inp),
            inp.adv_seq, padded_sequences(inp.mask, inp), temperature=1.0, beta=cfg.kl_coef,
            eps_low=cfg.clip_low, eps_high=cfg.clip_high, loss_type="dapo", reduce=True,
        )
        return loss
    return fwd


def _skip(reason: str) -> Callable[[Inputs, Context], Forward]:
    def build(inp, ctx):
        raise Skip(reason)
    return build


# ----------------------------------------------------------------------------- registry


def _prolix_linear(inp, ctx):
    from prolix.kernels import linear_logprobs

    return lambda: linear_logprobs(inp.hidden, inp.weight, inp.targets, ignore_index=IGNORE_INDEX)


def _prolix_loss(inp, ctx):
    from prolix.kernels import grpo_loss

    return lambda: grpo_loss(inp.logp, inp.advantages, inp.mask, old_logp=inp.old_logp,
                             ref_logp=inp.ref_logp, cu_seqlens=inp.cu_seqlens, config=ctx.config)[0]


def _prolix_trainer_head(inp, ctx):
    """fused_linear_grpo_loss exactly as `Trainer.update` calls it (entropy metric on)."""
    from prolix.kernels import fused_linear_grpo_loss

    return lambda: fused_linear_grpo_loss(
        inp.hidden, inp.weight, inp.targets, inp.advantages, inp.mask, old_logp=inp.old_logp,
        ref_logp=inp.ref_logp, cu_seqlens=inp.cu_seqlens, config=ctx.config, ignore_index=IGNORE_INDEX,
        entropy_metric=True)[0]


def _prolix_fused(inp, ctx):
    from prolix.kernels import fused_linear_grpo_loss

    return lambda: fused_linear_grpo_loss(
        inp.hidden, inp.weight, inp.targets, inp.advantages, inp.mask, old_logp=inp.old_logp,
        ref_logp=inp.ref_logp, cu_seqlens=inp.cu_seqlens, config=ctx.config)[0]


_COMPILE_NOTE = ("torch.compile (inductor, static shapes) of the eager code, chunked over tokens; "
                 "compilation happens in the warm-up, never in the timed calls")
_GRADS_IN_FWD = "computes the gradients inside its forward: 'fwd' includes the backward's work"

PROVIDERS: dict[str, tuple[Provider, ...]] = {
    "linear-logprobs": (
        Provider("prolix", None, _prolix_linear),
        Provider("eager", "eager", lambda i, c: lambda: eager_logprobs(i.hidden, i.weight, i.targets)),
        Provider("compile", "compile", lambda i, c: lambda: compiled_logprobs(
            i.hidden, i.weight, i.targets, c.device), _COMPILE_NOTE),
        Provider("liger", "liger", liger_flce, _GRADS_IN_FWD),
        Provider("cce", "cce", cce_logprobs, "gradient filtering on (CCE's default filter_eps)"),
        Provider("trl", "trl", T.trl_linear, T.NOTES["trl-linear"]),
        Provider("trl-chunked", "trl", T.trl_chunked_linear, T.NOTES["trl-chunked-linear"]),
        Provider("trl+prolix", "trl", _skip(T.SKIPS["trl+prolix-linear"])),
    ),
    "grpo-loss": (
        Provider("prolix", None, _prolix_loss),
        Provider("eager", "eager", lambda i, c: lambda: eager_loss(i.logp, i, c.config)),
        Provider("compile", "compile", lambda i, c: lambda: compiled_loss(i.logp, i, c.config),
                 "torch.compile (inductor, static shapes) of grpo_loss_ref(upcast=False)"),
        Provider("liger", "liger", _skip(
            "Liger's triton_grpo_loss takes materialised logits [S, L+1, V], not log-probs; "
            "it is measured in fused-grpo as 'liger-triton' (h@Wᵀ logits + triton_grpo_loss)")),
        Provider("cce", "cce", _skip("Cut Cross-Entropy has no GRPO loss; its log-probs are "
                                     "measured in linear-logprobs and fused-grpo")),
        Provider("trl", "trl", T.trl_loss, T.NOTES["trl-loss"]),
        Provider("trl-chunked", "trl", _skip(T.SKIPS["trl-chunked-loss"])),
        Provider("trl+prolix", "trl", _skip(T.SKIPS["trl+prolix-loss"])),
    ),
    "fused-grpo": (
        Provider("prolix", None, _prolix_fused, "three-GEMM default; " + _GRADS_IN_FWD),
        Provider("eager", "eager", lambda i, c: lambda: eager_loss(
            eager_logprobs(i.hidden, i.weight, i.targets), i, c.config)),
        Provider("compile", "compile", lambda i, c: lambda: compiled_loss(
            compiled_logprobs(i.hidden, i.weight, i.targets, c.device), i, c.config),
            _COMPILE_NOTE),
        Provider("liger", "liger", liger_grpo,
                 "LigerFusedLinearGRPOLoss (chunked torch); " + _GRADS_IN_FWD),
        Provider("liger-triton", "liger", liger_triton_grpo,
                 "full [S, L+1, V] logits from torch matmul + Liger's triton_grpo_loss"),
        Provider("cce", "cce", lambda i, c: _cce_fused(i, c), "CCE log-probs + the GRPO loss in torch"),
        Provider("trl", "trl", T.trl_fused, T.NOTES["trl"]),
        Provider("trl-chunked", "trl", T.trl_chunked_fused, T.NOTES["trl-chunked"]),
        Provider("trl+prolix", "trl", T.trl_prolix_fused, T.NOTES["trl+prolix"]),
    ),
}
# The trainer step: the backbone, then one of the fused-grpo heads on its hidden states.
PROVIDERS["train"] = (
    Provider("prolix", None, _prolix_trainer_head,
             "fused_linear_grpo_loss as Trainer.update calls it (entropy metric on); " + _GRADS_IN_FWD),
    *(p for p in PROVIDERS["fused-grpo"] if p.name != "prolix"),
)


def _cce_fused(inp: Inputs, ctx: Context) -> Forward:
    logprobs = cce_logprobs(inp, ctx)
    return lambda: eager_loss(logprobs(), inp, ctx.config)


def leaves(kernel: str, inp: Inputs) -> tuple[torch.Tensor, ...]:
    """The tensors a backward differentiates: (hidden, weight), or (logp,) for grpo-loss."""
    return (inp.logp,) if kernel == "grpo-loss" else (inp.hidden, inp.weight)


def grad_output(kernel: str, inp: Inputs, seed: int = 1) -> torch.Tensor | None:
    """The upstream gradient: random [N] fp32 for log-probs (never ones), None for a scalar loss."""
    if kernel != "linear-logprobs":
        return None
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(inp.N, generator=g).to(inp.targets.device)
