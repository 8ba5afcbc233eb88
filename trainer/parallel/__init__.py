"""The parallel run: a few narrow parts, composed once per placement.

    protocols      the parts' protocols (bottom): Communication, Sharding, BatchSource
    launch         joining the torchrun world; the device of this process
    comm           communication: one process, or a process group
    sharding       none (`WholeModel`) or FSDP2
    colocated      batches sampled by the training ranks (rollouts shared among them)
    split          the split placement's layout, schedule, messages and weight buckets
    split_trainer  its batch source on the trainer ranks: receiver and weight publisher
    rollout_rank   its rollout ranks, which serve the batches
    placement      the compositions (`SingleProcess`, `DataParallel`, `SplitTrainer`) and
                   the start-up choice (`init_parallelism`, `init_split`)
"""

from .placement import DataParallel, Parallel, SingleProcess, SplitTrainer, init_parallelism, init_split
from .protocols import BatchSource, Communication, Forward, Sharding, UpdateStats
from .rollout_rank import RolloutRank

__all__ = ["BatchSource", "Communication", "DataParallel", "Forward", "Parallel", "RolloutRank", "Sharding",
           "SingleProcess", "SplitTrainer", "UpdateStats", "init_parallelism", "init_split"]
