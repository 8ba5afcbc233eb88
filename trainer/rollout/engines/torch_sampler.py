"""TorchSampler runs its own decode loop over `transformers` with a KV cache: all prompts × n
rows at once, left-padded, one forward per step of [B, 1] new tokens; sampling is
temperature → top-p → `torch.multinomial` with a seeded `torch.Generator`.

With `batch_invariant=True` every step runs the decoder as the trainer's batch-invariant packed
forward does (`invariant`: the operator set, and the fixed-block attention over each row's own
cache columns), the logits are the blocked LM-head product of the last hidden states, and each
sampled token's log-prob is `prolix.kernels.linear_logprobs(..., batch_invariant=True)` of that
hidden state: the trainer's old log-prob of the token, bit for bit.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from prolix.kernels import linear_logprobs

from ...guards import NonFiniteLogitsError
from ...invariant import FIXED_BLOCKS, batch_invariant_ops
from ...model import lm_head_weight
from .base import Completion, SamplingConfig, check_prompts, stop_token_ids

__all__ = ["TorchSampler", "sample_tokens", "sequence_logprobs"]


@torch.no_grad()        # not inference mode: `model` may be the FSDP-sharded policy, trained after
def sequence_logprobs(model: torch.nn.Module, ids: list[int], device: torch.device) -> list[float]:
    """log π(ids[t+1] | ids[≤t]) under `model` (a transformers causal LM), fp32, temperature 1."""
    x = torch.tensor([ids], device=device)
    logits = model(input_ids=x).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0].tolist()


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    Args:
        logits: [B, V] (any float dtype; computed in fp32).
        temperature: τ ≥ 0 (0 = argmax). top_p: nucleus mass in (0, 1].
    Returns:
        tokens: [B] int64; logprobs: [B] fp32, log_softmax(logits / τ)[token] before top-p
        (τ = 1 in that formula when greedy).
    Raises:
        NonFiniteLogitsError when any logit is NaN or ±inf (checked first: one host sync).
    """
    z = logits.float()
    if not bool(torch.isfinite(z).all()):        # multinomial would fail on NaN probabilities, greedy
        raise NonFiniteLogitsError(               # would pick token 0: either way the policy diverged
            f"sampler: the policy's logits are not finite ({int((~torch.isfinite(z)).sum())} of {z.numel()} "
            "NaN or inf); its weights have diverged")
    if temperature == 0:
        tokens = z.argmax(dim=-1)
        return tokens, z.log_softmax(dim=-1).gather(-1, tokens[:, None])[:, 0]
    logp = (z / temperature).log_softmax(dim=-1)                              # [B, V] fp32
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p                 # mass before it reaches p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(outside, 0.0))
    tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


