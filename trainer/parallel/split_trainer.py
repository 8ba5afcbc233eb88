"""The split placement's batch source on the trainer ranks: batches received from the rollout
ranks, weights published to them (the schedule is `split`'s module docstring)."""

from __future__ import annotations

import dataclasses
import time

import torch

from ..config import TrainConfig
from ..rollout.engines import sequence_logprobs
from ..rollout.rollouts import Group
from .colocated import shared_rollout
from .protocols import Communication, Sharding
from .split import (
    Groups,
    PlacementError,
    batch_version,
    broadcasts_version,
    call,
    end_world,
    header,
    probe_ids,
    receive_message,
    send_weights,
)

__all__ = ["SplitBatches"]


@dataclasses.dataclass
class SplitBatches:
    """Receives each step's batch from the rollout ranks and publishes the weights they need.
    The evaluation engine samples from the (sharded) policy itself: a trainer rank keeps no
    whole copy of the model, and the trainer ranks evaluate in lockstep."""

    groups: Groups
    comm: Communication
    sharding: Sharding
    max_staleness: int
    steps: int
    bucket_bytes: int
    start: int = 0
    step: int = 0
    probes: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    closed: bool = False

    @classmethod
    def from_config(cls, groups: Groups, comm: Communication, sharding: Sharding, cfg: TrainConfig) -> SplitBatches:
        return cls(groups, comm, sharding, max_staleness=cfg.rollout.max_staleness, steps=cfg.run.steps,
                   bucket_bytes=int(cfg.rollout.sync_bucket_mb * 2**20))

    def engine_name(self, name: str) -> str:
        """The trainer ranks only evaluate: with the torch sampler on the policy itself."""
        return "torch"

    def engine_model(self, policy: torch.nn.Module) -> torch.nn.Module:
        return policy

    def rollout(self, problems: list, sampling, generate_and_score):
        return shared_rollout(problems, sampling, generate_and_score, self.comm)

    def begin(self, step: int, rollouts, policy: torch.nn.Module) -> None:
        """Start the rollout ranks at `step` (0, or the resumed checkpoint's) with the prompt
        sampler's state and the current weights."""
        self.start = self.step = step
        if self.comm.is_main:
            call("sending the start header", header, ("hello", step, rollouts.rng.getstate()), self.groups.control)
        self._publish(step, policy)

    def collect(self, step: int, rollouts) -> tuple[list[Group], dict[str, float]]:
        """Step `step`'s batch from the rollout ranks (on every trainer rank), its metrics with
        the lag, the waits and the last sync's probe check; the prompt sampler's state follows
        the rollout ranks' (it is what a checkpoint saves)."""
        t0 = time.perf_counter()
        batch = None
        if self.comm.is_main:
            batch = call(f"receiving step {step}'s batch", receive_message, self.groups.layout.leader,
                         self.groups.control)
        batch = self.comm.broadcast(batch)
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
            mine = self.probes.pop(version)
            metrics["sync/probe_logp_max_diff"] = max(abs(a - b) for a, b in zip(mine, theirs))
        return batch.groups, metrics

    def sync_engine(self, engine, policy: torch.nn.Module) -> None:
        """The evaluation engine ← the new weights, and version `step` to the rollout ranks when
        a later batch is generated with it."""
        engine.sync_weights(policy)                  # the policy itself: nothing to copy
        if broadcasts_version(self.step, self.start, self.steps, self.max_staleness):
            self._publish(self.step, policy)

    def _publish(self, version: int, policy: torch.nn.Module) -> None:
        """Weights `version` to the rollout ranks, then this side's probe log-probs of them."""
        if self.comm.is_main:
            call(f"sending weights version {version}", header, ("weights", version), self.groups.control)
        call(f"broadcasting weights version {version}", send_weights, self.sharding.full_parameters(policy),
             self.groups.bridge, self.sharding.device, self.bucket_bytes, sender=self.comm.is_main)
        device = self.sharding.device
        self.probes[version] = sequence_logprobs(policy, probe_ids(policy.config.vocab_size), device)  # collective

    def close(self) -> None:
        """Tell the rollout ranks to stop (they may be gone already: nothing to wait for), then
        end the process groups."""
        if not self.closed and self.comm.is_main:
            try:
                header(("stop", "the trainer finished"), self.groups.control)
            except Exception:                        # a lost peer: nobody is left to tell
                pass
        self.closed = True
        end_world()
