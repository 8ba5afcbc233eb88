"""Split placement: rollout ranks generate while trainer ranks train, at a bounded policy lag.

    prolix train --nproc 4 rollout.placement=split rollout.rollout_ranks=1 rollout.max_staleness=1
    torchrun --nnodes=2 --nproc-per-node=8 ... -m prolix.trainer.cli train rollout.placement=split ...

The torchrun world is divided by rank: the first `world − rollout.rollout_ranks` ranks train
(`SplitTrainer`, the loop's `Parallelism`: FSDP2 among them when there are several, exactly as
`distributed.DataParallel`), the last `rollout_ranks` each hold one engine (`serve_rollouts`)
and run `rollouts.Rollouts.collect_groups` for step after step, the prompts of a step shared
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
shards: `distributed.full_parameters`), packs them into flat buckets of `rollout.sync_bucket_mb`
and broadcasts each; the rollout ranks unpack into the same names and `load_weights` into their
engine between generate calls. After each sync both sides compute the log-probs of one fixed
probe sequence; the trainer reports the largest difference as `sync/probe_logp_max_diff`.

Engines: the torch sampler, or vLLM with its engine core in a process of its own (a world of
one: vLLM must not join the torchrun world), which reads each sync from a safetensors file in
/dev/shm (`engines.VLLMEngine(separate_process=True)`); the probe is then vLLM's prompt log-probs.

Resume: the checkpoint holds the prompt sampler's state after the last trained batch; the
rollout ranks restart from it (batches in flight are discarded and regenerated: the same
prompts, with the resumed weights). A lost peer (a killed rank, a closed connection) ends every
rank with a one-line `PlacementError` instead of a hang; torchrun then stops the rest.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import distributed
from .config import ConfigError, TrainConfig
from .engines import sequence_logprobs
from .parallel import SingleProcess
from .rollouts import Group, Rollouts

__all__ = ["Layout", "PlacementError", "SplitTrainer", "RolloutRank", "init_split", "serve_rollouts",
           "batch_version", "broadcasts_version", "run_rollout_rank"]

PROBE_TOKENS = 16      # length of the fixed sequence whose log-probs check every weight sync


class PlacementError(RuntimeError):
    """A peer of the split placement is gone (killed, crashed, disconnected): the run stops."""


# ----------------------------------------------------------------------------- the schedule


def batch_version(step: int, start: int, max_staleness: int) -> int:
    """The policy version that generates step `step`'s batch in a run (re)started at `start`."""
    return max(start, step - 1 - max_staleness)


def broadcasts_version(version: int, start: int, steps: int, max_staleness: int) -> bool:
    """Whether the trainer sends `version` (after training step `version`): some batch of the
    run is generated with it. The start version is always sent (`SplitTrainer.begin`)."""
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


def _new_groups(layout: Layout) -> Groups:
    bridge_ranks = [0, *layout.rollouts]
    return Groups(layout, trainers=dist.new_group(layout.trainers), rollouts=dist.new_group(layout.rollouts),
                  bridge=dist.new_group(bridge_ranks), control=dist.new_group(bridge_ranks, backend="gloo"))


def _lost(what: str, error: Exception) -> PlacementError:
    return PlacementError(f"split placement: {what} failed ({type(error).__name__}: {str(error).splitlines()[0]}); "
                          "a peer rank is gone, so the run stops (continue with --resume RUN_DIR)")


# ----------------------------------------------------------------------------- messages


@dataclasses.dataclass
class _Sending:
    """A message in flight: its two sends and the buffers they read (kept alive until done)."""

    works: list
    buffers: list

    def done(self) -> bool:
        return all(w.is_completed() for w in self.works)


def _send(obj: Any, dst: int, group) -> _Sending:
    """Pickle `obj` and send it to global rank `dst` without waiting for the receiver."""
    payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    return _Sending([dist.isend(size, dst, group=group), dist.isend(payload, dst, group=group)], [size, payload])


def _recv(src: int, group) -> Any:
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src, group=group)
    payload = torch.empty(int(size), dtype=torch.uint8)
    dist.recv(payload, src, group=group)
    return pickle.loads(payload.numpy().tobytes())


