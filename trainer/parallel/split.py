"""Split placement: rollout ranks generate while trainer ranks train, at a bounded policy lag.

    prolix train --nproc 4 rollout.placement=split rollout.rollout_ranks=1 rollout.max_staleness=1
    torchrun --nnodes=2 --nproc-per-node=8 ... -m prolix.trainer.cli train rollout.placement=split ...

The torchrun world is divided by rank: the first `world − rollout.rollout_ranks` ranks train
(`placement.SplitTrainer`: FSDP2 among them when there are several, as in the colocated
placement), the last `rollout_ranks` each hold one engine (`rollout_rank.serve_rollouts`)
and run `rollout.Rollouts.collect_groups` for step after step, the prompts of a step shared
among them, their rewards scored by a `RewardPool`. No other framework: four process groups
built at start-up, the same on NCCL (GPUs) and gloo (CPU):

    trainers   the trainer ranks (FSDP2, metric reductions, checkpoints)
    rollouts   the rollout ranks (a step's prompts shared, results gathered)
    bridge     trainer rank 0 + the rollout ranks: weight broadcasts (the world's backend)
    control    the same ranks over gloo: control headers and the batches (pickled; they are small)

The schedule (the policy version of the weights after step j is j; a run that starts or
resumes at step S0 starts from version S0):

    rollout ranks, for s = S0+1, ..., run.steps:
        receive weight versions until holding v(s) = max(S0, s − 1 − max_staleness)
        generate and score step s's batch with version v(s); the first rollout rank sends it
        (asynchronously: it may run up to max_staleness batches ahead of the trainer)
    trainer ranks, for s = S0+1, ..., run.steps:
        receive step s's batch (the wait is `perf/trainer_idle_s`), train on it
        broadcast version s when a later batch will be generated with it (s ≤ run.steps − 1 − k)

So step s trains on completions exactly min(k, s − 1 − S0) updates old: `max_staleness` 0 is the
synchronous loop (the same prompts, tokens and weights as the colocated placement with the
same seed), 1 overlaps generation of step s+1 with training of step s (verl's one-step-off
policy). The loss treats the engine's log-probs as the behaviour policy's: PPO clipping against
the trainer's own old_logp, and the truncated importance weight min(π_old/π_rollout, C)
(`rollout.split_tis_cap`, unless algorithm.loss sets tis_cap or rollout_correction itself).

Weight sync: the trainer iterates the full parameters (gathered tensor by tensor from the FSDP
shards: `Sharding.full_parameters`), packs them into flat buckets of `rollout.sync_bucket_mb`
and broadcasts each; the rollout ranks unpack into the same names and `load_weights` into their
engine between generate calls. After each sync both sides compute the log-probs of one fixed
probe sequence; the trainer reports the largest difference as `sync/probe_logp_max_diff`.

Engines: the torch sampler, or vLLM with its engine core in a process of its own (a world of
one: vLLM must not join the torchrun world), which reads each sync from a safetensors file in
/dev/shm (`rollout.engines.VLLMEngine(separate_process=True)`); the probe is then vLLM's prompt log-probs.

Resume: the checkpoint holds the prompt sampler's state after the last trained batch; the
rollout ranks restart from it (batches in flight are discarded and regenerated: the same
prompts, with the resumed weights). A lost peer (a killed rank, a closed connection) ends every
rank with a one-line `PlacementError` instead of a hang; torchrun then stops the rest.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..rollout.rollouts import Group

__all__ = ["Layout", "PlacementError", "Groups", "Batch", "new_groups", "batch_version", "broadcasts_version",
           "call", "lost", "send_message", "receive_message", "header", "send_weights", "receive_weights",
           "probe_ids", "end_world"]

PROBE_TOKENS = 16      # length of the fixed sequence whose log-probs check every weight sync


class PlacementError(RuntimeError):
    """A peer of the split placement is gone (killed, crashed, disconnected): the run stops."""


# ----------------------------------------------------------------------------- the schedule


def batch_version(step: int, start: int, max_staleness: int) -> int:
    """The policy version that generates step `step`'s batch in a run (re)started at `start`."""
    return max(start, step - 1 - max_staleness)


