"""NVTX ranges around the phases of an RL step, for Nsight Systems timelines.

    from . import nvtx
    with nvtx.range("rollout"):          # shows as "prolix/rollout" in `nsys profile`
        outs = engine.generate(...)

The trainer names its phases prolix/rollout, reward, logprobs (the no-grad old/ref forward),
pack, forward (decoder + fused loss), backward, optimizer (clip + AdamW), weight_sync, eval
and checkpoint. A range marks when the host issued the work; Nsight maps the kernels launched
inside it onto it, so no synchronisation is added.

Ranges are on when CUDA is available and PROLIX_NVTX is not "0"; otherwise `range` returns a
shared no-op context manager (one attribute read per call). `set_enabled` overrides both.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

__all__ = ["PREFIX", "range", "enabled", "set_enabled"]

PREFIX = "prolix/"

_NULL = nullcontext()
_enabled: bool | None = None           # None: decided on first use (CUDA may initialise late)


def _push(name: str) -> None:
    torch.cuda.nvtx.range_push(name)


def _pop() -> None:
    torch.cuda.nvtx.range_pop()


def enabled() -> bool:
    """Whether `range` emits NVTX ranges (CUDA available and PROLIX_NVTX != "0", unless set)."""
    global _enabled
    if _enabled is None:
        _enabled = torch.cuda.is_available() and os.environ.get("PROLIX_NVTX", "1") != "0"
    return _enabled


def set_enabled(on: bool | None) -> None:
    """Force ranges on or off; None goes back to the automatic choice."""
    global _enabled
    _enabled = on


class _Range:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        _push(self.name)

    def __exit__(self, *exc) -> None:
        _pop()                           # also on an exception: the range stack stays balanced


def range(name: str):  # noqa: A001  (torch.cuda.nvtx.range's name; this module never needs the builtin)
    """A context manager around one phase: the NVTX range PREFIX + name, or a no-op when off."""
    if not (_enabled if _enabled is not None else enabled()):
        return _NULL
    return _Range(PREFIX + name)