def _header(obj: Any, group) -> Any:
    """Trainer rank 0's control header on every bridge rank: ("hello", start, sampler),
    ("weights", version) or ("stop", why)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


# ----------------------------------------------------------------------------- weights


def _buckets(named: Iterable[tuple[str, torch.Tensor]], limit_bytes: int
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
    for bucket in _buckets(named, limit_bytes):
        if sender:
            flat = torch.cat([t.detach().reshape(-1).to(device) for _, t in bucket])
            dist.broadcast(flat, src=0, group=group)


def receive_weights(shapes: list[tuple[str, torch.Size, torch.dtype]], group, device: torch.device,
                    limit_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of one broadcast (`send_weights`), bucket by bucket, as views of the
    received buffers (load them before the next bucket arrives: buffers are not reused)."""
    meta = [(name, torch.empty(shape, dtype=dtype, device="meta")) for name, shape, dtype in shapes]
    for bucket in _buckets(meta, limit_bytes):
        flat = torch.empty(sum(t.numel() for _, t in bucket), dtype=bucket[0][1].dtype, device=device)
        dist.broadcast(flat, src=0, group=group)
        offset = 0
        for name, t in bucket:
            yield name, flat[offset:offset + t.numel()].view(t.shape)
            offset += t.numel()


def probe_ids(vocab_size: int) -> list[int]:
    """The fixed token sequence whose log-probs both sides compare after each sync."""
    return [(7 * i + 3) % vocab_size for i in range(PROBE_TOKENS)]


# ----------------------------------------------------------------------------- trainer ranks


class SplitTrainer:
    """The trainer ranks' `Parallelism`: training as `inner` (one process, or FSDP2 among the
    trainer ranks), batches from the rollout ranks, weights to them (see the module docstring)."""

    def __init__(self, groups: Groups, inner, cfg: TrainConfig) -> None:
        self.groups, self.inner = groups, inner
        self.device, self.lockstep = inner.device, inner.lockstep
        self.max_staleness, self.steps = cfg.rollout.max_staleness, cfg.run.steps
        self.bucket_bytes = int(cfg.rollout.sync_bucket_mb * 2**20)
        self.start = 0
        self.step = 0
        self._probes: dict[int, list[float]] = {}
        self._pending: list = []
        self._closed = False

    # delegated: training is the inner parallelism's
    is_main = property(lambda self: self.inner.is_main)
    world_size = property(lambda self: self.inner.world_size)
    load_device = property(lambda self: self.inner.load_device)

    def prepare(self, policy, reference, forward, *, compute_dtype=None):
        """Shard as `inner` does; the evaluation engine samples from the (sharded) policy itself:
        no whole copy of the model on a trainer rank (the trainer ranks evaluate in lockstep)."""
        if isinstance(self.inner, distributed.DataParallel):   # its `prepare` would copy the model
            for model in filter(None, (policy, reference)):
                self.inner.shard(model, forward, compute_dtype=compute_dtype)
        else:
            self.inner.prepare(policy, reference, forward, compute_dtype=compute_dtype)
        return policy

    def forward(self, model, batch):
        return self.inner.forward(model, batch)

    def plan(self, lengths, max_tokens):
        return self.inner.plan(lengths, max_tokens)

    def merge(self, values):
        return self.inner.merge(values)

    def reduce_update(self, stats):
        return self.inner.reduce_update(stats)

    def any_rank(self, flag):
        return self.inner.any_rank(flag)

    def stop_signal(self, signum):
        return self.inner.stop_signal(signum)

    def broadcast(self, obj):
        return self.inner.broadcast(obj)

    def rollout(self, problems, sampling, generate_and_score):
        return self.inner.rollout(problems, sampling, generate_and_score)

    def save_checkpoint(self, run_dir, step, **kwargs):
        return self.inner.save_checkpoint(run_dir, step, **kwargs)

    def load_checkpoint(self, ckpt, **kwargs):
        return distributed.load_checkpoint(ckpt, process_group=self.groups.trainers, **kwargs)

    def run_on_main(self, fn: Callable[[], Any]) -> Any:
        return _world_run_on_main(fn)

    def engine_name(self, name: str) -> str:
        """The trainer ranks only evaluate: with the torch sampler on the policy itself."""
        return "torch"

    # the split placement's own part

    def begin(self, step: int, rollouts: Rollouts, policy: torch.nn.Module) -> None:
        """Start the rollout ranks at `step` (0, or the resumed checkpoint's) with the prompt
        sampler's state and the current weights."""
        self.start = self.step = step
        if self.is_main:
            self._call("sending the start header", _header, ("hello", step, rollouts.rng.getstate()),
                       self.groups.control)
        self._broadcast_weights(step, policy)

    def collect(self, step: int, rollouts: Rollouts) -> tuple[list[Group], dict[str, float]]:
        """Step `step`'s batch from the rollout ranks (on every trainer rank), its metrics with
        the lag, the waits and the last sync's probe check; the prompt sampler's state follows
        the rollout ranks' (it is what a checkpoint saves)."""
        t0 = time.perf_counter()
        batch = None
        if self.is_main:
            batch = self._call(f"receiving step {step}'s batch", _recv, self.groups.layout.leader,
                               self.groups.control)
        batch = self.inner.broadcast(batch)
        idle = time.perf_counter() - t0
        want = batch_version(step, self.start, self.max_staleness)
        if batch.step != step or batch.version != want:
            raise PlacementError(f"split placement: expected step {step}'s batch from version {want}, got step "
                                 f"{batch.step} from version {batch.version}")
        self.step = step
        rollouts.rng.setstate(batch.sampler)
        lag = float(step - 1 - batch.version)
        metrics = dict(batch.metrics)
        metrics.update({"perf/policy_lag_mean": lag, "perf/policy_lag_max": lag, "perf/trainer_idle_s": idle,
                        "perf/engine_idle_s": batch.engine_idle_s, "perf/generation_s": batch.generation_s})
        if batch.probe is not None:
            version, theirs = batch.probe
            mine = self._probes.pop(version)
            metrics["sync/probe_logp_max_diff"] = max(abs(a - b) for a, b in zip(mine, theirs))
        return batch.groups, metrics

    def sync_engine(self, engine, model: torch.nn.Module) -> None:
        """The evaluation engine ← the new weights, and version `step` to the rollout ranks when
        a later batch is generated with it."""
        engine.sync_weights(model)                   # the policy itself: nothing to copy
        if broadcasts_version(self.step, self.start, self.steps, self.max_staleness):
            self._broadcast_weights(self.step, model)

    def _broadcast_weights(self, version: int, model: torch.nn.Module) -> None:
        if self.is_main:
            self._call(f"sending weights version {version}", _header, ("weights", version), self.groups.control)
        named = distributed.full_parameters(model) if isinstance(self.inner, distributed.DataParallel) \
            else ((n, p.detach()) for n, p in model.named_parameters())
        self._call(f"broadcasting weights version {version}", send_weights, named, self.groups.bridge,
                   self.device, self.bucket_bytes, sender=self.is_main)
        probe = sequence_logprobs(model, probe_ids(model.config.vocab_size), self.device)  # collective under FSDP
        self._probes[version] = probe

    def close(self) -> None:
        """Tell the rollout ranks to stop (they may be gone already: nothing to wait for), then
        end the process groups."""
        if not self._closed and self.is_main:
            try:
                _header(("stop", "the trainer finished"), self.groups.control)
            except Exception:                        # a lost peer: nobody is left to tell
                pass
        self._closed = True
        _end_world()

    @staticmethod
    def _call(what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ConnectionError) as e:   # gloo / NCCL: DistBackendError is a RuntimeError
            raise _lost(what, e) from None


