"""The parallelism seam: what the one `Trainer` loop asks of the way it is run.

`init_parallelism(device)` picks the implementation once, at start-up, and the loop holds it
as `Trainer.parallel` without ever asking which one it has:

    SingleProcess          (here) one process on one device: every method is the plain thing
    DataParallel           (distributed.py) FSDP2 across the ranks of a torchrun world
    SplitTrainer           (split.py) the trainer ranks of the split placement: batches come
                           from rollout ranks that generate while these train

The protocol, in the order one RL step meets it:

    load_device                    where the policy is read into (FSDP: host memory, then sharded)
    engine_name(name)              the engine this process builds (split: the torch sampler, for
                                   evaluation only)
    prepare(policy, ref, forward, compute_dtype=)   shard the models if need be; returns the
                                   rollout engine's model
    begin(step, rollouts, policy)  the loop starts (or resumes) at `step` (split: the rollout ranks
                                   get the sampler state and the weights)
    collect(step, rollouts) -> (groups, metrics)   the step's batch: `rollouts.collect_groups`
                                   here, or (split) received from the rollout ranks
    rollout(problems, sampling, generate_and_score) -> (completions, rewards [P, n]), the
                                   processes' shares of one rollout call (used by `Rollouts`)
    plan(lengths, max_tokens)      this process's micro-batches (indices; [] = zero-weight, see
                                   `packing.pack_microbatch`)
    forward(model, batch)          (hidden [N, H], LM-head weight [V, H]) for the fused kernels
    merge(values)                  per-record results each process filled for its share, whole
    reduce_update(stats)           an update's `UpdateStats` over the whole mini-batch (sums
                                   summed, *_max / *_min metrics by max / min)
    lockstep                       every process must run every micro-batch's backward and the
                                   gradient norm even after a non-finite loss (collectives)
    sync_engine(engine, policy)    the rollout engine ← the new weights
    any_rank(flag)                 True on every process when `flag` is on any (non-finite
                                   weights or log-probs: all stop before saving, issue 18)
    stop_signal(signum)            the signal any process received, or None (all stop together)
    broadcast(obj), run_on_main(fn), is_main, world_size
    save_checkpoint(run_dir, step, ...), load_checkpoint(ckpt, ...), close()

`engine_name`, `begin` and `collect` of the two placements that sample their own batches are
`rollouts.Colocated`'s. A packed micro-batch reaches the loss by one path: `plan` → `packing.pack_microbatch` →
`forward` → `model.grpo_loss_from_hidden` (or `model.logprobs_from_hidden`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from . import checkpoint, distributed
from .config import ConfigError
from .packing import PackedBatch, plan_microbatches
from .rollouts import Colocated

__all__ = ["Forward", "UpdateStats", "Parallelism", "SingleProcess", "init_parallelism", "resolve_device"]

Forward = Callable[[torch.nn.Module, PackedBatch], tuple[torch.Tensor, torch.Tensor]]
"""(model, packed batch) -> (hidden [N, H], LM-head weight [V, H]) in one dtype: `model.head_inputs`."""


@dataclasses.dataclass
class UpdateStats:
    """What one optimizer update accumulates over its micro-batches (this process's share until
    `reduce_update` makes it the whole mini-batch's)."""

    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    """Σ metric · tokens over micro-batches, per loss metric (pg_loss, kl, entropy, ...)."""
    tokens: float = 0.0
    """Response tokens the metrics were averaged over."""
    loss: float = 0.0
    """Σ of the micro-batch losses (each normalised by the whole mini-batch: this is its loss)."""
    extremes: dict[str, float] = dataclasses.field(default_factory=lambda: {"ratio_max": 0.0})
    """Metrics named *_max / *_min (ratio_max, ...): the largest / smallest value seen over the
    micro-batches (over the ranks too after `reduce_update`), never averaged."""


class Parallelism(Protocol):
    """How the loop runs: see the module docstring for each member's role."""

    device: torch.device
    lockstep: bool

    @property
    def is_main(self) -> bool: ...

    @property
    def world_size(self) -> int: ...

    @property
    def load_device(self) -> torch.device: ...

    def engine_name(self, name: str) -> str: ...

    def prepare(self, policy: torch.nn.Module, reference: torch.nn.Module | None, forward: Forward, *,
                compute_dtype: torch.dtype | None = None) -> torch.nn.Module: ...

    def begin(self, step: int, rollouts, policy: torch.nn.Module) -> None: ...

    def collect(self, step: int, rollouts) -> tuple[list, dict[str, float]]: ...

    def forward(self, model: torch.nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rollout(self, problems: list, sampling, generate_and_score: Callable) -> tuple[list, torch.Tensor]: ...

    def plan(self, lengths: list[int], max_tokens: int) -> list[list[int]]: ...

    def merge(self, values: list[Any]) -> list[Any]: ...

    def reduce_update(self, stats: UpdateStats) -> UpdateStats: ...

    def sync_engine(self, engine, model: torch.nn.Module) -> None: ...

    def any_rank(self, flag: bool) -> bool: ...

    def stop_signal(self, signum: int | None) -> int | None: ...

    def broadcast(self, obj: Any) -> Any: ...

    def run_on_main(self, fn: Callable[[], Any]) -> Any: ...

    def save_checkpoint(self, run_dir: str | Path, step: int, **kwargs: Any) -> Path: ...

    def load_checkpoint(self, ckpt: str | Path, **kwargs: Any) -> dict[str, Any]: ...

    def close(self) -> None: ...


def resolve_device(name: str) -> torch.device:
    """run.device as a torch.device: "auto" is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


@dataclasses.dataclass
class SingleProcess(Colocated):
    """One process, one device: the whole batch is this process's share."""

    device: torch.device
    lockstep: bool = False
    _forward: Forward | None = dataclasses.field(default=None, repr=False)

    is_main = True
    world_size = 1

    @property
    def load_device(self) -> torch.device:
        return self.device

    def prepare(self, policy, reference, forward: Forward, *, compute_dtype: torch.dtype | None = None
                ) -> torch.nn.Module:
        """Nothing to shard (`forward` applies `compute_dtype` itself); the engine samples from
        the policy itself."""
        self._forward = forward
        return policy

    def forward(self, model, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self._forward(model, batch)

    def rollout(self, problems: list, sampling, generate_and_score: Callable) -> tuple[list, torch.Tensor]:
        return generate_and_score(problems, sampling)

    def plan(self, lengths: list[int], max_tokens: int) -> list[list[int]]:
        return plan_microbatches(lengths, max_tokens)

    def merge(self, values: list[Any]) -> list[Any]:
        return values

    def reduce_update(self, stats: UpdateStats) -> UpdateStats:
        return stats

    def sync_engine(self, engine, model: torch.nn.Module) -> None:
        engine.sync_weights(model)

    def any_rank(self, flag: bool) -> bool:
        return flag

    def stop_signal(self, signum: int | None) -> int | None:
        return signum

    def broadcast(self, obj: Any) -> Any:
        return obj

    def run_on_main(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def save_checkpoint(self, run_dir: str | Path, step: int, **kwargs: Any) -> Path:
        return checkpoint.save_checkpoint(run_dir, step, **kwargs)

    def load_checkpoint(self, ckpt: str | Path, **kwargs: Any) -> dict[str, Any]:
        """Either format (single-process or DCP, saved on any number of ranks) into plain models."""
        return distributed.load_checkpoint(ckpt, **kwargs)

    def close(self) -> None:
        return None


def init_parallelism(device: str = "auto") -> Parallelism:
    """The parallelism of this process, chosen once: `distributed.DataParallel` inside a torchrun
    world of more than one process (its process group created or reused), else `SingleProcess`
    on `device` ("auto", "cpu", "cuda", "cuda:N"; ConfigError when it is not available)."""
    dp = distributed.init_from_env(device)
    return dp if dp is not None else SingleProcess(resolve_device(device))
