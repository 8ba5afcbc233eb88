"""The types every benchmark provider module shares (`providers.py`, `trl_providers.py`,
`train_step.py`): a provider, its context, the `Skip` that records why it cannot run here, and
the packed → padded layout the baselines with a [S, L] batch take. A leaf: it imports only
`cases`, so the provider modules need not import each other for these.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .cases import Inputs

__all__ = ["Forward", "Skip", "Context", "Provider", "padded_sequences"]

Forward = Callable[[], torch.Tensor]
"""A provider's built case: runs the forward on the inputs it closed over."""


class Skip(Exception):
    """This provider cannot run here; the message is the reason recorded in the results."""


@dataclasses.dataclass(frozen=True)
class Context:
    """What a provider needs besides the inputs: the device, the loss config, the run's speed."""

    device: torch.device
    config: object  # prolix.kernels.GRPOLossConfig
    quick: bool


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    baseline: str | None  # the --baselines entry that enables it; None: always run (prolix)
    build: Callable[[Inputs, Context], Forward]
    note: str = ""  # said in the results: how to read this provider's numbers


def padded_sequences(t: torch.Tensor, inp: Inputs) -> torch.Tensor:
    """[N, ...] → [S, L, ...]: the padded batch layout of the Liger and TRL losses.

    A view when all S sequences have L tokens (every kernel case: no padding); zero-padded to
    the longest sequence for a ragged batch (`inp.pad_index`, the trainer step), the padding
    being part of what those baselines cost. Differentiable in `t` either way."""
    if inp.pad_index is None:
        return t.view(inp.S, inp.L, *t.shape[1:])
    padded = t.new_zeros(inp.S * inp.L, *t.shape[1:])
    return padded.index_copy(0, inp.pad_index, t).view(inp.S, inp.L, *t.shape[1:])
