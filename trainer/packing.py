"""Sequence packing: ragged rollouts → padding-free token streams, micro-batches and ranks.

An RL mini-batch is ragged (a group of 16 responses to one prompt spans 200 to 16k tokens), so
prolix never pads. `pack` concatenates S sequences into N = Σ L_s rows and describes them with
`cu_seqlens` (offsets, the varlen-attention convention) and `position_ids` (restarting at 0 per
sequence, for RoPE). Every per-token tensor of a `PackedBatch` is indexed by the *predicting*
position (the convention of the LM head and of `prolix.kernels`):

    row t (local index i = t − cu_seqlens[s] in sequence s, response start r = response_start)
    targets[t]   = input_ids[t + 1]             for i < L − 1;  ignore_index (−100) at i = L − 1
    loss_mask[t] = 1  iff  i + 1 >= r  and  i < L − 1     (row t predicts a response token)
    advantages[t], old_logp[t], ... = the value for the response token that row t predicts
                   (response token j = i + 1 − r), and 0 where loss_mask[t] = 0.

Example: prompt [p0, p1], response [a0, a1, a2], r = 2, L = 5:

    i            0    1    2    3    4
    input_ids    p0   p1   a0   a1   a2
    targets      p1   a0   a1   a2  −100
    loss_mask    0    1    1    1    0
    old_logp     0   lp0  lp1  lp2   0        (lp_j = log π_old(a_j | prefix))

A planned micro-batch reaches the loss by one path: `pack_microbatch(records, idx)` packs the
records `idx` (a plan's entry); an empty entry, which only a data-parallel plan holds (a rank
with fewer micro-batches than the others), is `zero_weight_batch`: it runs the same collectives
and adds exactly 0 to the loss, the gradients and the metric sums.

The planners decide what is packed together:
- `plan_microbatches(lengths, max_tokens)`: first-fit-decreasing bin packing under a token
  budget (the activation memory of one forward/backward is linear in its tokens once attention
  is varlen);
- `balance(lengths, num_ranks)`: split a mini-batch across data-parallel ranks so that the
  slowest rank's compute (tokens plus causal attention, `sequence_cost`) is small. LPT and
  Karmarkar–Karp both promise makespan ≤ (4/3 − 1/(3m))·OPT; "best" keeps the better of the two.
Neither planner is random: the same lengths always give the same plan.

Shapes: N packed rows, S sequences, L_s the length of sequence s, R_s its response length.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from prolix.kernels import seq_ids

__all__ = [
    "IGNORE_INDEX",
    "DEFAULT_ATTENTION_CROSSOVER",
    "SequenceRecord",
    "PackedBatch",
    "pack",
    "pack_microbatch",
    "zero_weight_batch",
    "plan_microbatches",
    "balance",
    "sequence_cost",
    "attention_crossover",
]

IGNORE_INDEX = -100
LOGP_FIELDS = ("old_logp", "ref_logp", "rollout_logp")

# The length at which a sequence's causal-attention FLOPs equal those of everything else in the
# layer (see `attention_crossover`): ≈ 30.5k for Qwen2.5-1.5B (the ProRL model), 53k for
# Llama-3-8B, 65k for Qwen2.5-7B. 32768 is the 1.5B value rounded to a power of two.
DEFAULT_ATTENTION_CROSSOVER = 32768.0


# ----------------------------------------------------------------------------- records


def _as_1d(name: str, value: Any, *, integer: bool) -> torch.Tensor:
    """A list/tuple/tensor as a 1-D CPU tensor (int64 or float32), with a clear error otherwise."""
    try:
        t = torch.as_tensor(value).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name}: expected a 1-D sequence of numbers, got {type(value).__name__} ({e})") from None
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got shape {tuple(t.shape)}")
    if integer:
        if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise TypeError(f"{name}: expected integer token ids, got dtype {t.dtype}")
        return t.to(torch.int64)
    if t.is_complex():
        raise TypeError(f"{name}: expected real numbers, got dtype {t.dtype}")
    return t.to(torch.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceRecord:
    """One rollout as the packer takes it: prompt + response ids and what the loss needs.

    Validated on construction (ValueError/TypeError naming the field and its value).
    """

    token_ids: Sequence[int] | torch.Tensor
    """[L] int: the prompt's tokens, then the response's."""
    response_start: int
    """Index of the first response token: 1 <= response_start < L (at least one prompt token
    predicts the first response token; at least one response token)."""
    advantage: float
    """The sequence's advantage (GRPO: group-normalised reward); every response token gets it."""
    old_logp: Sequence[float] | torch.Tensor | None = None
    """[R] log π_old(response token j | prefix), R = L − response_start; None if not known."""
    ref_logp: Sequence[float] | torch.Tensor | None = None
    """[R] the reference policy's log-probs of the response tokens, or None."""
    rollout_logp: Sequence[float] | torch.Tensor | None = None
    """[R] the rollout engine's own log-probs of the response tokens, or None."""

    def __post_init__(self) -> None:
        n = len(_as_1d("token_ids", self.token_ids, integer=True))
        if isinstance(self.response_start, bool) or not isinstance(self.response_start, int):
            raise TypeError(f"response_start: expected an int, got {type(self.response_start).__name__}")
        if not 1 <= self.response_start < n:
            raise ValueError(
                f"response_start: expected 1 <= response_start < len(token_ids) = {n} (at least one "
                f"prompt token and one response token), got {self.response_start}"
                + (" — the sequence has no response tokens" if self.response_start >= n else "")
            )
        if isinstance(self.advantage, bool) or not isinstance(self.advantage, (int, float)):
            raise TypeError(f"advantage: expected a float, got {type(self.advantage).__name__}")
        for name in LOGP_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            got = len(_as_1d(name, value, integer=False))
            if got != n - self.response_start:
                raise ValueError(
                    f"{name}: expected one value per response token, {n - self.response_start} "
                    f"(= len(token_ids) {n} − response_start {self.response_start}), got {got}"
                )

    @property
    def length(self) -> int:
        """L, the number of tokens (prompt + response)."""
        return len(self.token_ids)

    @property
    def num_response_tokens(self) -> int:
        """R = L − response_start."""
        return len(self.token_ids) - self.response_start


