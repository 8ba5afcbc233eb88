"""Placements: one communication, one sharding and one batch source, composed once.

    SingleProcess   one process on one device: `LocalComm`, `WholeModel`, `Colocated`
    DataParallel    FSDP2 across the ranks of a torchrun world: `GroupComm`, `FSDP2`, `Colocated`
    SplitTrainer    the trainer ranks of the split placement: the same communication and
                    sharding among the trainer ranks only (one of them: `LocalComm`,
                    `WholeModel`), and `SplitBatches`
    RolloutRank     (rollout_rank.py) the other ranks of the split placement, which serve batches

`init_parallelism(device)` and `init_split(cfg)` pick one at start-up; the loop holds it as
`Trainer.parallel` and calls its parts (`parallel.comm`, `parallel.sharding`,
`parallel.batches`) without asking which they are.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..config import ConfigError, TrainConfig
from .colocated import Colocated
from .comm import GroupComm, LocalComm
from .launch import init_world, launched, resolve_device
from .protocols import BatchSource, Communication, Sharding
from .rollout_rank import RolloutRank
from .sharding import FSDP2, WholeModel
from .split import Layout, new_groups
from .split_trainer import SplitBatches

__all__ = ["Parallel", "SingleProcess", "DataParallel", "SplitTrainer", "init_parallelism", "init_split"]


@dataclasses.dataclass
class Parallel:
    """How the loop runs: its parts, and the whole world (`world`: where the run directory is
    made once, by `world.run_on_first`)."""

    device: torch.device
    comm: Communication
    sharding: Sharding
    batches: BatchSource
    world: Communication

    def close(self) -> None:
        """Stop the batch source, then end the process group if this placement made it."""
        self.batches.close()
        self.comm.close()


class SingleProcess(Parallel):
    """One process, one device: the whole batch is this process's share."""

    def __init__(self, device: torch.device) -> None:
        comm, sharding = LocalComm(), WholeModel(device)
        super().__init__(device, comm, sharding, Colocated(comm, sharding), world=comm)


class DataParallel(Parallel):
    """FSDP2 over `comm`'s ranks, each sampling its share of every rollout."""

    def __init__(self, comm: GroupComm) -> None:
        sharding = FSDP2(comm)
        super().__init__(comm.device, comm, sharding, Colocated(comm, sharding), world=comm)


class SplitTrainer(Parallel):
    """The trainer ranks of the split placement: batches from the rollout ranks, weights to them."""

    def __init__(self, comm: Communication, sharding: Sharding, batches: SplitBatches, world: GroupComm) -> None:
        super().__init__(world.device, comm, sharding, batches, world=world)


def init_parallelism(device: str = "auto") -> Parallel:
    """The placement of this process, chosen once: `DataParallel` inside a torchrun world of more
    than one process (its process group created or reused; only the call that created it ends
    it), else `SingleProcess` on `device` ("auto", "cpu", "cuda", "cuda:N"; ConfigError when it
    is not available)."""
    if not launched():
        return SingleProcess(resolve_device(device))
    dev, _, owns = init_world(device)
    return DataParallel(GroupComm(dist.get_rank(), dist.get_world_size(), dev, owns_group=owns))


def init_split(cfg: TrainConfig) -> SplitTrainer | RolloutRank:
    """Join the torchrun world as a trainer (`SplitTrainer`) or a rollout rank (`RolloutRank`)."""
    if not launched():
        raise ConfigError("rollout.placement: 'split' divides a torchrun world into trainer and rollout ranks; "
                          "launch with --nproc G (G > rollout.rollout_ranks) or torchrun")
    device, _, _ = init_world(cfg.run.device)
    groups = new_groups(Layout(dist.get_world_size(), cfg.rollout.rollout_ranks))
    rank = dist.get_rank()
    if rank in groups.layout.rollouts:
        return RolloutRank(groups, device)
    trainers = groups.layout.trainers
    world = GroupComm(rank, dist.get_world_size(), device)
    if len(trainers) == 1:
        comm, sharding = LocalComm(), WholeModel(device, group=groups.trainers)
    else:
        comm = GroupComm(rank, len(trainers), device, group=groups.trainers)
        sharding = FSDP2(comm)
    return SplitTrainer(comm, sharding, SplitBatches.from_config(groups, comm, sharding, cfg), world)
