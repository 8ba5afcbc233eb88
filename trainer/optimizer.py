"""The optimizer: AdamW over the policy's trainable weights, and its learning-rate schedule (a
pure function of the step, so a checkpoint carries no schedule state)."""

from __future__ import annotations

import torch

from .config import OptimConfig

__all__ = ["make_optimizer", "learning_rate"]


def make_optimizer(policy: torch.nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in policy.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def learning_rate(step: int, o: OptimConfig) -> float:
    """optim.lr after a linear warm-up of optim.warmup_steps steps."""
    return o.lr * min(1.0, step / o.warmup_steps) if o.warmup_steps else o.lr
