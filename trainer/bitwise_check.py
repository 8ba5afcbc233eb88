"""`prolix check-bitwise MODEL`: measure, on your own model, how a token's log-prob moves with the
batch it is computed in, with and without `algorithm.batch_invariant`.

    prolix check-bitwise /path/to/model [--prompt "What is 2+3?" ...] [--samples 4] [--max-tokens 32]

For each mode, `check_bitwise` samples `samples` responses per prompt with the torch sampler (the
engine the trainer would build), then computes the trainer's log-probs of every response
packed together in one micro-batch and of each sequence alone, and reports

    alone_vs_packed      max |log-prob alone − log-prob packed with the others|
    rollout_vs_trainer   max |the sampler's log-prob − the trainer's packed log-prob|

With the mode on both are 0.0 on a machine where the promise holds (same hardware, thread count
and library versions for the sampler and the trainer; docs/bitwise.md); the default mode shows
the mismatch the option removes.
"""

from __future__ import annotations

import torch

from .model import logprobs
from .packing import SequenceRecord, pack
from .rollout.engines import SamplingConfig, TorchSampler

__all__ = ["DEFAULT_PROMPTS", "check_bitwise", "format_report"]

DEFAULT_PROMPTS = ("What is 17 + 25?", "Write a haiku about the sea.", "List three prime numbers.")


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b) if x.numel())


@torch.no_grad()
def _measure(model, tokenizer, prompts: list[list[int]], sampling: SamplingConfig, batch_invariant: bool) -> dict:
    sampler = TorchSampler(model, tokenizer, max_model_len=max(map(len, prompts)) + sampling.max_tokens,
                           batch_invariant=batch_invariant)
    done = [c for group in sampler.generate(prompts, sampling) for c in group if c.response_ids]
    records = [SequenceRecord(token_ids=c.prompt_ids + c.response_ids, response_start=len(c.prompt_ids),
                              advantage=0.0) for c in done]
    device = next(model.parameters()).device
    batch = pack(records).to(device)
    packed = [t.cpu() for t in batch.split_responses(logprobs(model, batch, batch_invariant=batch_invariant))]
    alone = []
    for r in records:
        one = pack([r]).to(device)
        alone += [t.cpu() for t in one.split_responses(logprobs(model, one, batch_invariant=batch_invariant))]
    rollout = [torch.tensor(c.response_logprobs, dtype=torch.float32) for c in done]
    return {"sequences": len(records), "tokens": sum(len(c.response_ids) for c in done),
            "alone_vs_packed": _max_diff(alone, packed), "rollout_vs_trainer": _max_diff(rollout, packed)}


def check_bitwise(model: torch.nn.Module, tokenizer, prompts: list[list[int]], *, samples: int = 4,
                  max_tokens: int = 32, seed: int = 0) -> dict[str, dict]:
    """{"default": ..., "batch_invariant": ...}: each mode's sequences, tokens, alone_vs_packed and
    rollout_vs_trainer (module docstring) for `samples` responses (temperature 1) to each of the
    tokenised `prompts` under `model` (a transformers causal LM prepared by `model.load_policy`)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: expected at least one non-empty tokenised prompt")
    sampling = SamplingConfig(n=samples, temperature=1.0, max_tokens=max_tokens, seed=seed)
    return {name: _measure(model, tokenizer, prompts, sampling, on)
            for name, on in (("default", False), ("batch_invariant", True))}


def format_report(report: dict[str, dict]) -> str:
    lines = [f"{'mode':<16} {'sequences':>9} {'tokens':>7} {'alone vs packed':>16} {'rollout vs trainer':>19}"]
    for name, r in report.items():
        lines.append(f"{name:<16} {r['sequences']:>9} {r['tokens']:>7} {r['alone_vs_packed']:>16.3g} "
                     f"{r['rollout_vs_trainer']:>19.3g}")
    return "\n".join(lines)