def _as_record(item: SequenceRecord | Mapping, index: int) -> SequenceRecord:
    """Accept a record or a mapping of its fields; errors name the sequence's index."""
    if isinstance(item, SequenceRecord):
        return item
    if not isinstance(item, Mapping):
        raise TypeError(f"sequence {index}: expected a SequenceRecord or a mapping, got {type(item).__name__}")
    try:
        return SequenceRecord(**item)
    except (TypeError, ValueError) as e:
        raise type(e)(f"sequence {index}: {e}") from None


# ----------------------------------------------------------------------------- packed batch


@dataclasses.dataclass(kw_only=True)
class PackedBatch:
    """S sequences packed into N rows, no padding. Conventions in the module docstring."""

    input_ids: torch.Tensor              # [N] int64
    position_ids: torch.Tensor           # [N] int64, 0..L_s−1 within each sequence
    cu_seqlens: torch.Tensor             # [S+1] int32, 0 = cu[0] < cu[1] < ... < cu[S] = N
    max_seqlen: int                      # max_s L_s (varlen attention's max_seqlen)
    targets: torch.Tensor                # [N] int64, next token; ignore_index at each last row
    loss_mask: torch.Tensor              # [N] bool, row predicts a response token
    advantages: torch.Tensor             # [N] fp32, the sequence's advantage where loss_mask
    response_starts: torch.Tensor        # [S] int64, response_start of each sequence (local)
    old_logp: torch.Tensor | None = None      # [N] fp32 or None, 0 where not loss_mask
    ref_logp: torch.Tensor | None = None      # [N] fp32 or None
    rollout_logp: torch.Tensor | None = None  # [N] fp32 or None
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        n = self.input_ids.shape[0] if self.input_ids.dim() == 1 else -1
        for name in ("input_ids", "position_ids", "targets", "loss_mask", "advantages", *LOGP_FIELDS):
            t = getattr(self, name)
            if t is not None and (t.dim() != 1 or t.shape[0] != n):
                raise ValueError(f"{name}: expected shape [N] = [{n}] (that of input_ids), got {tuple(t.shape)}")
        if self.cu_seqlens.dim() != 1 or self.cu_seqlens.dtype != torch.int32:
            raise ValueError(f"cu_seqlens: expected a 1-D int32 tensor [S+1], got {tuple(self.cu_seqlens.shape)} "
                             f"{self.cu_seqlens.dtype}")
        if self.response_starts.shape != (self.cu_seqlens.shape[0] - 1,):
            raise ValueError(f"response_starts: expected shape [S] = [{self.cu_seqlens.shape[0] - 1}], "
                             f"got {tuple(self.response_starts.shape)}")
        if self.loss_mask.dtype != torch.bool:
            raise TypeError(f"loss_mask: expected dtype torch.bool, got {self.loss_mask.dtype}")

    @property
    def num_tokens(self) -> int:
        """N."""
        return self.input_ids.shape[0]

    @property
    def num_sequences(self) -> int:
        """S."""
        return self.cu_seqlens.shape[0] - 1

    @property
    def seq_lengths(self) -> list[int]:
        """[L_0, ..., L_{S−1}] as Python ints (one host transfer on CUDA)."""
        return torch.diff(self.cu_seqlens).tolist()

    def seq_ids(self) -> torch.Tensor:
        """[N] int64: the sequence index of each row."""
        return seq_ids(self.cu_seqlens, int(self.cu_seqlens[-1]))

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> PackedBatch:
        """A copy with every tensor on `device` (a no-op copy of references if already there)."""
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return PackedBatch(**moved)

    def split_by_sequence(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Packed rows [N, ...] → S views [L_s, ...], one per sequence, in packing order."""
        if values.shape[0] != self.num_tokens:
            raise ValueError(f"values: expected leading dimension N = {self.num_tokens}, got {tuple(values.shape)}")
        return list(torch.split(values, self.seq_lengths, dim=0))

    def split_responses(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Packed rows [N, ...] → S views [R_s, ...]: the rows that predict each response token.

        Element j of sequence s is the value for response token j (the inverse of how `pack`
        lays out `old_logp`), e.g. `split_responses(logprobs(model, batch))` gives each
        response's per-token log-probs as a rollout engine reports them.
        """
        starts = self.response_starts.tolist()
        return [v[r - 1 : v.shape[0] - 1] for v, r in zip(self.split_by_sequence(values), starts)]

    def unpack(self) -> list[SequenceRecord]:
        """The records this batch was packed from (token ids and logps as CPU tensors)."""
        cpu = self.to("cpu")
        ids = cpu.split_by_sequence(cpu.input_ids)
        advantages = [a[0].item() for a in cpu.split_responses(cpu.advantages)]
        logps = {name: cpu.split_responses(getattr(cpu, name)) if getattr(cpu, name) is not None
                 else [None] * self.num_sequences for name in LOGP_FIELDS}
        return [
            SequenceRecord(token_ids=ids[s], response_start=int(cpu.response_starts[s]), advantage=advantages[s],
                           **{name: logps[name][s] for name in LOGP_FIELDS})
            for s in range(self.num_sequences)
        ]


def pack(sequences: Sequence[SequenceRecord | Mapping], *, ignore_index: int = IGNORE_INDEX) -> PackedBatch:
    """Concatenate S sequences into one padding-free `PackedBatch` (on CPU; `.to(device)` it).

    Args:
        sequences: S >= 1 `SequenceRecord`s (or mappings with the same fields). The per-token
            log-prob fields must be given for all sequences or for none.
        ignore_index: the target of each sequence's last row (it has no next token).

    Returns:
        PackedBatch with N = Σ L_s rows; see the module docstring for the row convention.

    Raises:
        ValueError / TypeError naming the sequence (by index) and the field.
    """
    if isinstance(sequences, (SequenceRecord, Mapping)) or not isinstance(sequences, Sequence):
        raise TypeError(f"sequences: expected a sequence of SequenceRecord, got {type(sequences).__name__}")
    if len(sequences) == 0:
        raise ValueError("sequences: expected at least one sequence to pack, got an empty list")
    records = [_as_record(item, i) for i, item in enumerate(sequences)]
    for name in LOGP_FIELDS:
        given = [getattr(r, name) is not None for r in records]
        if any(given) and not all(given):
            raise ValueError(f"sequence {given.index(False)}: {name} is None but sequence {given.index(True)} "
                             f"has it; give {name} for every sequence or for none")

    ids = [_as_1d("token_ids", r.token_ids, integer=True) for r in records]
    for i, t in enumerate(ids):
        if (t < 0).any():
            raise ValueError(f"sequence {i}: token_ids must be >= 0, got {int(t.min())}")
    lengths = torch.tensor([len(t) for t in ids], dtype=torch.int64)           # (S,)
    starts = torch.tensor([r.response_start for r in records], dtype=torch.int64)
    cu = torch.zeros(len(records) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lengths, 0)
    n = int(cu[-1])

    seq_id = seq_ids(cu, n)                                                     # (N,)
    local = torch.arange(n) - cu[:-1][seq_id]                                   # (N,) position in sequence
    last = local == lengths[seq_id] - 1
    input_ids = torch.cat(ids)
    targets = torch.roll(input_ids, -1).masked_fill(last, ignore_index)         # next token; −100 at ends
    loss_mask = (local + 1 >= starts[seq_id]) & ~last
    adv = torch.tensor([float(r.advantage) for r in records], dtype=torch.float32)
    advantages = torch.where(loss_mask, adv[seq_id], torch.zeros((), dtype=torch.float32))

    per_token = {}
    for name in LOGP_FIELDS:
        if getattr(records[0], name) is None:
            per_token[name] = None
            continue
        values = torch.zeros(n, dtype=torch.float32)
        values[loss_mask] = torch.cat([_as_1d(name, getattr(r, name), integer=False) for r in records])
        per_token[name] = values

    return PackedBatch(
        input_ids=input_ids, position_ids=local, cu_seqlens=cu.to(torch.int32), max_seqlen=int(lengths.max()),
        targets=targets, loss_mask=loss_mask, advantages=advantages, response_starts=starts,
        ignore_index=ignore_index, **per_token,
    )


def zero_weight_batch(like: SequenceRecord) -> PackedBatch:
    """A 2-token micro-batch with an all-zero loss mask and advantages, holding the log-prob
    fields `like` holds: a forward/backward of it adds exactly 0 to the loss, the gradients and
    the metric sums (it exists for the FSDP collectives of a rank with fewer micro-batches)."""
    one = {name: ([0.0] if getattr(like, name) is not None else None) for name in LOGP_FIELDS}
    batch = pack([SequenceRecord(token_ids=list(like.token_ids[:2]), response_start=1, advantage=0.0, **one)])
    batch.loss_mask = torch.zeros_like(batch.loss_mask)
    batch.advantages = torch.zeros_like(batch.advantages)
    return batch


def pack_microbatch(records: Sequence[SequenceRecord], idx: Sequence[int]) -> PackedBatch:
    """The micro-batch `idx` of a plan (indices into `records`, see `plan_microbatches`); an empty
    `idx` is a `zero_weight_batch` shaped like records[0]."""
    return pack([records[i] for i in idx]) if idx else zero_weight_batch(records[0])


# ----------------------------------------------------------------------------- planners


def _check_lengths(lengths: Sequence[int]) -> list[int]:
    """Lengths as Python ints; each must be a positive integer (errors name the index)."""
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.tolist()
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence):
        raise TypeError(f"lengths: expected a sequence of ints, got {type(lengths).__name__}")
    out = []
    for i, value in enumerate(lengths):
        if isinstance(value, bool):
            raise TypeError(f"lengths[{i}]: expected an int, got bool")
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"lengths[{i}]: expected an int, got {type(value).__name__}") from None
        if value < 1:
            raise ValueError(f"lengths[{i}]: expected a positive number of tokens, got {value}")
        out.append(value)
    return out


