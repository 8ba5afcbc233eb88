"""Checks that keep a diverged run from being saved or sampled from.

    all_finite(policy.parameters())     one fused reduction, one host sync: False when any
                                        weight is NaN or ±inf
    NonFiniteLogitsError                what the torch sampler raises instead of letting
                                        `torch.multinomial` fail on NaN probabilities

The loop checks the weights after every AdamW step (`loop.Trainer.update`): a learning rate
that is finite but far too large (optim.lr=1e20) turns finite gradients into non-finite weights,
which the loss and gradient-norm guards, run before the step, cannot see. The run then stops
with `TrainingDivergedError` (exit 3) before anything is saved.
It imports only torch: the engines (the torch sampler raises NonFiniteLogitsError) and the loop
both use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

__all__ = ["all_finite", "NonFiniteLogitsError", "TrainingDivergedError", "DivergenceGuard"]


class NonFiniteLogitsError(FloatingPointError):
    """The policy produced NaN or ±inf logits while sampling: its weights have diverged."""


class TrainingDivergedError(RuntimeError):
    """The run diverged (non-finite weights or log-probs, or optim.max_consecutive_skips steps in
    a row without a finite update) and stopped without saving."""


@dataclasses.dataclass
class DivergenceGuard:
    """The loop's divergence checks and their messages: each raises TrainingDivergedError
    naming what happened and the last good checkpoint, agreed on by every rank (`any_rank`)."""

    any_rank: Callable[[bool], bool]
    """True on every rank when the flag is on any (`Communication.any_rank`)."""
    last_good: Callable[[], Path | None]
    """The newest complete checkpoint of the run, or None."""
    max_consecutive_skips: int

    def error(self, what: str) -> TrainingDivergedError:
        last_good = self.last_good()
        return TrainingDivergedError(f"{what}; stopped without saving this state; last good checkpoint: "
                                     f"{last_good if last_good is not None else 'none'}")

    def check_finite(self, tensors: Iterable[torch.Tensor], what: str) -> None:
        """Raise when any of `tensors` (on any rank) holds a NaN or ±inf."""
        if self.any_rank(not all_finite(tensors)):
            raise self.error(what)

    def track_skips(self, count: int, step: int, skipped: list[bool]) -> tuple[int, str | None]:
        """`count` consecutive steps whose updates were all skipped, updated with this step's
        (a step with no update at all counts neither way), and the warning to log; raises at
        optim.max_consecutive_skips."""
        if not skipped:
            return count, None
        if not all(skipped):
            return 0, None
        count += 1
        limit = self.max_consecutive_skips
        if count >= limit:
            raise self.error(f"step {step}: {limit} consecutive steps without a finite update "
                             f"(optim.max_consecutive_skips={limit})")
        return count, (f"step {step}: warning: no update applied; {count} consecutive skipped step(s), the run "
                       f"stops at optim.max_consecutive_skips={limit}")


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
