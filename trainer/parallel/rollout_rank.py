"""The rollout ranks of the split placement: one engine each, generating step after step as
the schedule allows (`split`'s module docstring) until the trainer says stop."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..rollout.rollouts import Rollouts
from .colocated import shared_rollout
from .comm import GroupComm
from .split import (
    Batch,
    Groups,
    PlacementError,
    Sending,
    batch_version,
    end_world,
    header,
    lost,
    probe_ids,
    receive_weights,
    send_message,
)

__all__ = ["RolloutRank", "serve_rollouts", "run_rollout_rank"]


@dataclasses.dataclass
class RolloutRank:
    """This rank's place among the rollout ranks (what `placement.init_split` returns to them)."""

    groups: Groups
    device: torch.device

    @property
    def world(self) -> GroupComm:
        """The whole torchrun world (its first rank is trainer rank 0)."""
        return GroupComm(dist.get_rank(), dist.get_world_size(), self.device)

    @property
    def comm(self) -> GroupComm:
        """The rollout ranks among themselves: a step's prompts are shared among them."""
        layout = self.groups.layout
        return GroupComm(layout.rollouts.index(dist.get_rank()), layout.rollout_ranks, self.device,
                         group=self.groups.rollouts)

    def rollout(self, problems: list, sampling, generate_and_score: Callable):
        """`colocated.shared_rollout` among the rollout ranks."""
        return shared_rollout(problems, sampling, generate_and_score, self.comm)

    def close(self) -> None:
        end_world()


def serve_rollouts(cfg: TrainConfig, rank: RolloutRank, rollouts: Rollouts, model: torch.nn.Module) -> None:
    """A rollout rank's life: wait for the start header, then generate step after step as the
    schedule allows until the trainer's stop header. `rollouts.engine` samples from `model`'s
    weights; raises PlacementError when the trainer is gone."""
    for signum in (signal.SIGINT, signal.SIGTERM):   # the trainer decides when to stop, and says so
        signal.signal(signum, signal.SIG_IGN)
    server = RolloutServer(cfg, rank, rollouts, model)
    try:
        server.run()
    except (RuntimeError, ConnectionError) as e:
        if isinstance(e, PlacementError):
            raise
        raise lost(f"rollout rank {os.environ.get('RANK', '?')}", e) from None


class RolloutServer:
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
        kind, start, sampler = header(None, self.control)
        if kind != "hello":
            return                                   # stopped before the first step
        self.rollouts.rng.setstate(sampler)
        in_flight: list[Sending] = []
        for step in range(start + 1, self.cfg.run.steps + 1):
            t0 = time.perf_counter()
            if not self._await_version(batch_version(step, start, self.cfg.rollout.max_staleness)):
                return
            t1 = time.perf_counter()
            groups, metrics = self.rollouts.collect_groups(step)
            if self.leader:
                batch = Batch(step, self.version, groups, metrics, self.rollouts.rng.getstate(),
                              generation_s=time.perf_counter() - t1, engine_idle_s=t1 - t0, probe=self.probe)
                in_flight = [m for m in in_flight if not m.done()] + [send_message(batch, 0, self.control)]
            self.probe = None
        while not self.stopped:                      # the trainer's last steps: wait for its stop header
            self._next_header()

    def _await_version(self, version: int) -> bool:
        """Receive weight broadcasts until holding `version`; False when the trainer said stop."""
        while self.version < version and not self.stopped:
            self._next_header()
        return not self.stopped

    def _next_header(self) -> None:
        message = header(None, self.control)
        if message[0] == "stop":
            self.stopped = True
            return
        _, version = message
        self.rollouts.engine.load_weights(receive_weights(self.shapes, self.rank.groups.bridge, self.rank.device,
                                                          self.bucket_bytes))
        self.version = version
        # the engine's own view of its new weights (vLLM: its prompt log-probs)
        probe = self.rollouts.engine.score_sequence(probe_ids(self.model.config.vocab_size)) if self.leader else None
        self.probe = (version, probe) if probe is not None else None


def run_rollout_rank(cfg: TrainConfig, train_source, rank: RolloutRank) -> None:
    """Build this rollout rank's engine (on the policy's architecture and tokenizer from
    model.path; the weights come from the trainer) and its reward pool, then `serve_rollouts`."""
    from ..model import load_policy
    from ..rewards import RewardPool
    from ..rollout.engines import make_engine
    from ..tokenizer import load_tokenizer

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
