"""Rollout collection: prompts → n completions each → rewards → group advantages, one step's batch.

    rollouts = Rollouts(cfg, data, tokenizer, engine, rollout=parallel.rollout, pool=RewardPool(2))
    groups, metrics = rollouts.collect_groups(step)

`Rollouts` is what samples a step's training batch, wherever that runs: the `Trainer` holds one
and calls it between updates (colocated placement, `SingleProcess` / `DataParallel`), and in the
split placement the rollout ranks run it continuously while the trainer ranks train
(`split.serve_rollouts`). It owns the prompt sampler's `random.Random` (its state is the
checkpoint's `sampler`) and derives every rollout call's seed from (run.seed, step, try), so a
batch is a function of the run's seed, the step and the sampler state before it: a resumed run,
or a rollout rank that regenerates a discarded batch, draws the same prompts.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import torch

from .. import nvtx
from ..config import TrainConfig
from ..problem import Problem, ProblemSource
from ..rewards import RewardPool, pop_reward_errors
from ..tokenizer import format_prompt
from .advantages import group_advantages, informative_groups, shape_overlong
from .engines import Completion, SamplingConfig, make_engine

__all__ = ["Group", "Rollouts", "rollout_seed"]

Rollout = Callable[[list[Problem], SamplingConfig, Callable], tuple[list[list[Completion]], torch.Tensor]]
"""`BatchSource.rollout`: (problems, sampling, generate_and_score) -> (completions per problem,
rewards [P, n]), the work shared among the processes that sample."""


@dataclasses.dataclass
class Group:
    """The n completions of one prompt, with their rewards and advantages."""

    problem: Problem
    completions: list[Completion]
    rewards: torch.Tensor          # [n] fp32, after overlong shaping
    advantages: torch.Tensor       # [n] fp32


def rollout_seed(run_seed: int, step: int, attempt: int) -> int:
    """The sampling seed of a step's `attempt`-th rollout call (also seeds epoch shuffles)."""
    return (run_seed * 1_000_003 + step * 1_009 + attempt) % (2**31 - 1)


class Rollouts:
    """Samples, scores and groups one step's batch (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, train: ProblemSource, tokenizer, engine, *,
                 rollout: Rollout | None = None, pool: RewardPool | None = None) -> None:
        """`train`: the training prompt source; `engine`: the rollout engine (`engines`);
        `rollout`: how a call is shared among processes (default: all here); `pool`: the reward
        scorer (default: serial, in this process)."""
        self.cfg, self.train, self.tokenizer, self.engine = cfg, train, tokenizer, engine
        self.rollout = rollout or (lambda problems, sampling, fn: fn(problems, sampling))
        self.pool = pool or RewardPool(0)
        self.rng = random.Random(cfg.run.seed)

    @classmethod
    def build(cls, cfg: TrainConfig, train: ProblemSource, tokenizer, model, *, engine: str,
              rollout: Rollout | None = None) -> Rollouts:
        """Rollouts with a new `engine` over `model` (the configured engine options apply to the
        configured engine only) and a pool of rollout.reward_workers scorers. With
        algorithm.batch_invariant the engine samples in its batch-invariant mode."""
        options = dict(cfg.rollout.engine_options) if engine == cfg.rollout.engine else {}
        if cfg.algorithm.batch_invariant:
            options["batch_invariant"] = True
        engine = make_engine(engine, model, tokenizer, max_model_len=cfg.rollout.max_model_len, seed=cfg.run.seed,
                             **options)
        return cls(cfg, train, tokenizer, engine, rollout=rollout, pool=RewardPool(cfg.rollout.reward_workers))

    def prompt_ids(self, problem: Problem) -> list[int]:
        ids = format_prompt(self.tokenizer, problem.prompt, self.cfg.data.system_prompt)
        if len(ids) > self.cfg.rollout.max_prompt_tokens:
            raise ValueError(f"a {problem.task!r} prompt has {len(ids)} tokens > rollout.max_prompt_tokens="
                             f"{self.cfg.rollout.max_prompt_tokens}: {problem.prompt[:80]!r}")
        return ids

    def collect_groups(self, step: int) -> tuple[list[Group], dict[str, float]]:
        """Sample prompts and n completions each, score, shape and normalise per group; with
        dynamic sampling keep only groups whose rewards differ and draw again until the batch
        holds prompts_per_step groups (at most algorithm.max_sampling_tries rounds)."""
        cfg, alg = self.cfg, self.cfg.algorithm
        want = cfg.optim.prompts_per_step
        kept: list[Group] = []
        raw, lengths, finished, informative = [], [], [], []
        attempt = 0
        while len(kept) < want and attempt < (alg.max_sampling_tries if alg.dynamic_sampling else 1):
            problems = self.train.sample(want, self.rng)
            sampling = SamplingConfig(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                      max_tokens=cfg.rollout.max_tokens,
                                      seed=rollout_seed(cfg.run.seed, step, attempt))
            outs, rewards = self.rollout(problems, sampling, self.generate_and_score)                # [G, n]
            done = torch.tensor([[c.finished for c in cs] for cs in outs])                            # [G, n]
            shaped = shape_overlong(rewards, done, alg.overlong, alg.overlong_penalty)
            advantages = group_advantages(shaped, alg.advantage)
            useful = informative_groups(shaped) if alg.dynamic_sampling else torch.ones(len(problems), dtype=torch.bool)
            for g, problem in enumerate(problems):
                if useful[g] and len(kept) < want:
                    kept.append(Group(problem, outs[g], shaped[g], advantages[g]))
            raw.append(rewards.flatten())
            finished.append(done.flatten())
            lengths += [len(c.response_ids) for cs in outs for c in cs]
            informative.append(useful.float())
            attempt += 1
        return kept, self._metrics(raw, lengths, finished, informative, len(kept), attempt)

    def _metrics(self, raw: list, lengths: list[int], finished: list, informative: list, groups: int,
                 tries: int) -> dict[str, Any]:
        raw_all, lens = torch.cat(raw), torch.tensor(lengths, dtype=torch.float32)
        thr = self.cfg.eval.correct_threshold
        metrics = {
            "reward/mean": raw_all.mean().item(), "reward/std": raw_all.std().item() if raw_all.numel() > 1 else 0.0,
            "pass_rate": (raw_all >= thr).float().mean().item(),
            "response_len/mean": lens.mean().item(), "response_len/max": lens.max().item(),
            "truncated_frac": 1.0 - torch.cat(finished).float().mean().item(),
            "batch/groups": groups, "batch/informative_frac": torch.cat(informative).mean().item(),
            "batch/tries": tries, "perf/rollout_tokens": float(lens.sum()),
        }
        for name, count in pop_reward_errors().items():
            metrics[f"reward_errors/{name}"] = count
        return metrics

    def generate_and_score(self, problems: list[Problem], sampling: SamplingConfig):
        """(completions per problem, rewards [P, n] fp32) of one engine call, scored by the pool."""
        with nvtx.range("rollout"):
            outs = self.engine.generate([self.prompt_ids(p) for p in problems], sampling)
        with nvtx.range("reward"):
            return outs, self.pool.score(problems, outs)
