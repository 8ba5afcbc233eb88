"""The types every part of the trainer passes problems in: a `Problem` (one question, its ground
truth, the name of the reward that scores it) and the `ProblemSource` protocol that yields them.

A leaf module, the bottom of the trainer's layers: the tasks that build problems (`tasks`),
the reward code that scores them (`rewards`) and the loop import it, and it imports nothing
of theirs.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Protocol, runtime_checkable

__all__ = ["Problem", "ProblemSource"]


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str  # the question text (user turn; the chat template is applied later)
    answer: str  # ground truth
    task: str  # e.g. "chain_sum" (per-task metrics, reward routing)
    reward: str  # name of the reward fn in rewards.REWARDS (or "pkg.mod:fn") that scores it
    metadata: dict = dataclasses.field(default_factory=dict)  # whatever the scorer needs


@runtime_checkable
class ProblemSource(Protocol):
    name: str

    def sample(self, n: int, rng: random.Random) -> list[Problem]: ...  # training problems

    def heldout(self) -> list[Problem]: ...  # fixed eval set, disjoint from training
