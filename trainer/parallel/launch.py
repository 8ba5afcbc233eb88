"""Joining a run: the device of this process, and the torchrun world when there is one.

    torchrun --nproc-per-node=8 -m prolix.trainer.cli train --config cfg.yaml
    prolix train --nproc 8 --config cfg.yaml          # the same, torchrun launched for you
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

from ..config import ConfigError

__all__ = ["TIMEOUT", "launched", "torchrun_command", "init_world", "resolve_device"]

# Collectives wait for the slowest rank's rollout (or the first rank's demo warm start); the
# defaults (10 min on NCCL) are short for 16k-token responses.
TIMEOUT = datetime.timedelta(minutes=60)


def launched() -> bool:
    """True inside a torchrun worker of a world of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_command(nproc: int, train_args: list[str], *, python: str = sys.executable) -> list[str]:
    """The single-node torchrun command line of `prolix train --nproc N ARGS`:
    `python -m torch.distributed.run --standalone --nproc-per-node=N -m prolix.trainer.cli train ARGS`
    (--standalone: a local rendezvous on a free port)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc: expected a positive number of processes, got {nproc!r}")
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "prolix.trainer.cli", "train", *train_args]


def resolve_device(name: str) -> torch.device:
    """run.device as a torch.device: "auto" is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def init_world(device: str = "auto") -> tuple[torch.device, int, bool]:
    """Join the torchrun world: (this rank's device, LOCAL_RANK, whether this call created the
    default process group). NCCL on CUDA (one GPU per local rank), gloo on CPU (`device="cpu"`,
    or no CUDA); an existing group is reused. ConfigError when `device` cannot be honoured
    under torchrun."""
    if device.startswith("cuda:"):
        raise ConfigError(f"run.device: {device!r} names one GPU, but under torchrun each rank takes the GPU "
                          "of its LOCAL_RANK; use 'auto' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: 'cuda' requested but CUDA is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device != "cpu" and torch.cuda.is_available():
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=TIMEOUT)
    return dev, local_rank, owns