@functools.cache
def _cache_kwarg(model_class: type) -> str:
    """The KV-cache keyword of this model's forward: `cache` from transformers 5.2x on
    (`past_key_values` is deprecated there), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class TorchSampler:
    """Samples with the policy module itself (a `transformers` causal LM) and a KV cache.

    The sampler holds the policy, not a copy: it always samples from the current weights, so
    `sync_weights` only re-points it at the module it is given (no copy). During `generate`
    the model is in eval mode under `torch.inference_mode()`; its train/eval mode is restored
    after. `max_batch_rows` bounds how many prompt × n rows decode together (memory).
    `batch_invariant`: decode in the batch-invariant mode (module docstring).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_model_len: int, seed: int = 0,
                 max_batch_rows: int = 256, batch_invariant: bool = False):
        if max_model_len < 2:
            raise ValueError(f"max_model_len: expected >= 2, got {max_model_len}")
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows: expected >= 1, got {max_batch_rows}")
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len, self.max_batch_rows = max_model_len, max_batch_rows
        self.batch_invariant = batch_invariant
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self._device = next(model.parameters()).device
        self._generator = torch.Generator(device=self._device).manual_seed(seed)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        check_prompts(prompts, sampling, self.max_model_len)
        if self.model is None:
            raise RuntimeError("TorchSampler: the engine is closed")
        generator = self._generator
        if sampling.seed is not None:
            generator = torch.Generator(device=self._device).manual_seed(sampling.seed)
        rows = [list(p) for p in prompts for _ in range(sampling.n)]     # row i*n + j: prompt i, sample j
        results: list[tuple[list[int], list[float], bool]] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(rows), self.max_batch_rows):
                    results += self._decode(rows[start:start + self.max_batch_rows], sampling, generator)
        finally:
            self.model.train(was_training)
        out = []
        for i, prompt in enumerate(prompts):
            group = []
            for ids, logps, finished in results[i * sampling.n:(i + 1) * sampling.n]:
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                group.append(Completion(list(prompt), ids, logps, finished, text))
            out.append(group)
        return out

    def _decode(self, rows: list[list[int]], sampling: SamplingConfig,
                generator: torch.Generator) -> list[tuple[list[int], list[float], bool]]:
        """Decode B rows together; returns per row (response ids, log-probs, finished)."""
        device, B, P = self._device, len(rows), max(len(r) for r in rows)
        input_ids = torch.full((B, P), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((B, P), dtype=torch.long, device=device)
        for b, r in enumerate(rows):                                       # left padding
            input_ids[b, P - len(r):] = torch.tensor(r, device=device)
            mask[b, P - len(r):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)                     # [B, P], 0 at the first real token
        stop = torch.tensor(self.stop_ids, device=device)
        tokens = torch.empty((B, sampling.max_tokens), dtype=torch.long, device=device)
        logps = torch.empty((B, sampling.max_tokens), dtype=torch.float32, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        lengths = torch.full((B,), sampling.max_tokens, dtype=torch.long, device=device)
        cache, steps, starts = None, 0, P - mask.sum(-1)                  # [B] first real column
        for t in range(sampling.max_tokens):
            cache, tok, lp = self._next(input_ids, mask, positions, cache, starts, sampling, generator)
            tokens[:, t], logps[:, t], steps = tok, lp, t + 1
            hit = torch.isin(tok, stop) & ~done
            lengths[hit] = t + 1                                           # EOS included
            done |= hit
            if bool(done.all()):
                break
            input_ids = torch.where(done, self.pad_id, tok)[:, None]       # [B, 1]
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        lengths = lengths.clamp(max=steps).tolist()
        tokens, logps, done = tokens[:, :steps].tolist(), logps[:, :steps].tolist(), done.tolist()
        return [(tokens[b][:n], logps[b][:n], done[b]) for b, n in enumerate(lengths)]

    def _next(self, input_ids, mask, positions, cache, starts, sampling: SamplingConfig, generator):
        """One decoder step over [B, L] new columns: (the cache, the sampled tokens [B], their
        log-probs [B] fp32)."""
        if not self.batch_invariant:
            kwarg = _cache_kwarg(type(self.model))
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{kwarg: cache})                        # logits: [B, 1, V]
            tok, lp = sample_tokens(out.logits[:, -1], sampling.temperature, sampling.top_p, generator)
            return getattr(out, kwarg), tok, lp
        kwarg = _cache_kwarg(type(self.model.base_model))
        weight = lm_head_weight(self.model)
        with batch_invariant_ops():
            out = self.model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                        use_cache=True, prolix_attn_backend=FIXED_BLOCKS, prolix_key_start=starts,
                                        **{kwarg: cache})
            hidden = out.last_hidden_state[:, -1].to(weight.dtype)                      # [B, H]
            logits = F.linear(hidden, weight)                                           # [B, V], row-blocked
        tok, _ = sample_tokens(logits, sampling.temperature, sampling.top_p, generator)
        lp = linear_logprobs(hidden, weight, tok, temperature=sampling.temperature or 1.0, batch_invariant=True)
        return getattr(out, kwarg), tok, lp

    def score_sequence(self, ids: list[int]) -> list[float]:
        """log π(ids[t+1] | ids[≤t]) at temperature 1 under the sampler's weights (fp32): what
        the split placement compares with the trainer's after a weight sync."""
        return sequence_logprobs(self.model, ids, self._device)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """No copy: the sampler runs the module itself. A different module replaces it."""
        if model is not self.model:
            self.model = model
            self._device = next(model.parameters()).device

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy named tensors into the sampler's module (then a copy the trainer does not train)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)

    def close(self) -> None:
        self.model = None
