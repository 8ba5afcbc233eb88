"""Checks that keep a diverged run from being saved or sampled from.

    all_finite(policy.parameters())     one fused reduction, one host sync: False when any
                                        weight is NaN or ±inf
    NonFiniteLogitsError                what the torch sampler raises instead of letting
                                        `torch.multinomial` fail on NaN probabilities

The loop checks the weights after every AdamW step (loop.py `Trainer.update`): a learning rate
that is finite but far too large (optim.lr=1e20) turns finite gradients into non-finite weights,
which the loss and gradient-norm guards, run before the step, cannot see. The run then stops
with `TrainingDivergedError` (exit 3) before anything is saved.

Layer (.importlinter `trainer-layers`): a leaf, beside `packing` and `tokenizer`. It imports
only torch, so the engines (the torch sampler raises NonFiniteLogitsError) and the loop can
both use it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["all_finite", "NonFiniteLogitsError"]


class NonFiniteLogitsError(FloatingPointError):
    """The policy produced NaN or ±inf logits while sampling: its weights have diverged."""


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when no element of any tensor is NaN or ±inf.

    The max-norm (max |x|) of every tensor in one `torch._foreach_norm` launch per dtype and
    device, stacked and reduced on the device: one host sync for the whole model, not one per
    tensor. The max-norm cannot overflow (a 2-norm of finite weights of 1e20 would), it is inf
    exactly when an element is ±inf, and NaN propagates through it.
    """
    by_group: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        t = _local(t.detach())
        if t.numel():
            by_group.setdefault((t.device, t.dtype), []).append(t)
    if not by_group:
        return True
    flags = []
    for group in by_group.values():
        norms = torch._foreach_norm(group, float("inf"))               # [1 per tensor], their dtype
        flags.append(torch.stack(norms).isfinite().all())
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())      # the one sync
