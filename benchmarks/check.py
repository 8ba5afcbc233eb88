"""Every provider's answer is checked against a reference before it is timed.

The reference is the float64 math of `prolix.kernels.reference`, streamed over chunks of
tokens so it fits at the real shapes too (a [rows, V] fp64 block at a time, ≈ 256 MB; the
[V, H] fp64 weight and its gradient are the largest buffers): the log-probs, and through
`torch.autograd` on each chunk, the hidden and weight gradients for a given upstream gradient.
The GRPO references feed `grpo_loss_ref`'s fp64 gradient w.r.t. the log-probs into that
streamed backward, so the fused kernel is checked end to end in float64 at every N.

`--check prolix` compares against prolix in the bench dtype instead (cheaper, and a relative
check only); `--check none` skips checking.

Errors are relative to the reference's scale: max|x − ref| / max|ref| per output (the value,
the hidden gradient, the weight gradient), so one number reads the same for a [N] log-prob
vector and a [V, H] gradient. `TOLERANCE` flags a provider that computes something else (a
sign, a missing term), not one that is merely less precise: the numbers themselves are
reported for that.
"""

from __future__ import annotations

from typing import Callable

import torch

from .cases import IGNORE_INDEX, Inputs

# Relative error above which an answer is called wrong, by the bench dtype.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-1, torch.float16: 5e-2}
_FP64_BLOCK_BYTES = 256 << 20


def _rows_per_chunk(V: int) -> int:
    return max(1, _FP64_BLOCK_BYTES // (8 * V))


def streamed_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    grad_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """fp64 (logp [N], dH [N, H], dW [V, H]) of `linear_logprobs_ref`, chunk by chunk.

    With `grad_logp` [N] the gradients of Σ grad_logp·logp are returned too, else (logp, None,
    None). Every chunk is the reference itself, so this is the same math, only bounded memory.
    """
    from prolix.kernels.reference import linear_logprobs_ref

    w64 = weight.detach().double().requires_grad_(grad_logp is not None)
    rows = _rows_per_chunk(weight.shape[0])
    logps, dhs = [], []
    for s in range(0, hidden.shape[0], rows):
        h = hidden[s : s + rows].detach().double().requires_grad_(grad_logp is not None)
        with torch.set_grad_enabled(grad_logp is not None):
            logp, _ = linear_logprobs_ref(h, w64, targets[s : s + rows], ignore_index=IGNORE_INDEX)
            if grad_logp is not None:
                logp.backward(grad_logp[s : s + rows].double())
                dhs.append(h.grad)
        logps.append(logp.detach())
    if grad_logp is None:
        return torch.cat(logps), None, None
    return torch.cat(logps), torch.cat(dhs), w64.grad


def grpo_loss_ref64(inp: Inputs, logp: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 (loss, dloss/dlogp [N]) of `grpo_loss_ref` at the given log-probs [N]."""
    from prolix.kernels.reference import grpo_loss_ref

    x = logp.detach().double().requires_grad_()
    loss = grpo_loss_ref(
        x, inp.advantages, inp.mask, old_logp=inp.old_logp, ref_logp=inp.ref_logp,
        cu_seqlens=inp.cu_seqlens, config=config,
    )
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def reference_fp64(kernel: str, inp: Inputs, grad_out: torch.Tensor | None, config, *,
                   with_grads: bool = True) -> dict:
    """{"out", "grads"} in fp64 for one case, kept on the CPU: what every provider is compared
    with. (On the CPU so that the [V, H] fp64 gradient does not sit in device memory while the
    providers run: it would move the N at which they run out of memory.)

    linear-logprobs: out = logp [N], grads = (dH, dW) for upstream `grad_out` [N];
    grpo-loss: out = loss, grads = (dlogp,); fused-grpo: out = loss, grads = (dH, dW).
    Without `with_grads`, grads is None (and the streamed backward is not run).
    """
    grads = None
    if kernel == "linear-logprobs":
        out, *grads = streamed_logprobs_ref(inp.hidden, inp.weight, inp.targets,
                                            grad_out if with_grads else None)
    elif kernel == "grpo-loss":
        out, dlogp = grpo_loss_ref64(inp, inp.logp, config)
        grads = [dlogp]
    else:
        logp, _, _ = streamed_logprobs_ref(inp.hidden, inp.weight, inp.targets)
        out, dlogp = grpo_loss_ref64(inp, logp, config)
        if with_grads:
            _, *grads = streamed_logprobs_ref(inp.hidden, inp.weight, inp.targets, dlogp)
    if not with_grads:
        return {"out": out.cpu(), "grads": None}
    return {"out": out.cpu(), "grads": tuple(g.cpu() for g in grads)}


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max|x − ref| / max|ref| (absolute when the reference is all zeros), computed on the CPU."""
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()
    scale = ref.abs().max().item()
    err = (x - ref).abs().max().item()
    return err / scale if scale > 0 else err


GRAD_NAMES = {"linear-logprobs": ("d_hidden", "d_weight"), "grpo-loss": ("d_logp",),
              "fused-grpo": ("d_hidden", "d_weight")}


def run_once(
    fwd: Callable[[], torch.Tensor], leaves: tuple, grad_out: torch.Tensor | None, with_grads: bool
) -> dict:
    """One provider call: {"out", "grads"} (grads of Σ grad_out·out w.r.t. `leaves`)."""
    out = fwd()
    grads = None
    if with_grads:
        grads = torch.autograd.grad(out, leaves, grad_out)
    return {"out": out.detach(), "grads": grads}


def compare(kernel: str, got: dict, ref: dict) -> dict:
    """{"out": e, "d_hidden": e, ...}: relative errors of a provider's answer vs the reference."""
    errors = {"out": relative_error(got["out"].float(), ref["out"])}
    if got["grads"] is not None and ref["grads"] is not None:
        for name, g, r in zip(GRAD_NAMES[kernel], got["grads"], ref["grads"]):
            errors[name] = relative_error(g, r)
    return errors
