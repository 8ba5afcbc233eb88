"""The parts of a parallel run, as the loop sees them: communication, sharding, batch source.

A placement (`placement.Parallel`) is one of each, composed once at start-up; the loop calls
each part directly and never asks which implementation it holds:

    Communication   rank, world size, broadcast / gather / reduce among the ranks that train
                    together, any-rank flags, lockstep, the stop signal, run on the first rank
    Sharding        how the models and a mini-batch's work are laid over those ranks: none
                    (`WholeModel`) or FSDP2 (`FSDP2`): prepare, forward, full parameters,
                    micro-batch plan, weight sync into a colocated engine, checkpoint I/O
    BatchSource     where a step's batch comes from: rollouts sampled here (`Colocated`), or
                    received from rollout ranks that get the weights in turn (`SplitBatches`)

A packed micro-batch reaches the loss by one path: `Sharding.plan` → `packing.pack_microbatch`
→ `Sharding.forward` → `model.grpo_loss_from_hidden` (or `model.logprobs_from_hidden`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from ..metrics import is_extreme, merge_extremes
from ..packing import PackedBatch

__all__ = ["Forward", "UpdateStats", "Communication", "Sharding", "BatchSource"]

Forward = Callable[[torch.nn.Module, PackedBatch], tuple[torch.Tensor, torch.Tensor]]
"""(model, packed batch) -> (hidden [N, H], LM-head weight [V, H]) in one dtype: `model.head_inputs`."""


@dataclasses.dataclass
class UpdateStats:
    """What one optimizer update accumulates over its micro-batches (this process's share until
    `Communication.reduce_update` makes it the whole mini-batch's)."""

    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    """Σ metric · tokens over micro-batches, per loss metric (pg_loss, kl, entropy, ...)."""
    tokens: float = 0.0
    """Response tokens the metrics were averaged over."""
    loss: float = 0.0
    """Σ of the micro-batch losses (each normalised by the whole mini-batch: this is its loss)."""
    extremes: dict[str, float] = dataclasses.field(default_factory=lambda: {"ratio_max": 0.0})
    """Metrics named *_max / *_min (ratio_max, ...): the largest / smallest value seen over the
    micro-batches (over the ranks too after `reduce_update`), never averaged."""

    def add(self, metrics: dict[str, float], count: float) -> None:
        """One micro-batch's metrics, each averaged over its `count` response tokens."""
        self.tokens += count
        self.extremes = merge_extremes(self.extremes, {k: v for k, v in metrics.items() if is_extreme(k)})
        for key, value in metrics.items():
            if not is_extreme(key):
                self.sums[key] = self.sums.get(key, 0.0) + value * count


class Communication(Protocol):
    """The ranks that train together. Every collective must be called in the same order on each."""

    rank: int
    world_size: int
    lockstep: bool
    """Every rank runs every micro-batch's backward and the gradient norm even after a non-finite
    loss: they are collectives."""
    group: Any
    """The torch.distributed process group (None: the whole world, or no world at all)."""

    @property
    def is_main(self) -> bool: ...

    def broadcast(self, obj: Any) -> Any: ...

    def all_gather(self, obj: Any) -> list[Any]: ...

    def barrier(self) -> None: ...

    def any_rank(self, flag: bool) -> bool: ...

    def stop_signal(self, signum: int | None) -> int | None: ...

    def merge(self, values: list[Any]) -> list[Any]: ...

    def reduce_update(self, stats: UpdateStats) -> UpdateStats: ...

    def run_on_first(self, fn: Callable[[], Any]) -> Any: ...

    def close(self) -> None: ...


class Sharding(Protocol):
    """How the policy and the reference are laid over the ranks of a `Communication`."""

    device: torch.device

    @property
    def load_device(self) -> torch.device: ...

    def prepare(self, policy: torch.nn.Module, reference: torch.nn.Module | None, forward: Forward, *,
                compute_dtype: torch.dtype | None = None) -> None: ...

    def forward(self, model: torch.nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]: ...

    def whole_copy(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def full_parameters(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]: ...

    def plan(self, lengths: list[int], max_tokens: int) -> list[list[int]]: ...

    def sync_engine(self, engine, model: torch.nn.Module) -> None: ...

    def save_checkpoint(self, run_dir: str | Path, step: int, **kwargs: Any) -> Path: ...

    def load_checkpoint(self, ckpt: str | Path, **kwargs: Any) -> dict[str, Any]: ...


class BatchSource(Protocol):
    """Where a step's batch comes from, and where the weights go after an update."""

    def engine_name(self, name: str) -> str: ...

    def engine_model(self, policy: torch.nn.Module) -> torch.nn.Module: ...

    def rollout(self, problems: list, sampling, generate_and_score: Callable) -> tuple[list, torch.Tensor]: ...

    def begin(self, step: int, rollouts, policy: torch.nn.Module) -> None: ...

    def collect(self, step: int, rollouts) -> tuple[list, dict[str, float]]: ...

    def sync_engine(self, engine, policy: torch.nn.Module) -> None: ...

    def close(self) -> None: ...
