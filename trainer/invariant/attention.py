"""Attention with a fixed key-block order: a query's output is a function of its own sequence.

Every query walks its sequence's keys in blocks of KEY_BLOCK, the first block starting at the
sequence's first key, and merges them with the online softmax in that order:

    m ← max(m, max_j s_j),  l ← l·e^(m_old − m) + Σ_j e^(s_j − m),  o ← o·e^(m_old − m) + Σ_j e^(s_j − m)·v_j

with s_j = (q·scale)·k_j. Keys a query must not see (the future, another sequence, left padding,
outside a sliding window) get s = −inf and a zeroed key and value, so they add exact zeros; a block
with no visible key leaves (m, l, o) bit for bit unchanged (e^0 = 1). Hence a query at position t
gets the same bits whether it is one of N packed rows (the trainer) or the single new row of a
decode step over a KV cache (the sampler): the blocks, their contents and the merge order are the
same. The dot products and block sums are reductions over the last dimension of contiguous tensors
with many outputs (one order per output whatever their number); the exponentials run on the
vector path only (`ops.flat_chunks`).

Two layouts, one core (`block_attention`): packed rows ([1, h, N, D] with cu_seqlens, the
trainer's `forward_hidden`) and a left-padded batch ([B, h, L, D] with each row's first real
column, the sampler's prefill and decode steps).
"""

from __future__ import annotations

import math

import torch

from .ops import flat_chunks, stock_ops

__all__ = ["FIXED_BLOCKS", "KEY_BLOCK", "QUERY_CHUNK", "block_attention", "fixed_block_attention"]

FIXED_BLOCKS = "fixed_blocks"
"""The attention backend name `forward_hidden` and the sampler pass for this attention."""
KEY_BLOCK = 32
"""Keys per block."""
QUERY_CHUNK = 256
"""Queries computed together (memory only: queries are independent)."""


def _attend(q, k, v, key_start, n_visible, first_visible):
    """q: [c, h, D] (scaled); k, v: [Nk + 1, h_kv, D] whose last row is zero; key_start /
    n_visible / first_visible: [c] (keys key_start + [first_visible, n_visible) are visible)
    → [c, h, D]."""
    c, h, d = q.shape
    h_kv = k.shape[1]
    rep, zero_row = h // h_kv, k.shape[0] - 1
    q = q.view(c, 1, h_kv, rep, d)
    m = torch.full((c, h), -math.inf, dtype=q.dtype, device=q.device)
    l_sum = torch.zeros((c, h), dtype=q.dtype, device=q.device)
    acc = torch.zeros((c, h, d), dtype=q.dtype, device=q.device)
    offsets = torch.arange(KEY_BLOCK, device=q.device)
    for j in range(math.ceil(int(n_visible.max()) / KEY_BLOCK)):
        off = j * KEY_BLOCK + offsets                                               # [Bk]
        visible = (off[None] < n_visible[:, None]) & (off[None] >= first_visible[:, None])   # [c, Bk]
        idx = torch.where(visible, key_start[:, None] + off[None], zero_row)        # hidden keys: the zero row
        s = (q * k[idx][:, :, :, None, :]).sum(-1).view(c, KEY_BLOCK, h).transpose(1, 2)   # [c, h, Bk]
        s = s.masked_fill(~visible[:, None, :], -math.inf)
        m_new = torch.maximum(m, s.amax(-1))
        alpha = flat_chunks(torch.exp, m - m_new)                                   # [c, h]
        p = flat_chunks(torch.exp, s - m_new[..., None])                            # [c, h, Bk]
        l_sum = l_sum * alpha + p.sum(-1)
        vals = v[idx].permute(0, 2, 3, 1)[:, :, None]                               # [c, h_kv, 1, D, Bk]
        pv = (p.view(c, h_kv, rep, 1, KEY_BLOCK) * vals).sum(-1).view(c, h, d)      # [c, h, D]
        acc = acc * alpha[..., None] + pv
        m = m_new
    return acc / l_sum[..., None]


def block_attention(q, k, v, key_start, n_visible, *, scaling: float, window: int = -1) -> torch.Tensor:
    """Fixed-block attention of M queries over their own keys.

    Args:
        q: [M, h, D]; k, v: [Nk, h_kv, D] (h a multiple of h_kv).
        key_start: [M] int64, the index in k of the first key of each query's sequence.
        n_visible: [M] int64 >= 1, keys key_start .. key_start + n_visible − 1 precede the query
            (itself included); window >= 0 keeps only the last window + 1 of them.
    Returns:
        [M, h, D] in q's dtype.
    """
    first = (n_visible - 1 - window).clamp(min=0) if window >= 0 else torch.zeros_like(n_visible)
    qs = (q.float() * scaling)
    kf, vf = (torch.cat([t.float(), t.new_zeros(1, *t.shape[1:], dtype=torch.float32)]) for t in (k, v))
    with stock_ops():
        out = [_attend(qs[i:i + QUERY_CHUNK], kf, vf, key_start[i:i + QUERY_CHUNK], n_visible[i:i + QUERY_CHUNK],
                       first[i:i + QUERY_CHUNK]) for i in range(0, q.shape[0], QUERY_CHUNK)]
    return torch.cat(out).to(q.dtype)


def fixed_block_attention(query, key, value, *, scaling, sliding_window=None, cu_seqlens=None,
                          key_start=None) -> torch.Tensor:
    """The transformers-facing form: query [B, h, Lq, D], key/value [B, h_kv, Lk, D] →
    [B, Lq, h, D]. Packed (B = 1, `cu_seqlens` [S+1]): each token sees its sequence from its
    start. Batch (`key_start` [B], the first real column of each left-padded row; the last Lq of
    the Lk columns are the queries): each row sees its own columns from key_start on."""
    b, h, lq, d = query.shape
    lk = key.shape[2]
    window = -1 if sliding_window is None else int(sliding_window) - 1
    q = query.transpose(1, 2).reshape(b * lq, h, d)
    k = key.transpose(1, 2).reshape(b * lk, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * lk, value.shape[1], d)
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"fixed-block packed attention expects one packed row, got batch {b}")
        cu = cu_seqlens.to(device=query.device, dtype=torch.long)
        pos = torch.arange(lq, device=query.device)
        starts = cu[torch.searchsorted(cu, pos, right=True) - 1]
        n_visible = pos - starts + 1
    elif key_start is not None:
        row_start = key_start.to(device=query.device, dtype=torch.long)
        col = torch.arange(lk - lq, lk, device=query.device)                          # the queries' columns
        starts = (torch.arange(b, device=query.device) * lk + row_start)[:, None].expand(b, lq).reshape(-1)
        n_visible = (col[None] - row_start[:, None] + 1).clamp(min=1).reshape(-1)     # padding rows: 1 key
    else:
        raise ValueError("fixed-block attention needs cu_seqlens (packed) or key_start (left-padded batch)")
    out = block_attention(q, k, v, starts, n_visible, scaling=scaling, window=window)
    return out.reshape(b, lq, h, d)