def broadcasts_version(version: int, start: int, steps: int, max_staleness: int) -> bool:
    """Whether the trainer sends `version` (after training step `version`): some batch of the
    run is generated with it. The start version is always sent (`SplitBatches.begin`)."""
    return start < version <= steps - 1 - max_staleness


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which ranks of the world do what: trainers first, then the rollout ranks."""

    world_size: int
    rollout_ranks: int

    def __post_init__(self) -> None:
        if not 1 <= self.rollout_ranks < self.world_size:
            raise ConfigError(f"rollout.rollout_ranks: the split placement needs at least one trainer and one "
                              f"rollout rank; got {self.rollout_ranks} of a world of {self.world_size} "
                              f"(launch with --nproc > rollout_ranks)")

    @property
    def trainers(self) -> list[int]:
        return list(range(self.world_size - self.rollout_ranks))

    @property
    def rollouts(self) -> list[int]:
        return list(range(self.world_size - self.rollout_ranks, self.world_size))

    @property
    def leader(self) -> int:
        """The rollout rank that sends each batch to trainer rank 0."""
        return self.rollouts[0]


@dataclasses.dataclass
class Batch:
    """One step's batch, as the first rollout rank sends it to trainer rank 0."""

    step: int
    version: int                    # the policy version that generated it
    groups: list[Group]
    metrics: dict[str, float]       # `Rollouts.collect_groups`' rollout metrics
    sampler: Any                    # the prompt sampler's state after this batch's draws
    generation_s: float             # the rollout ranks' wall time generating and scoring it
    engine_idle_s: float            # their wait for the weights it needed
    probe: tuple[int, list[float]] | None = None   # (version, probe log-probs) of a sync just received


@dataclasses.dataclass
class Groups:
    """The process groups of the split world (every rank builds all four, in this order)."""

    layout: Layout
    trainers: Any
    rollouts: Any
    bridge: Any                     # the world's backend: weight buckets
    control: Any                    # gloo: headers and batches


def new_groups(layout: Layout) -> Groups:
    bridge_ranks = [0, *layout.rollouts]
    return Groups(layout, trainers=dist.new_group(layout.trainers), rollouts=dist.new_group(layout.rollouts),
                  bridge=dist.new_group(bridge_ranks), control=dist.new_group(bridge_ranks, backend="gloo"))


def lost(what: str, error: Exception) -> PlacementError:
    return PlacementError(f"split placement: {what} failed ({type(error).__name__}: {str(error).splitlines()[0]}); "
                          "a peer rank is gone, so the run stops (continue with --resume RUN_DIR)")


# ----------------------------------------------------------------------------- messages


@dataclasses.dataclass
class Sending:
    """A message in flight: its two sends and the buffers they read (kept alive until done)."""

    works: list
    buffers: list

    def done(self) -> bool:
        return all(w.is_completed() for w in self.works)


def send_message(obj: Any, dst: int, group) -> Sending:
    """Pickle `obj` and send it to global rank `dst` without waiting for the receiver."""
    payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    return Sending([dist.isend(size, dst, group=group), dist.isend(payload, dst, group=group)], [size, payload])


def receive_message(src: int, group) -> Any:
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src, group=group)
    payload = torch.empty(int(size), dtype=torch.uint8)
    dist.recv(payload, src, group=group)
    return pickle.loads(payload.numpy().tobytes())


def header(obj: Any, group) -> Any:
    """Trainer rank 0's control header on every bridge rank: ("hello", start, sampler),
    ("weights", version) or ("stop", why)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


# ----------------------------------------------------------------------------- weights


def buckets(named: Iterable[tuple[str, torch.Tensor]], limit_bytes: int
            ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive (name, tensor) runs of one dtype and at most `limit_bytes` (a larger tensor
    is a bucket alone). Sender and receivers split their own lists identically."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and (t.dtype != bucket[0][1].dtype or size + nbytes > limit_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def send_weights(named: Iterable[tuple[str, torch.Tensor]], group, device: torch.device, limit_bytes: int,
                 *, sender: bool) -> None:
    """Broadcast (rank 0 of the bridge) the named full tensors in flat buckets. `named` is
    exhausted on every trainer rank (under FSDP each tensor is gathered collectively); only the
    `sender` packs and sends."""
    for bucket in buckets(named, limit_bytes):
        if sender:
            flat = torch.cat([t.detach().reshape(-1).to(device) for _, t in bucket])
            dist.broadcast(flat, src=0, group=group)


def receive_weights(shapes: list[tuple[str, torch.Size, torch.dtype]], group, device: torch.device,
                    limit_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of one broadcast (`send_weights`), bucket by bucket, as views of the
    received buffers (load them before the next bucket arrives: buffers are not reused)."""
    meta = [(name, torch.empty(shape, dtype=dtype, device="meta")) for name, shape, dtype in shapes]
    for bucket in buckets(meta, limit_bytes):
        flat = torch.empty(sum(t.numel() for _, t in bucket), dtype=bucket[0][1].dtype, device=device)
        dist.broadcast(flat, src=0, group=group)
        offset = 0
        for name, t in bucket:
            yield name, flat[offset:offset + t.numel()].view(t.shape)
            offset += t.numel()


def probe_ids(vocab_size: int) -> list[int]:
    """The fixed token sequence whose log-probs both sides compare after each sync."""
    return [(7 * i + 3) % vocab_size for i in range(PROBE_TOKENS)]


def call(what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), a lost peer's error (gloo / NCCL: DistBackendError is a RuntimeError)
    turned into a one-line PlacementError naming `what`."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ConnectionError) as e:
        raise lost(what, e) from None


def end_world() -> None:
    """End the default process group (every rank of the split world ends it)."""
    if dist.is_initialized():
        dist.destroy_process_group()
