"""Attention with a fixed key-block order: a query's output is a function of its own sequence.

Every query walks its sequence's keys in blocks of KEY_BLOCK, the first block starting at the
sequence's first key, and merges them with the online softmax in that order:

    m ← max(m, max_j s_j),  l ← l·e^(m_old − m) + Σ_j e^(s_j − m),  o ← o·e^(m_old − m) + Σ_j e^(s_j − m)·v_j

with s_j = (q·scale)·k_j. Keys a query must not see (the future, another sequence, left padding,
outside a sliding window) get s = −inf and a zeroed key and value, so they add exact zeros; a block
with no visible key leaves (m, l, o) bit for bit unchanged (e^0 = 1). Hence a query at position t
gets the same bits whether it is one of N packed rows (the trainer) or the single new row of a
decode step over a KV cache (the sampler): the blocks, their contents and the merge order are the
same. The dot products are batched GEMMs of one shape per call ([KEY_BLOCK, D] x [D, rep] and
[rep, KEY_BLOCK] x [KEY_BLOCK, D] per query and key-value head, `ops.blocked_bmm`); the block sums
are reductions over the last dimension with many outputs (one order per output whatever their
number); the exponentials run on the vector path only (`ops.flat_chunks`).

The promise is about forward bits: the packed layout's backward (`_PackedAttention`) is the
gradient of the same attention computed by one causal SDPA per sequence (any correct gradient
will do, and the fast one is the stock kernel).

Two layouts, one core (`block_attention`): packed rows ([1, h, N, D] with cu_seqlens, the
trainer's `forward_hidden`) and a left-padded batch ([B, h, L, D] with each row's first real
column, the sampler's prefill and decode steps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops import blocked_bmm, flat_chunks, stock_ops

__all__ = ["FIXED_BLOCKS", "KEY_BLOCK", "QUERY_CHUNK", "block_attention", "fixed_block_attention"]

FIXED_BLOCKS = "fixed_blocks"
"""The attention backend name `forward_hidden` and the sampler pass for this attention."""
KEY_BLOCK = 32
"""Keys per block."""
QUERY_CHUNK = 256
"""Queries computed together (memory only: queries are independent)."""


def _attend(q, k, v, key_start, n_visible, first_visible):
    """q: [h_kv, c, rep, D] (scaled); k, v: [h_kv, Nk + 1, D] whose last column is zero;
    key_start / n_visible / first_visible: [c] (keys key_start + [first_visible, n_visible) are
    visible) → [h_kv, c, rep, D]. Every tensor a GEMM reads is contiguous, in one layout."""
    h_kv, c, rep, d = q.shape
    zero_col = k.shape[1] - 1
    q = q.reshape(h_kv * c, rep, d)
    m = torch.full((h_kv, c, rep), -math.inf, dtype=q.dtype, device=q.device)
    l_sum = torch.zeros((h_kv, c, rep), dtype=q.dtype, device=q.device)
    acc = torch.zeros((h_kv, c, rep, d), dtype=q.dtype, device=q.device)
    offsets = torch.arange(KEY_BLOCK, device=q.device)
    for j in range(math.ceil(int(n_visible.max()) / KEY_BLOCK)):
        off = j * KEY_BLOCK + offsets                                               # [Bk]
        visible = (off[None] < n_visible[:, None]) & (off[None] >= first_visible[:, None])   # [c, Bk]
        idx = torch.where(visible, key_start[:, None] + off[None], zero_col)        # hidden keys: the zero column
        keys = k[:, idx].reshape(h_kv * c, KEY_BLOCK, d)                            # [h_kv·c, Bk, D]
        s = blocked_bmm(keys, q.transpose(1, 2).contiguous())                       # [h_kv·c, Bk, rep]
        s = s.view(h_kv, c, KEY_BLOCK, rep).transpose(2, 3).contiguous()            # [h_kv, c, rep, Bk]
        s = s.masked_fill(~visible[None, :, None, :], -math.inf)
        m_new = torch.maximum(m, s.amax(-1))
        alpha = flat_chunks(torch.exp, m - m_new)                                   # [h_kv, c, rep]
        p = flat_chunks(torch.exp, s - m_new[..., None])                            # [h_kv, c, rep, Bk]
        l_sum = l_sum * alpha + p.sum(-1)
        vals = v[:, idx].reshape(h_kv * c, KEY_BLOCK, d)                            # [h_kv·c, Bk, D]
        pv = blocked_bmm(p.reshape(h_kv * c, rep, KEY_BLOCK), vals).view(h_kv, c, rep, d)
        acc = acc * alpha[..., None] + pv
        m = m_new
    return acc / l_sum[..., None]


def _kv_columns(t: torch.Tensor) -> torch.Tensor:
    """[B, h_kv, L, D] (transformers' layout) → [h_kv, B·L + 1, D] fp32, the last column zero:
    one copy."""
    b, h_kv, n, d = t.shape
    out = torch.zeros((h_kv, b * n + 1, d), dtype=torch.float32, device=t.device)
    out[:, :-1].view(h_kv, b, n, d).copy_(t.transpose(0, 1))
    return out


def _attention(query, key, value, key_start, n_visible, scaling: float, window: int) -> torch.Tensor:
    """query [B, h, Lq, D], key/value [B, h_kv, Lk, D]; key_start / n_visible: [B·Lq] int64
    (indices into the B·Lk flattened keys) → [B, Lq, h, D] in query's dtype."""
    b, h, lq, d = query.shape
    h_kv = key.shape[1]
    first = (n_visible - 1 - window).clamp(min=0) if window >= 0 else torch.zeros_like(n_visible)
    with stock_ops():
        qs = (query.float() * scaling).view(b, h_kv, h // h_kv, lq, d).permute(1, 0, 3, 2, 4)
        qs = qs.reshape(h_kv, b * lq, h // h_kv, d)                                   # [h_kv, M, rep, D]
        kf, vf = _kv_columns(key), _kv_columns(value)
        out = torch.cat([_attend(qs[:, i:i + QUERY_CHUNK], kf, vf, key_start[i:i + QUERY_CHUNK],
                                 n_visible[i:i + QUERY_CHUNK], first[i:i + QUERY_CHUNK])
                         for i in range(0, b * lq, QUERY_CHUNK)], dim=1)             # [h_kv, M, rep, D]
        out = out.view(h_kv, b, lq, h // h_kv, d).permute(1, 2, 0, 3, 4).reshape(b, lq, h, d)
    return out.to(query.dtype)


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
    to_layout = lambda t: t.transpose(0, 1)[None]                                    # [1, heads, rows, D]
    return _attention(to_layout(q), to_layout(k), to_layout(v), key_start, n_visible, scaling, window)[0]


def _sdpa_per_sequence(q, k, v, cu: list[int], scaling: float, window: int) -> torch.Tensor:
    """q: [N, h, D], k/v: [N, h_kv, D] → [N, h, D]: causal attention within each sequence."""
    outs = []
    for start, end in zip(cu[:-1], cu[1:]):
        pos = torch.arange(end - start, device=q.device)
        mask = pos[None, :] <= pos[:, None]
        if window >= 0:
            mask &= pos[None, :] >= pos[:, None] - window
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scaling,
                                                   enable_gqa=q.shape[1] != k.shape[1]).transpose(0, 1))
    return torch.cat(outs)


class _PackedAttention(torch.autograd.Function):
    """Packed fixed-block attention: the invariant forward, the gradient of per-sequence SDPA."""

    @staticmethod
    def forward(ctx, q, k, v, cu, starts, n_visible, scaling, window):
        """q: [N, h, D], k/v: [N, h_kv, D] → [N, h, D]."""
        ctx.save_for_backward(q, k, v)
        ctx.cu, ctx.scaling, ctx.window = cu.tolist(), scaling, window
        return block_attention(q, k, v, starts, n_visible, scaling=scaling, window=window)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        with torch.enable_grad(), stock_ops():
            out = _sdpa_per_sequence(q, k, v, ctx.cu, ctx.scaling, ctx.window)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        return dq, dk, dv, None, None, None, None, None


def fixed_block_attention(query, key, value, *, scaling, sliding_window=None, cu_seqlens=None,
                          key_start=None) -> torch.Tensor:
    """The transformers-facing form: query [B, h, Lq, D], key/value [B, h_kv, Lk, D] →
    [B, Lq, h, D]. Packed (B = 1, `cu_seqlens` [S+1]): each token sees its sequence from its
    start. Batch (`key_start` [B], the first real column of each left-padded row; the last Lq of
    the Lk columns are the queries): each row sees its own columns from key_start on."""
    b, h, lq, d = query.shape
    lk = key.shape[2]
    window = -1 if sliding_window is None else int(sliding_window) - 1
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"fixed-block packed attention expects one packed row, got batch {b}")
        cu = cu_seqlens.to(device=query.device, dtype=torch.long)
        pos = torch.arange(lq, device=query.device)
        starts = cu[torch.searchsorted(cu, pos, right=True) - 1]
        n_visible = pos - starts + 1
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))          # [N, heads, D]
            return _PackedAttention.apply(q, k, v, cu, starts, n_visible, scaling, window)[None]
        return _attention(query, key, value, starts, n_visible, scaling, window)
    if key_start is None:
        raise ValueError("fixed-block attention needs cu_seqlens (packed) or key_start (left-padded batch)")
    row_start = key_start.to(device=query.device, dtype=torch.long)
    col = torch.arange(lk - lq, lk, device=query.device)                              # the queries' columns
    starts = (torch.arange(b, device=query.device) * lk + row_start)[:, None].expand(b, lq).reshape(-1)
    n_visible = (col[None] - row_start[:, None] + 1).clamp(min=1).reshape(-1)         # padding rows: 1 key
    return _attention(query, key, value, starts, n_visible, scaling, window)
