"""What every rollout engine shares: the sampling options, a completion, the engine protocol,
and the checks of a `generate` call."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Protocol

import torch

__all__ = ["SamplingConfig", "Completion", "RolloutEngine", "stop_token_ids", "check_prompts"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to sample the rollouts of one `generate` call."""

    n: int = 8
    """Samples per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """τ ≥ 0; logits are divided by it. 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    max_tokens: int = 256
    """Response budget; a response that reaches it without EOS is truncated (finished=False)."""
    seed: int | None = None
    """Seed of this call's sampling (the same seed gives the same completions); None uses the
    engine's own random stream, seeded once by `make_engine(seed=...)`."""

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingConfig.n: expected an int >= 1, got {self.n!r}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingConfig.temperature: expected >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p: expected 0 < top_p <= 1, got {self.top_p!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingConfig.max_tokens: expected an int >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"SamplingConfig.seed: expected None or an int >= 0, got {self.seed!r}")


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled response."""

    prompt_ids: list[int]
    """Prompt tokens as given to the engine."""
    response_ids: list[int]
    """Sampled tokens, the EOS token included when finished."""
    response_logprobs: list[float]
    """log_softmax(logits / τ)[sampled token], before top-p renormalisation; same length as
    response_ids."""
    finished: bool
    """EOS sampled before max_tokens (False = truncated)."""
    text: str
    """Decoded response, special tokens skipped."""


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        """result[i][j]: the j-th of sampling.n samples for prompts[i]."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load whole named tensors (checkpoint naming, tied weights once) into the engine's
        own weights: the data-parallel sync, where the trained policy is sharded."""

    def score_sequence(self, ids: list[int]) -> list[float]:
        """log π(ids[t+1] | ids[≤t]) at temperature 1 under the engine's own weights (the split
        placement's check of each weight sync)."""

    def close(self) -> None:
        """Free the engine's memory; it cannot generate afterwards."""


# ----------------------------------------------------------------------------- shared helpers


def stop_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """EOS ids that end a response: the tokenizer's eos plus the model's generation-config ones
    (chat models end turns with e.g. <|im_end|>, listed there)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    for i in ([extra] if isinstance(extra, int) else list(extra or [])):
        if i not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError("tokenizer: has no eos_token_id (and the model's generation_config names none); "
                         "the engines need one to end responses")
    return ids


def check_prompts(prompts: list[list[int]], sampling: SamplingConfig, max_model_len: int) -> None:
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling: expected a SamplingConfig, got {type(sampling).__name__}")
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got an empty list")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}]: empty prompt")
        if len(p) + sampling.max_tokens > max_model_len:
            raise ValueError(f"prompts[{i}]: {len(p)} prompt tokens + max_tokens={sampling.max_tokens} exceed "
                             f"max_model_len={max_model_len}")
