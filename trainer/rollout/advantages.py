"""Group-relative advantages, the dynamic-sampling filter and overlong-response shaping.

Rewards of one rollout batch are a `[G, n]` tensor: G prompts (groups), n samples each.

group_advantages(rewards, method, eps) -> [G, n] fp32
    "grpo"     A = (r − mean_g) / (std_g + eps)    (DeepSeekMath's GRPO)
    "dr_grpo"  A = r − mean_g                      (Dr.GRPO: no std division, which otherwise
                                                    up-weights near-uniform groups)
    std_g is the sample standard deviation (Bessel-corrected, as TRL and verl compute it); with
    n = 1 a group has no spread and gets 0. A group whose rewards are all equal gets exactly 0
    (set explicitly: the rounding of the mean must not be blown up by 1/eps).
informative_groups(rewards) -> [G] bool
    Dynamic sampling (DAPO, used by ProRL): a group whose n rewards are all equal has zero
    advantage everywhere, so it adds no gradient; the loop drops it and samples more prompts.
shape_overlong(rewards, finished, mode, penalty) -> rewards of the same shape
    For responses cut off at the token budget (`finished` False):
    "none"     rewards unchanged;
    "mask"     rewards unchanged — the loop zeroes those responses' loss mask (DAPO's overlong
               filtering: a truncated response is neither rewarded nor punished);
    "penalty"  r' = r − penalty, *not* floored at 0. A truncated response usually has no
               <answer> and scores 0, like a finished wrong one; a floor at 0 would make the two
               indistinguishable and remove the pressure against rambling. DAPO's soft overlong
               punishment likewise adds a negative length term on top of the correctness reward
               (down to −1 past the budget), and ProRL's later runs penalise truncation the same
               way. With rewards in [0, 1], penalty > 1 ranks every truncated response below
               every finished one (penalty = 1: none above); a smaller penalty only below
               finished ones of equal score.
               (GRPO advantages are shift-invariant, so only these relative orders matter.)

All functions copy; none modifies its input.
"""

from __future__ import annotations

import math
from typing import get_args

import torch

from ..config import AdvantageMethod, OverlongMode

__all__ = ["AdvantageMethod", "ADVANTAGE_METHODS", "OverlongMode", "OVERLONG_MODES", "group_advantages", "informative_groups", "shape_overlong"]

ADVANTAGE_METHODS = get_args(AdvantageMethod)
OVERLONG_MODES = get_args(OverlongMode)


def _check_rewards(rewards: torch.Tensor, name: str = "rewards") -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"{name} must be [G, n] (groups × samples, n >= 1), got shape {tuple(rewards.shape)}")
    if rewards.is_complex():
        raise TypeError(f"{name} must be real, got {rewards.dtype}")
    if rewards.dtype != torch.float64:
        rewards = rewards.float()  # bool/int/half rewards: compare and reduce in fp32
    if not torch.isfinite(rewards).all():
        raise ValueError(f"{name} must be finite; non-finite at {torch.nonzero(~torch.isfinite(rewards)).tolist()[:8]}")
    return rewards


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[G, n] rewards -> [G] bool: True where the group's rewards are not all equal."""
    rewards = _check_rewards(rewards)
    return rewards.amax(dim=1) != rewards.amin(dim=1)


def group_advantages(rewards: torch.Tensor, method: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """[G, n] rewards -> [G, n] fp32 advantages (see the module docstring for the formulas)."""
    if method not in ADVANTAGE_METHODS:
        raise ValueError(f"method must be one of {ADVANTAGE_METHODS}, got {method!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    r = _check_rewards(rewards).double()  # fp64 for the group statistics, fp32 out
    centred = r - r.mean(dim=1, keepdim=True)
    if method == "grpo":
        std = r.std(dim=1, keepdim=True, correction=1) if r.shape[1] > 1 else torch.zeros_like(r[:, :1])
        centred = centred / (std + eps)
    # Uniform groups: exactly 0 (with eps = 0 the division above would give NaN).
    centred = torch.where(informative_groups(r)[:, None], centred, torch.zeros_like(centred))
    return centred.float()


def shape_overlong(rewards: torch.Tensor, finished: torch.Tensor, mode: str, penalty: float = 0.0) -> torch.Tensor:
    """Rewards after overlong shaping; `finished` is a bool tensor of the rewards' shape.

    mode: "none" | "penalty" (truncated: r − penalty, no floor) | "mask" (unchanged here;
    the loop masks the truncated responses' tokens). penalty: >= 0, used by "penalty" only.
    """
    if mode not in OVERLONG_MODES:
        raise ValueError(f"mode must be one of {OVERLONG_MODES}, got {mode!r}")
    if not (isinstance(penalty, (int, float)) and math.isfinite(penalty) and penalty >= 0):
        raise ValueError(f"penalty must be a finite number >= 0, got {penalty!r}")
    if not isinstance(rewards, torch.Tensor) or not isinstance(finished, torch.Tensor):
        raise TypeError("rewards and finished must be torch.Tensors")
    if finished.shape != rewards.shape:
        raise ValueError(f"finished must have the rewards' shape {tuple(rewards.shape)}, got {tuple(finished.shape)}")
    if finished.dtype != torch.bool:
        raise TypeError(f"finished must be a bool tensor, got {finished.dtype}")
    out = rewards.float() if not rewards.is_floating_point() else rewards.clone()
    if mode == "penalty":
        out = torch.where(finished, out, out - penalty)
    return out