def _world_run_on_main(fn: Callable[[], Any]) -> Any:
    """fn() on global rank 0, its result (or exception) on every rank of the world."""
    def broadcast(obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    return distributed.run_on_first(fn, dist.get_rank() == 0, broadcast)


def _end_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- rollout ranks


@dataclasses.dataclass
class RolloutRank:
    """This rank's place among the rollout ranks (what `init_split` returns to them)."""

    groups: Groups
    device: torch.device

    is_main = False

    @property
    def index(self) -> int:
        return self.groups.layout.rollouts.index(dist.get_rank())

    @property
    def count(self) -> int:
        return self.groups.layout.rollout_ranks

    def run_on_main(self, fn: Callable[[], Any]) -> Any:
        return _world_run_on_main(fn)

    def rollout(self, problems: list, sampling, generate_and_score: Callable):
        """`distributed.shared_rollout` among the rollout ranks."""
        def gather(obj: Any) -> list[Any]:
            out: list[Any] = [None] * self.count
            dist.all_gather_object(out, obj, group=self.groups.rollouts)
            return out

        return distributed.shared_rollout(problems, sampling, generate_and_score, self.index, self.count, gather)

    def close(self) -> None:
        _end_world()


def init_split(cfg: TrainConfig) -> SplitTrainer | RolloutRank:
    """Join the torchrun world as a trainer (`SplitTrainer`) or a rollout rank (`RolloutRank`)."""
    if not distributed.launched():
        raise ConfigError("rollout.placement: 'split' divides a torchrun world into trainer and rollout ranks; "
                          "launch with --nproc G (G > rollout.rollout_ranks) or torchrun")
    device, local_rank, _ = distributed.init_world(cfg.run.device)
    groups = _new_groups(Layout(dist.get_world_size(), cfg.rollout.rollout_ranks))
    rank = dist.get_rank()
    if rank in groups.layout.rollouts:
        return RolloutRank(groups, device)
    trainers = groups.layout.trainers
    inner = SingleProcess(device) if len(trainers) == 1 else distributed.DataParallel(
        rank=rank, world_size=len(trainers), local_rank=local_rank, device=device, group=groups.trainers)
    return SplitTrainer(groups, inner, cfg)


def serve_rollouts(cfg: TrainConfig, rank: RolloutRank, rollouts: Rollouts, model: torch.nn.Module) -> None:
    """A rollout rank's life: wait for the start header, then generate step after step as the
    schedule allows (module docstring) until the trainer's stop header. `rollouts.engine`
    samples from `model`'s weights; raises PlacementError when the trainer is gone."""
    for signum in (signal.SIGINT, signal.SIGTERM):   # the trainer decides when to stop, and says so
        signal.signal(signum, signal.SIG_IGN)
    server = _Server(cfg, rank, rollouts, model)
    try:
        server.run()
    except (RuntimeError, ConnectionError) as e:
        if isinstance(e, PlacementError):
            raise
        raise _lost(f"rollout rank {os.environ.get('RANK', '?')}", e) from None


class _Server:
    """The rollout ranks' loop (`serve_rollouts`)."""

    def __init__(self, cfg: TrainConfig, rank: RolloutRank, rollouts: Rollouts, model: torch.nn.Module) -> None:
        self.cfg, self.rank, self.rollouts, self.model = cfg, rank, rollouts, model
        self.control, self.leader = rank.groups.control, dist.get_rank() == rank.groups.layout.leader
        self.shapes = [(n, p.shape, p.dtype) for n, p in model.named_parameters()]
        self.bucket_bytes = int(cfg.rollout.sync_bucket_mb * 2**20)
        self.version = -1
        self.probe: tuple[int, list[float]] | None = None
        self.stopped = False

    def run(self) -> None:
        kind, start, sampler = _header(None, self.control)
        if kind != "hello":
            return                                   # stopped before the first step
        self.rollouts.rng.setstate(sampler)
        in_flight: list[_Sending] = []
        for step in range(start + 1, self.cfg.run.steps + 1):
            t0 = time.perf_counter()
            if not self._await_version(batch_version(step, start, self.cfg.rollout.max_staleness)):
                return
            t1 = time.perf_counter()
            groups, metrics = self.rollouts.collect_groups(step)
            if self.leader:
                batch = Batch(step, self.version, groups, metrics, self.rollouts.rng.getstate(),
                              generation_s=time.perf_counter() - t1, engine_idle_s=t1 - t0, probe=self.probe)
                in_flight = [m for m in in_flight if not m.done()] + [_send(batch, 0, self.control)]
            self.probe = None
        while not self.stopped:                      # the trainer's last steps: wait for its stop header
            self._next_header()

    def _await_version(self, version: int) -> bool:
        """Receive weight broadcasts until holding `version`; False when the trainer said stop."""
        while self.version < version and not self.stopped:
            self._next_header()
        return not self.stopped

    def _next_header(self) -> None:
        header = _header(None, self.control)
        if header[0] == "stop":
            self.stopped = True
            return
        _, version = header
        self.rollouts.engine.load_weights(receive_weights(self.shapes, self.rank.groups.bridge, self.rank.device,
                                                          self.bucket_bytes))
        self.version = version
        # the engine's own view of its new weights (vLLM: its prompt log-probs)
        probe = self.rollouts.engine.score_sequence(probe_ids(self.model.config.vocab_size)) if self.leader else None
        self.probe = (version, probe) if probe is not None else None


def run_rollout_rank(cfg: TrainConfig, train_source, rank: RolloutRank) -> None:
    """Build this rollout rank's engine (on the policy's architecture and tokenizer from
    model.path; the weights come from the trainer) and its reward pool, then `serve_rollouts`."""
    from .engines import make_engine
    from .model import load_policy
    from .rewards import RewardPool
    from .tokenizer import load_tokenizer

    path = Path(cfg.model.path)
    tokenizer = load_tokenizer(path)
    dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
    model = load_policy(path, dtype=dtype, device=rank.device, gradient_checkpointing=False).eval()
    options = dict(cfg.rollout.engine_options)
    if cfg.rollout.engine == "vllm":
        options.setdefault("model_path", str(path))   # vLLM reads the architecture there; weights follow
        options.setdefault("separate_process", True)  # its own world of one, not the torchrun world
    engine = make_engine(cfg.rollout.engine, model, tokenizer, max_model_len=cfg.rollout.max_model_len,
                         seed=cfg.run.seed, **options)
    try:
        with RewardPool(cfg.rollout.reward_workers) as pool:
            serve_rollouts(cfg, rank, Rollouts(cfg, train_source, tokenizer, engine, rollout=rank.rollout, pool=pool),
                           model)
    finally:
        engine.close()
