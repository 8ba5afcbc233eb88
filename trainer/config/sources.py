"""One prompt source's configuration (`data.sources[i]`), checked when it is built: the kind,
the file and its fields, a reasoning-gym dataset and its options, and the reward it names.

A leaf of the trainer: the config schema (`config.DataConfig`) holds these, and `tasks` builds
the sources from them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from pathlib import Path

from .. import rewards

__all__ = ["SOURCE_KINDS", "DEFAULT_REWARD", "SourceConfig", "create_rg_dataset", "rg_registry"]

SOURCE_KINDS = ("reasoning_gym", "jsonl", "parquet")
DEFAULT_REWARD = {"reasoning_gym": "reasoning_gym", "jsonl": "math_verify", "parquet": "math_verify"}


def close_matches(word: str, choices) -> str:
    near = difflib.get_close_matches(word, list(choices), n=5, cutoff=0.5)
    return f"; did you mean {', '.join(map(repr, near))}?" if near else ""


def rg_registry() -> dict:
    from reasoning_gym.factory import DATASETS

    return DATASETS


@dataclasses.dataclass(kw_only=True)
class SourceConfig:
    """One prompt source; validated on construction."""

    kind: str
    """"reasoning_gym" | "jsonl" | "parquet"."""
    name: str = ""
    """reasoning-gym dataset name (e.g. "chain_sum"); for files the task name (default: file stem)."""
    path: str = ""
    """JSONL or parquet file (file kinds only)."""
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    reward: str = ""
    """Reward fn name or "pkg.mod:fn"; default "reasoning_gym" for reasoning_gym, else "math_verify"."""
    weight: float = 1.0
    """Mixing weight among sources (> 0)."""
    heldout_size: int = 64
    """Held-out problems (distinct questions) kept out of training."""
    dataset_kwargs: dict = dataclasses.field(default_factory=dict)
    """Passed to reasoning_gym.create_dataset (difficulty etc.); not seed or size."""
    seed: int = 0
    """Seeds the held-out set (reasoning_gym) or the held-out split (files)."""

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"source kind must be one of {SOURCE_KINDS}, got {self.kind!r}"
                             + close_matches(str(self.kind), SOURCE_KINDS))
        if self.kind == "reasoning_gym":
            self._validate_reasoning_gym()
        else:
            if not self.path:
                raise ValueError(f"a {self.kind} source needs path=")
            if not os.path.isfile(self.path):
                raise ValueError(f"{self.kind} source path {self.path!r} is not a file (no such file)")
            if not self.prompt_field or not self.answer_field:
                raise ValueError(f"prompt_field and answer_field must be non-empty, got "
                                 f"{self.prompt_field!r}, {self.answer_field!r}")
            self.name = self.name or Path(self.path).stem
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"weight must be a finite number > 0, got {self.weight!r} (source {self.name!r})")
        if not isinstance(self.heldout_size, int) or self.heldout_size < 0:
            raise ValueError(f"heldout_size must be an int >= 0, got {self.heldout_size!r} (source {self.name!r})")
        self.reward = self.reward or DEFAULT_REWARD[self.kind]
        rewards.get_reward(self.reward)  # unknown name / unimportable callable: fail now

    def _validate_reasoning_gym(self) -> None:
        registry = rg_registry()
        if self.name not in registry:
            raise ValueError(f"unknown reasoning-gym dataset name={self.name!r}" + close_matches(self.name, registry)
                             + f" ({len(registry)} datasets: see reasoning_gym.factory.DATASETS)")
        if not isinstance(self.dataset_kwargs, dict):
            raise ValueError(f"dataset_kwargs must be a dict, got {type(self.dataset_kwargs).__name__}")
        for key in ("seed", "size"):
            if key in self.dataset_kwargs:
                raise ValueError(f"dataset_kwargs must not set {key!r}: the source picks seeds and sizes "
                                 "(use SourceConfig.seed for the held-out set)")
        _, config_cls = registry[self.name]
        fields = {f.name for f in dataclasses.fields(config_cls)} - {"seed", "size"}
        for key in self.dataset_kwargs:
            if key not in fields:
                raise ValueError(f"dataset_kwargs key {key!r} is not an option of reasoning-gym "
                                 f"{self.name!r}{close_matches(key, fields)}; options: {sorted(fields)}")
        create_rg_dataset(self.name, self.dataset_kwargs, seed=0, size=1)  # value checks (config.validate)


def create_rg_dataset(name: str, kwargs: dict, *, seed: int, size: int):
    import reasoning_gym

    try:
        return reasoning_gym.create_dataset(name, seed=seed, size=size, **kwargs)
    except (AssertionError, TypeError, ValueError) as e:
        raise ValueError(f"reasoning-gym {name!r} rejected dataset_kwargs={kwargs!r}: {e or type(e).__name__}") from e