def plan_microbatches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sequences into micro-batches of at most `max_tokens` tokens (first-fit-decreasing).

    Sequences are visited longest first (ties: lower index first); each goes into the first
    micro-batch it fits in, or opens a new one. FFD uses at most 11/9·OPT + 6/9 micro-batches,
    and any two of its micro-batches i < j satisfy load_i + (any length in j) > max_tokens.
    The plan depends only on the multiset of lengths, never on chance.

    Args:
        lengths: [S] positive token counts (prompt + response) of the sequences.
        max_tokens: the token budget of one micro-batch (e.g. 32768), >= 1.

    Returns:
        Micro-batches as lists of indices into `lengths` (ascending within each), ordered as
        opened (the first holds the longest sequence). Every index appears exactly once; an
        empty `lengths` gives [].

    Raises:
        ValueError if a sequence is longer than `max_tokens` (naming it and the budget), or on
        a non-positive length or budget.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens: expected a positive int, got {max_tokens!r}")
    sizes = _check_lengths(lengths)
    for i, size in enumerate(sizes):
        if size > max_tokens:
            raise ValueError(f"lengths[{i}] = {size} tokens exceeds the micro-batch budget max_tokens = "
                             f"{max_tokens}; raise max_tokens to at least {size} or truncate the sequence")
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        # Linear scan: plans have tens of micro-batches, and the scan keeps "first fit" literal.
        for b, load in enumerate(loads):
            if load + sizes[i] <= max_tokens:
                bins[b].append(i)
                loads[b] += sizes[i]
                break
        else:
            bins.append([i])
            loads.append(sizes[i])
    return [sorted(b) for b in bins]


