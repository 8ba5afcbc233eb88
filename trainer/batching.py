"""From a step's groups to its updates: sequence records, mini-batches, and each mini-batch's
rollout correction and loss normaliser."""

from __future__ import annotations

import dataclasses
import random

import torch

from prolix.kernels import GRPOLossConfig, seq_ids
from prolix.kernels.rollout_correction import kept_counts, rollout_correction

from .packing import SequenceRecord
from .rollout.rollouts import Group

__all__ = ["MiniBatchCorrection", "make_records", "mini_batches", "regroup", "correction", "normalizer",
           "logp_diff_max"]


@dataclasses.dataclass(frozen=True)
class MiniBatchCorrection:
    """Rollout correction over one mini-batch (`correction`)."""

    tokens: float                  # response tokens it keeps: token-mean's global normaliser
    sequences: float               # sequences with a kept token: the seq-* aggregations' normaliser
    metrics: dict[str, float]      # "rollout_corr/..." over the whole mini-batch


def make_records(groups: list[Group], loss: GRPOLossConfig, overlong: str, *,
                 keep_rollout_logp: bool = False) -> list[SequenceRecord]:
    """One SequenceRecord per completion: the advantage is broadcast over its response by
    `pack`; overlong="mask" leaves truncated responses out of the loss (DAPO). The engine's
    log-probs are kept when the loss needs them (TIS, rollout correction) or `keep_rollout_logp`
    (the batch-invariant mode: they are the old log-probs, and the on-policy check reads them)."""
    use_rollout_logp = loss.tis_cap is not None or loss.corrects_rollout or keep_rollout_logp
    records = []
    for group in groups:
        for c, adv in zip(group.completions, group.advantages.tolist()):
            if not c.response_ids or (overlong == "mask" and not c.finished):
                continue
            records.append(SequenceRecord(
                token_ids=list(c.prompt_ids) + list(c.response_ids), response_start=len(c.prompt_ids),
                advantage=adv, rollout_logp=list(c.response_logprobs) if use_rollout_logp else None))
    return records


def regroup(records: list[SequenceRecord]) -> list[list[SequenceRecord]]:
    """Consecutive records with the same prompt: one group (sizes vary once some are masked)."""
    out: list[list[SequenceRecord]] = []
    for r in records:
        key = tuple(r.token_ids[: r.response_start])
        if out and tuple(out[-1][0].token_ids[: out[-1][0].response_start]) == key:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def mini_batches(records: list[SequenceRecord], *, epochs: int, prompts: int,
                 shuffle_seed) -> list[list[SequenceRecord]]:
    """Split the rollout batch into updates of `prompts` prompts (sequences of one prompt stay
    together); `epochs` passes, each after the first in its own order (`shuffle_seed(epoch)`)."""
    groups = regroup(records)
    out = []
    for epoch in range(epochs):
        order = list(range(len(groups)))
        if epoch:
            random.Random(shuffle_seed(epoch)).shuffle(order)
        for start in range(0, len(order), prompts):
            out.append([r for g in order[start:start + prompts] for r in groups[g]])
    return [mb for mb in out if mb]


def correction(records: list[SequenceRecord], loss: GRPOLossConfig) -> MiniBatchCorrection | None:
    """Rollout correction over the whole mini-batch (every rank holds all its records, their
    old_logp merged): what it keeps and its metrics, or None when it is off. The micro-batches
    apply the same per-sequence rules to the same values, so these counts are their global
    normalisers, and the metrics are the same on every rank."""
    if not loss.corrects_rollout or not records:
        return None
    lengths = torch.tensor([r.num_response_tokens for r in records])                     # [S]
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))                               # [S+1]
    n = int(cu[-1])
    cat = lambda name: torch.cat([torch.as_tensor(getattr(r, name), dtype=torch.float32) for r in records])
    adv = torch.tensor([r.advantage for r in records], dtype=torch.float32)[seq_ids(cu, n)]   # [N]
    mask = torch.ones(n, dtype=torch.float32)                                             # [N] responses only
    corr = rollout_correction(cat("old_logp"), cat("rollout_logp"), adv, mask, cu, loss.rollout_correction)
    tokens, sequences = kept_counts(mask, corr.keep, cu)
    return MiniBatchCorrection(tokens, sequences, {k: v.item() for k, v in corr.metrics.items()})


def normalizer(records: list[SequenceRecord], corr: MiniBatchCorrection | None, loss: GRPOLossConfig) -> float:
    """The loss's global denominator for a mini-batch: response tokens (token-mean) or
    sequences (the seq-mean aggregations); with rollout correction only those it keeps (at
    least 1: everything dropped gives loss 0, gradient 0)."""
    token_mean = loss.loss_agg == "token-mean"
    if corr is not None:
        return max(corr.tokens if token_mean else corr.sequences, 1.0)
    return float(sum(r.num_response_tokens for r in records)) if token_mean else float(len(records))


def logp_diff_max(records: list[SequenceRecord]) -> float:
    """max |rollout_logp − old_logp| over every response token of `records` (both attached):
    the training–inference mismatch, 0.0 exactly when the two are bitwise equal."""
    cat = lambda name: torch.cat([torch.as_tensor(getattr(r, name), dtype=torch.float32) for r in records])
    return float((cat("rollout_logp") - cat("old_logp")).abs().max()) if records else 0.0
