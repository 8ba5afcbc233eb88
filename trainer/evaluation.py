"""Validation: pass@1, accuracy and pass@k of the policy on each source's held-out problems."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import EvalConfig
from .metrics import pass_at_k
from .problem import Problem
from .rewards import pop_reward_errors, score
from .rollout.engines import SamplingConfig

__all__ = ["heldout_metrics"]


def heldout_metrics(engine, heldout: dict[str, list[Problem]], prompt_ids: Callable[[Problem], list[int]],
                    e: EvalConfig, sampling: SamplingConfig) -> dict[str, float]:
    """eval/<source>/pass@1 (mean reward over e.n samples), accuracy (samples with reward >=
    e.correct_threshold), pass@k and response length per source; eval/score is the mean pass@1
    over sources, eval/accuracy the mean accuracy. Reward failures of evaluation are dropped."""
    out: dict[str, float] = {}
    for name, problems in heldout.items():
        outs = engine.generate([prompt_ids(p) for p in problems], sampling)
        rewards = torch.tensor([[score(p, c.text) for c in cs] for p, cs in zip(problems, outs)])   # [P, n]
        correct = (rewards >= e.correct_threshold).sum(1).tolist()
        out[f"eval/{name}/pass@1"] = rewards.mean().item()
        out[f"eval/{name}/accuracy"] = sum(correct) / rewards.numel()
        out[f"eval/{name}/pass@{e.k}"] = sum(pass_at_k(e.n, c, e.k) for c in correct) / len(correct)
        out[f"eval/{name}/response_len"] = sum(len(c.response_ids) for cs in outs for c in cs) / rewards.numel()
    pass1 = [v for k, v in out.items() if k.endswith("/pass@1")]
    acc = [v for k, v in out.items() if k.endswith("/accuracy")]
    out["eval/score"] = sum(pass1) / max(len(pass1), 1)
    out["eval/accuracy"] = sum(acc) / max(len(acc), 1)
    pop_reward_errors()
    return out
