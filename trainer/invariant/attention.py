"""Attention with a fixed key-block order: a query's output is a function of its own sequence.

Every query walks its sequence's keys in blocks of KEY_BLOCK, the first block starting at the
sequence's first key, and merges them with the online softmax in that order:

    m ← max(m, max_j s_j),  l ← l·e^(m_old − m) + Σ_j e^(s_j − m),  o ← o·e^(m_old − m) + Σ_j e^(s_j − m)·v_j

with s_j = (q·scale)·k_j. Keys a query must not see (the future, another sequence, left padding,
outside a sliding window) get s = −inf and a zero value, so they add exact zeros; a block with no visible key
leaves (m, l, o) bit for bit unchanged (e^0 = 1), so it is skipped. Hence a query at position t
gets the same bits whether it is one of N packed rows (the trainer) or the single new row of a
decode step over a KV cache (the sampler): the blocks, their contents and the merge order are the
same.

Queries are computed in tiles of QUERY_TILE positions of one sequence (positions 0..15, 16..31,
... of it; a decode step's tile holds its one query), which share their key blocks. The dot
products are batched GEMMs of one shape per call, [QUERY_TILE·rep, D] x [D, KEY_BLOCK] and
[QUERY_TILE·rep, KEY_BLOCK] x [KEY_BLOCK, D] per tile and key-value head (`ops.blocked_bmm`): a
GEMM row's bits do not depend on the row's place in the tile or on the other rows; the block
sums are reductions over the last dimension with many outputs (one order per output whatever
their number); the exponentials run on the vector path only (`ops.flat_chunks`).

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

__all__ = ["FIXED_BLOCKS", "KEY_BLOCK", "QUERY_TILE", "block_attention", "fixed_block_attention"]

FIXED_BLOCKS = "fixed_blocks"
"""The attention backend name `forward_hidden` and the sampler pass for this attention."""
KEY_BLOCK = 32
"""Keys per block."""
QUERY_TILE = 4
"""Query positions per tile (a decode step pads its one query to a tile)."""


def _tiles(key_start, n_visible, index, m: int):
    """Group queries (their sequence's first key, visible-key count = position + 1, index among
    the m queries) into tiles: (query index [T, QUERY_TILE], m where empty; visible-key count
    [T, QUERY_TILE], 1 where empty; the tile's first key [T])."""
    pos = n_visible - 1
    _, tile = torch.unique(key_start * (int(pos.max()) // QUERY_TILE + 1) + pos // QUERY_TILE, return_inverse=True)
    t, slot = int(tile.max()) + 1, pos % QUERY_TILE
    qidx = torch.full((t, QUERY_TILE), m, dtype=torch.long, device=pos.device)
    nvis = torch.ones((t, QUERY_TILE), dtype=torch.long, device=pos.device)
    start = torch.zeros(t, dtype=torch.long, device=pos.device)
    qidx[tile, slot], nvis[tile, slot], start[tile] = index, n_visible, key_start
    return qidx, nvis, start


def _windows(rows: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """rows [R, D] → fp32 copies of the windows of KEY_BLOCK consecutive rows starting at each
    index in win [W]: [W, KEY_BLOCK, D]; rows past R read as zeros. Each window is one
    KEY_BLOCK·D run of memory, gathered whole (`index_select` of a strided view of rows; a window
    that would run past R comes from a small zero-padded copy of the last rows)."""
    r, d = rows.shape
    view = lambda t: t.as_strided((t.shape[0] - KEY_BLOCK + 1, KEY_BLOCK * d), (d, 1))
    rows, last = rows.contiguous(), r - KEY_BLOCK                                    # last window inside rows
    over = win > last
    out = view(rows).index_select(0, win.clamp(max=last)) if last >= 0 else None
    if last < 0 or bool(over.any()):
        base = max(last, 0)
        tail = view(torch.cat([rows[base:], rows.new_zeros(KEY_BLOCK, d)]))
        out = tail.index_select(0, win - base) if out is None else out.index_put_((over,), tail[win[over] - base])
    return out.view(-1, KEY_BLOCK, d).float()


def _attend(qt, key, value, start, nvis, first):
    """qt: [T·h_kv, TQ·rep, D] (scaled tiles); key / value: [B, h_kv, L, D] (flat key f is
    column f % L of row f // L); start: [T]; nvis / first: [T, TQ] (keys start + [first, nvis)
    visible to each query) → [T·h_kv, TQ·rep, D].

    A block's keys are one window of the key rows (`_windows`) per tile and head: the block's
    keys a tile may not see are whatever follows them (their scores are −inf, each score is its
    own dot product) and their values are zeros."""
    t, tq = nvis.shape
    _, h_kv, n, d = key.shape
    rows = qt.shape[1]
    rep = rows // tq
    key_rows, value_rows = key.reshape(-1, d), value.reshape(-1, d)                   # [B·h_kv·L, D]
    m = torch.full(qt.shape[:2], -math.inf, dtype=qt.dtype, device=qt.device)
    l_sum = torch.zeros(qt.shape[:2], dtype=qt.dtype, device=qt.device)
    acc = torch.zeros_like(qt)
    n_blocks = (nvis.amax(1) + KEY_BLOCK - 1) // KEY_BLOCK                           # [T]
    offsets = torch.arange(KEY_BLOCK, device=qt.device)
    heads = torch.arange(h_kv, device=qt.device)
    for j in range(int(n_blocks.max())):
        act = (n_blocks > j).nonzero()[:, 0]                                          # tiles with keys left
        a, off, every = act.numel(), j * KEY_BLOCK + offsets, act.numel() == t
        vis = (off < nvis[act][..., None]) & (off >= first[act][..., None])           # [A, TQ, Bk]
        hidden = ~vis.any(1)                                                          # [A, Bk]
        f = start[act] + j * KEY_BLOCK                                                # the block's first key
        win = (((f // n)[:, None] * h_kv + heads) * n + (f % n)[:, None]).reshape(-1)  # [A·h_kv]
        keys = _windows(key_rows, win).transpose(1, 2)                                # [A·h_kv, D, Bk]
        vals = _windows(value_rows, win)                                              # [A·h_kv, Bk, D]
        if bool(hidden.any()):
            vals.view(a, h_kv, KEY_BLOCK, d).masked_fill_(hidden[:, None, :, None], 0)
        sel = None if every else (act[:, None] * h_kv + heads).reshape(-1)            # state rows [A·h_kv]
        s = blocked_bmm(qt if every else qt[sel], keys)
        s.view(a, h_kv, tq, rep, KEY_BLOCK).masked_fill_(~vis[:, None, :, None, :], -math.inf)
        m_old = m if every else m[sel]
        m_new = torch.maximum(m_old, s.amax(-1))
        # A query that has seen no key yet (a sliding window hides this block too) keeps m = −inf;
        # it subtracts 0 instead, so exp(−inf − 0) = 0 leaves its state empty rather than NaN.
        # Every other row subtracts m_new itself: the same bits as without this guard.
        m_sub = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
        alpha = flat_chunks(torch.exp, m_old - m_sub)                                 # [A·h_kv, rows]
        p = flat_chunks(torch.exp, s - m_sub[..., None])                              # [A·h_kv, rows, Bk]
        pv = blocked_bmm(p, vals)
        if every:
            l_sum, acc, m = l_sum * alpha + p.sum(-1), acc * alpha[..., None] + pv, m_new
        else:
            l_sum[sel] = l_sum[sel] * alpha + p.sum(-1)
            acc[sel] = acc[sel] * alpha[..., None] + pv
            m[sel] = m_new
    return acc / l_sum[..., None]


def _attention(query, key, value, key_start, n_visible, valid, scaling: float, window: int) -> torch.Tensor:
    """query [B, h, Lq, D], key/value [B, h_kv, Lk, D]; key_start / n_visible / valid: [B·Lq]
    (indices into the B·Lk flattened keys; invalid queries, left padding, get zeros) →
    [B, Lq, h, D] in query's dtype."""
    b, h, lq, d = query.shape
    h_kv = key.shape[1]
    rep, n = h // h_kv, b * lq
    with stock_ops():
        q = (query.float() * scaling).transpose(1, 2).reshape(n, h, d)
        q = torch.cat([q, q.new_zeros(1, h, d)])                                      # row n: empty slots
        index = valid.nonzero()[:, 0]
        qidx, nvis, start = _tiles(key_start[index], n_visible[index], index, n)
        t = qidx.shape[0]
        qt = q[qidx].view(t, QUERY_TILE, h_kv, rep, d).permute(0, 2, 1, 3, 4).reshape(t * h_kv, QUERY_TILE * rep, d)
        first = (nvis - 1 - window).clamp(min=0) if window >= 0 else torch.zeros_like(nvis)
        out_t = _attend(qt, key, value, start, nvis, first)
        out_t = out_t.view(t, h_kv, QUERY_TILE, rep, d).permute(0, 2, 1, 3, 4).reshape(t * QUERY_TILE, h, d)
        out = q.new_zeros(n + 1, h, d)
        out[qidx.reshape(-1)] = out_t                                                 # empty slots → row n
    return out[:n].view(b, lq, h, d).to(query.dtype)


def block_attention(q, k, v, key_start, n_visible, *, scaling: float, window: int = -1) -> torch.Tensor:
    """Fixed-block attention of M queries over their own keys.

    Args:
        q: [M, h, D]; k, v: [Nk, h_kv, D] (h a multiple of h_kv).
        key_start: [M] int64, the index in k of the first key of each query's sequence.
        n_visible: [M] int64 >= 1, keys key_start .. key_start + n_visible − 1 precede the query
            (itself included; a query's position is n_visible − 1); window >= 0 keeps only the
            last window + 1 of them.
    Returns:
        [M, h, D] in q's dtype.
    """
    to_layout = lambda t: t.transpose(0, 1)[None]                                    # [1, heads, rows, D]
    valid = torch.ones_like(n_visible, dtype=torch.bool)
    return _attention(to_layout(q), to_layout(k), to_layout(v), key_start, n_visible, valid, scaling, window)[0]


def _sdpa_per_sequence(q, k, v, cu: list[int], scaling: float, window: int) -> torch.Tensor:
    """q: [N, h, D], k/v: [N, h_kv, D] → [N, h, D]: causal attention within each sequence."""
    outs = []
    for start, end in zip(cu[:-1], cu[1:]):
        mask = None
        if 0 <= window < end - start - 1:                                             # the window cuts
            pos = torch.arange(end - start, device=q.device)
            mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pos[:, None] - window)
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scaling,
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
    the Lk columns are the queries): each row sees its own columns from key_start on.

    Under `ops.batch_invariant_ops` the call is handed to the mode as one function (the
    `torch.overrides` protocol), which runs it with the mode off: this attention makes its own
    invariance, and its many small operators skip the mode's per-call dispatch."""
    if torch.overrides.has_torch_function((query,)):
        return torch.overrides.handle_torch_function(
            fixed_block_attention, (query,), query, key, value, scaling=scaling, sliding_window=sliding_window,
            cu_seqlens=cu_seqlens, key_start=key_start)
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
        return _attention(query, key, value, starts, n_visible, torch.ones_like(pos, dtype=torch.bool), scaling,
                          window)
    if key_start is None:
        raise ValueError("fixed-block attention needs cu_seqlens (packed) or key_start (left-padded batch)")
    row_start = key_start.to(device=query.device, dtype=torch.long)
    col = torch.arange(lk - lq, lk, device=query.device)                              # the queries' columns
    starts = (torch.arange(b, device=query.device) * lk + row_start)[:, None].expand(b, lq).reshape(-1)
    n_visible = (col[None] - row_start[:, None] + 1).reshape(-1)                     # <= 0: left padding
    return _attention(query, key, value, starts, n_visible, n_visible > 0, scaling, window)
