"""The run's prompt sources: built from `data.sources`, checked against the prompt budget."""

from __future__ import annotations

import dataclasses
import random

from .config import ConfigError, TrainConfig
from .problem import Problem, ProblemSource
from .tasks import MixedSource, make_source
from .tokenizer import format_prompt

__all__ = ["Data", "prepare_data", "check_prompt_lengths"]


@dataclasses.dataclass
class Data:
    """The run's prompt sources: one sampler for training, held-out problems per source."""

    train: ProblemSource
    heldout: dict[str, list[Problem]]


def prepare_data(cfg: TrainConfig) -> Data:
    """Build every source (unknown tasks, missing files or fields raise ConfigError here)."""
    sources = []
    for i, source_cfg in enumerate(cfg.data.sources):
        try:
            sources.append(make_source(source_cfg))
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            raise ConfigError(f"data.sources[{i}] ({source_cfg.name or source_cfg.path}): {e}") from None
    train = sources[0] if len(sources) == 1 else MixedSource(sources, [c.weight for c in cfg.data.sources])
    heldout: dict[str, list[Problem]] = {}
    for i, source in enumerate(sources):
        name = source.name if source.name not in heldout else f"{source.name}_{i}"
        problems = source.heldout()[: cfg.eval.heldout_size]
        if problems:
            heldout[name] = problems
    return Data(train=train, heldout=heldout)


def check_prompt_lengths(cfg: TrainConfig, tokenizer, data: Data) -> None:
    """Every held-out prompt and a sample of training prompts fit rollout.max_prompt_tokens."""
    probe = data.train.sample(32, random.Random(cfg.run.seed + 1))     # its own rng: training draws untouched
    for problem in probe + [p for ps in data.heldout.values() for p in ps]:
        length = len(format_prompt(tokenizer, problem.prompt, cfg.data.system_prompt))
        if length > cfg.rollout.max_prompt_tokens:
            raise ConfigError(f"rollout.max_prompt_tokens: a {problem.task!r} prompt has {length} tokens, more than "
                              f"{cfg.rollout.max_prompt_tokens}: {problem.prompt[:80]!r}...")