def attention_crossover(hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int,
                        head_dim: int | None = None) -> float:
    """The length L× at which causal attention costs as much as the rest of a decoder layer.

    Per token and layer, the projections and SwiGLU MLP cost 2·P FLOP with
    P = H·(q + k + v + o widths) + 3·H·I; causal attention (QKᵀ and PV over L/2 keys on
    average) costs 2·2·(L/2)·d with d = num_heads·head_dim. Their ratio is L·d/P, so L× = P/d:
    Qwen2.5-1.5B ≈ 30.5k, Llama-3-8B ≈ 53k, Qwen2.5-7B ≈ 65k tokens.
    """
    head_dim = head_dim or hidden_size // num_heads
    d_attn = num_heads * head_dim
    params = hidden_size * (2 * d_attn + 2 * num_kv_heads * head_dim) + 3 * hidden_size * intermediate_size
    return params / d_attn


def sequence_cost(length: int, attention_crossover: float = DEFAULT_ATTENTION_CROSSOVER) -> float:
    """Relative compute of one sequence: L·(1 + L/L×) (tokens plus the quadratic attention term)."""
    return length * (1.0 + length / attention_crossover)


def _lpt(costs: list[float], num_ranks: int) -> list[list[int]]:
    """Longest processing time first: each job (largest first) to the least-loaded rank."""
    heap = [(0.0, r) for r in range(num_ranks)]                  # (load, rank); ties → lower rank
    parts: list[list[int]] = [[] for _ in range(num_ranks)]
    for i in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        load, r = heapq.heappop(heap)
        parts[r].append(i)
        heapq.heappush(heap, (load + costs[i], r))
    return parts


