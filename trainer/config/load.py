"""Reading and writing a run's config: defaults ← YAML file ← `key=value` overrides, validated
as a whole; keys of older configs are read at their new place."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from . import tree as config_tree
from .schema import TrainConfig

__all__ = ["RENAMED_KEYS", "load_config", "save_config", "default_tree", "apply_overrides"]

# Keys of configs written before the loss options were the kernels' GRPOLossConfig
# (`algorithm.loss`): they are read at their new place (`_move_renamed_keys`), with a note.
RENAMED_KEYS = {f"algorithm.{old}": f"algorithm.loss.{new}" for old, new in (
    ("clip_low", "clip_low"), ("clip_high", "clip_high"), ("dual_clip", "dual_clip"), ("kl_coef", "kl_coef"),
    ("kl_estimator", "kl_estimator"), ("entropy_coef", "entropy_coef"), ("tis_cap", "tis_cap"),
    ("loss_agg", "loss_agg"), ("loss_max_len", "max_len"))}



def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults ← YAML file (if any) ← `key=value` overrides, validated as a whole
    (`config_tree.load`). Keys of older configs (`RENAMED_KEYS`) are read at their new place.
    Raises ConfigError naming the field (or the file)."""
    return config_tree.load(TrainConfig, path, [_renamed_override(o) for o in overrides],
                            migrate=_move_renamed_keys, complete=_complete_loss)


def _renamed_override(item: str) -> str:
    key, sep, value = item.partition("=")
    new = RENAMED_KEYS.get(key.strip())
    if new is None:
        return item
    print(f"prolix: config key {key.strip()} is now {new}; read as such", file=sys.stderr)
    return f"{new}{sep}{value}"


def _move_renamed_keys(tree: dict) -> dict:
    """Keys of a file written before `algorithm.loss` (`RENAMED_KEYS`) moved to their new place."""
    algorithm = tree.get("algorithm")
    if not isinstance(algorithm, dict):
        return tree
    for old, new in RENAMED_KEYS.items():
        name = old.split(".", 1)[1]
        if name in algorithm and isinstance(algorithm.setdefault("loss", {}), dict):
            print(f"prolix: config key {old} is now {new}; read as such", file=sys.stderr)
            algorithm["loss"][new.rsplit(".", 1)[1]] = algorithm.pop(name)
    return tree


def _complete_loss(tree: dict) -> dict:
    """`algorithm.loss` made the kernels' whole config: its temperature is rollout.temperature,
    and seq-mean-token-sum-norm's max_len defaults to rollout.max_tokens."""
    rollout, loss = tree.get("rollout", {}), tree.get("algorithm", {}).get("loss")
    if isinstance(loss, dict) and isinstance(rollout, dict):
        loss["temperature"] = rollout.get("temperature", 1.0)
        if loss.get("loss_agg") == "seq-mean-token-sum-norm" and loss.get("max_len") is None:
            loss["max_len"] = rollout.get("max_tokens")
    return tree


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (loadable with `load_config`)."""
    return config_tree.save(cfg, path)


def default_tree(cls: type = TrainConfig) -> dict:
    """The defaults of `cls` (TrainConfig) as plain data (`config_tree.default_tree`)."""
    return config_tree.default_tree(cls)


def apply_overrides(tree: dict, overrides: Sequence[str], cls: type = TrainConfig) -> dict:
    """`a.b.c=value` overrides applied to a config dict in place (`config_tree.apply_overrides`)."""
    return config_tree.apply_overrides(tree, overrides, cls)
