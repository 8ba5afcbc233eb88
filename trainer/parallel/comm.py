"""Communication among the ranks that train together: one process (`LocalComm`) or a
torch.distributed process group (`GroupComm`).

Collectives must be called in the same order on every rank: each method below is reached by
all ranks with the same (gathered) data, and a decision only one rank can take (the reference
reset's watch file) is taken by the first rank and broadcast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..metrics import merge_extremes
from .protocols import UpdateStats

__all__ = ["LocalComm", "GroupComm"]


@dataclasses.dataclass
class LocalComm:
    """One process: every collective is the identity."""

    rank: int = 0
    world_size: int = 1
    lockstep: bool = False
    group: Any = None

    is_main = True

    def broadcast(self, obj: Any) -> Any:
        return obj

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        return None

    def any_rank(self, flag: bool) -> bool:
        return flag

    def stop_signal(self, signum: int | None) -> int | None:
        return signum

    def merge(self, values: list[Any]) -> list[Any]:
        return values

    def reduce_update(self, stats: UpdateStats) -> UpdateStats:
        return stats

    def run_on_first(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def close(self) -> None:
        return None


@dataclasses.dataclass
class GroupComm:
    """This rank's place in a process group and the collectives the loop calls."""

    rank: int
    world_size: int
    device: torch.device
    group: Any = None
    """The process group (None: the whole world). Its first rank is global rank 0."""
    owns_group: bool = False
    """This object's creator made the default process group (and `close` ends it)."""
    lockstep: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """The first rank's `obj` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (pickled: small Python data, CPU tensors)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_reduce(self, values: dict[str, float], op: str = "sum") -> dict[str, float]:
        """A metric dict summed (or max-ed) over ranks; every rank must pass the same keys."""
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        return dict(zip(keys, t.tolist()))

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any (one all_reduce)."""
        return self.all_reduce({"flag": float(flag)}, op="max")["flag"] > 0

    def stop_signal(self, signum: int | None) -> int | None:
        """The signal any rank received (the largest number when several did), or None: the
        ranks poll between steps and stop together, after the same step."""
        return max(s or 0 for s in self.all_gather(signum)) or None

    def merge(self, values: list[Any]) -> list[Any]:
        """Per-record results that each rank filled for its share (None elsewhere), merged."""
        merged = list(values)
        for rank_values in self.all_gather(values):
            for i, v in enumerate(rank_values):
                if v is not None:
                    merged[i] = v
        return merged

    def reduce_update(self, stats: UpdateStats) -> UpdateStats:
        """An update's statistics over all ranks: metric sums, tokens and loss summed, the
        *_max / *_min metrics by max / min. Every rank passes the same sum keys; the extremes
        are gathered, so a rank whose micro-batches were all empty may lack one."""
        total = self.all_reduce({**{f"sum/{k}": v for k, v in stats.sums.items()}, "tokens": stats.tokens,
                                 "loss": stats.loss})
        extremes: dict[str, float] = {}
        for rank_extremes in self.all_gather(stats.extremes):
            extremes = merge_extremes(extremes, rank_extremes)
        return dataclasses.replace(stats, sums={k: total[f"sum/{k}"] for k in stats.sums}, tokens=total["tokens"],
                                   loss=total["loss"], extremes=extremes)

    def run_on_first(self, fn: Callable[[], Any]) -> Any:
        """fn() on the first rank only (creating the run directory, building the demo model), its
        result, or the exception it raised, on every rank: all of them go on or fail alike."""
        outcome: Any = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except Exception as e:
                outcome = ("error", e)
        status, value = self.broadcast(outcome)
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """End the process group if this object's creator made it (the end of `prolix train`); a
        group someone else made (a caller that runs several trainers) stays theirs."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