def _karmarkar_karp(costs: list[float], num_ranks: int) -> list[list[int]]:
    """m-way largest differencing: repeatedly merge the two partial partitions whose spread
    (max − min subset sum) is largest, pairing one's heaviest subset with the other's lightest."""
    counter = itertools.count()                                  # deterministic tie-break
    heap = []
    for i in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        subsets = [(costs[i], [i])] + [(0.0, []) for _ in range(num_ranks - 1)]
        heapq.heappush(heap, (-costs[i], next(counter), subsets))
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b))]
        merged.sort(key=lambda s: -s[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), next(counter), merged))
    return [idx for _, idx in heap[0][2]]


def _makespan(parts: list[list[int]], costs: list[float]) -> float:
    return max(sum(costs[i] for i in p) for p in parts)


def balance(lengths: Sequence[int], num_ranks: int, *, method: str = "best",
            attention_crossover: float = DEFAULT_ATTENTION_CROSSOVER) -> list[list[int]]:
    """Partition sequences across `num_ranks` data-parallel ranks, minimising the slowest rank.

    The cost of a sequence is `sequence_cost(L) = L·(1 + L/attention_crossover)`: its tokens
    plus the causal-attention term, which for the default constant (Qwen2.5-1.5B, see
    `attention_crossover`) doubles the cost of a 32k-token sequence.

    Args:
        lengths: [S] positive token counts.
        num_ranks: m >= 1 ranks.
        method: "lpt" (longest processing time first), "kk" (Karmarkar–Karp differencing) or
            "best" (both; the smaller makespan, LPT on ties). All three guarantee
            makespan <= (4/3 − 1/(3m))·OPT; LPT also <= Σcost/m + (1 − 1/m)·max cost.
        attention_crossover: L× > 0, the length at which attention doubles a sequence's cost.

    Returns:
        m lists of indices into `lengths` (ascending within each; some may be empty when
        S < m). Every index appears exactly once. Deterministic: no randomness is involved.
    """
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"num_ranks: expected an int >= 1, got {num_ranks!r}")
    if method not in ("lpt", "kk", "best"):
        raise ValueError(f"method: expected 'lpt', 'kk' or 'best', got {method!r}")
    if not attention_crossover > 0:
        raise ValueError(f"attention_crossover: expected > 0, got {attention_crossover!r}")
    sizes = _check_lengths(lengths)
    if not sizes:
        return [[] for _ in range(num_ranks)]
    costs = [sequence_cost(s, attention_crossover) for s in sizes]
    if method == "lpt":
        parts = _lpt(costs, num_ranks)
    elif method == "kk":
        parts = _karmarkar_karp(costs, num_ranks)
    else:
        lpt, kk = _lpt(costs, num_ranks), _karmarkar_karp(costs, num_ranks)
        parts = kk if _makespan(kk, costs) < _makespan(lpt, costs) else lpt
    return [sorted(p) for p in parts]
