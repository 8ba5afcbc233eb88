"""Attention with a fixed key-block order: a query's output is a function of its own sequence.

A query's keys are cut into blocks of KEY_BLOCK, the first block starting at its sequence's
first key. With s_j = (q·scale)·k_j and m the largest visible score (a maximum: exact in any
order), each block b gives

    l_b = Σ_{j in b} e^(s_j − m)          o_b = Σ_{j in b} e^(s_j − m)·v_j

and the blocks merge by a fixed pairwise tree, block i with block i ^ 1, then their sums
likewise (`_pair_sum`): o = tree(o_b) / tree(l_b). Keys a query must not see (the future, another
sequence, left padding, outside a sliding window) get s = −inf and a +0 value, so they add exact
zeros, and a block past the query's last key adds an exact zero to the tree (x + 0 = x). Hence a
query at position t gets the same bits whether it is one of N packed rows (the trainer) or the
single new row of a decode step over a KV cache (the sampler), however many blocks the longest
query computed with it needs: the blocks, their contents and the merge order are the same.

Queries are computed in tiles of QUERY_TILE positions of one sequence (positions 0..3, 4..7, ...
of it; a decode step's tile holds its one query), which share their key blocks. The dot
products are batched GEMMs of one shape per call, [QUERY_TILE·rep, D] x [D, KEY_BLOCK] and
[QUERY_TILE·rep, KEY_BLOCK] x [KEY_BLOCK, D] per tile, key-value head and block
(`ops.blocked_bmm`): a GEMM row's bits do not depend on the row's place in the tile or on the
other rows; the block sums are reductions over the last dimension with many outputs (one order
per output whatever their number); the exponentials run on the vector path only
(`ops.flat_chunks`). Tiles are grouped by their block count (`_tile_groups`) so that a short
tile does not compute a long one's blocks; grouping changes no bits.

The promise is about forward bits: the packed layout's backward (`_PackedAttention`) is the
gradient of the same attention computed by one causal SDPA per sequence (any correct gradient
will do, and the fast one is the stock kernel).

Two layouts, one core (`block_attention`): packed rows ([1, h, N, D] with cu_seqlens, the
trainer's `forward_hidden`) and a left-padded batch ([B, h, L, D] with each row's first real
column, the sampler's prefill and decode steps).
"""

from __future__ import annotations

import math
import threading

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
TILE_BLOCKS = 1024
"""At most this many (tile, key block) pairs per `_attend` call: its buffers are about
TILE_BLOCKS · h_kv · KEY_BLOCK · (2·D + QUERY_TILE·rep) floats."""


def _tiles(key_start, n_visible, index, m: int, alone: bool = False):
    """Group queries (their sequence's first key, visible-key count = position + 1, index among
    the m queries) into tiles: (query index [T, QUERY_TILE], m where empty; visible-key count
    [T, QUERY_TILE], 1 where empty; the tile's first key [T]). `alone`: no two queries share a
    sequence (a decode step), so each gets a tile of its own."""
    pos = n_visible - 1
    if alone:
        tile = torch.arange(pos.numel(), device=pos.device)
    else:
        _, tile = torch.unique(key_start * (int(pos.max()) // QUERY_TILE + 1) + pos // QUERY_TILE, return_inverse=True)
    t, slot = int(tile.max()) + 1, pos % QUERY_TILE
    qidx = torch.full((t, QUERY_TILE), m, dtype=torch.long, device=pos.device)
    nvis = torch.ones((t, QUERY_TILE), dtype=torch.long, device=pos.device)
    start = torch.zeros(t, dtype=torch.long, device=pos.device)
    qidx[tile, slot], nvis[tile, slot], start[tile] = index, n_visible, key_start
    return qidx, nvis, start


_SCRATCH = threading.local()


def _scratch(slot: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A buffer of `shape` for this thread that the next call with the same slot reuses (CPU
    only). A fresh multi-megabyte tensor per call is mapped anew by the allocator and touched
    page by page: on a small VM that was half of a decode step's attention. The buffer is
    overwritten whole by its user and dead once `_attend` returns."""
    if like.device.type != "cpu":
        return like.new_empty(shape)
    key = (slot, like.dtype, torch.is_inference_mode_enabled())     # an inference tensor stays in its mode
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    numel = math.prod(shape)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        buf = pool[key] = like.new_empty(numel)
    return buf[:numel].view(shape)


def _windows(rows: torch.Tensor, win: torch.Tensor, length: int, slot: str) -> torch.Tensor:
    """rows [R, D] → copies of the windows of `length` consecutive rows starting at each index in
    win [W]: [W, length, D] (one `index_select` of whole rows into `_scratch(slot)`). A row past
    R reads as row R − 1: such keys are hidden from every query (after every sequence's last key)."""
    index = (win[:, None] + torch.arange(length, device=win.device)).clamp_(max=rows.shape[0] - 1)
    out = _scratch(slot, (index.numel(), rows.shape[1]), rows)
    return torch.index_select(rows, 0, index.view(-1), out=out).view(-1, length, rows.shape[1])


def _pair_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x summed over dim by a fixed pairwise tree: leaf j pairs with j ^ 1, then their sums
    likewise, the last odd one with a zero. Trailing zero leaves leave every sum's bits as they
    are (x + 0 = x), so the result does not depend on how many zero blocks follow the real ones."""
    dim %= x.dim()
    while x.shape[dim] > 1:
        if x.shape[dim] % 2:
            x = torch.cat([x, torch.zeros_like(x.narrow(dim, 0, 1))], dim)
        x = x.narrow(dim, 0, x.shape[dim] // 2 * 2).unflatten(dim, (-1, 2))
        x = x.select(dim + 1, 0) + x.select(dim + 1, 1)
    return x.squeeze(dim)


def _attend(qt, key, value, start, nvis, first, live=None):
    """qt: [T·h_kv, TQ·rep, D] (scaled tiles); key / value: fp32 [B, h_kv, L, D] (flat key f is
    column f % L of row f // L); start: [T]; nvis / first: [T, TQ] (keys start + [first, nvis)
    visible to each query) → [T·h_kv, TQ·rep, D].

    Two passes over all of a tile's NB key blocks at once. The blocks are one run of NB·KEY_BLOCK
    key rows per tile and head (`_windows`); the keys a tile may not see are whatever follows its
    last query (their scores are −inf, each score is its own dot product) and their values are
    zeros. The tile's maximum score is exact in any order; each block's exponentials sum over its
    KEY_BLOCK keys (a last-dim reduction) and meet its values in one fixed-shape GEMM; the
    blocks' partial sums then merge by `_pair_sum`. Blocks past a query's last key add exact
    zeros, so NB (the longest tile's count) does not change a query's bits."""
    t, tq = nvis.shape
    _, h_kv, n, d = key.shape
    rows = qt.shape[1]
    rep = rows // tq
    nb = int((nvis.max() + KEY_BLOCK - 1) // KEY_BLOCK)
    run = nb * KEY_BLOCK
    off = torch.arange(run, device=qt.device)
    vis = (off < nvis[..., None]) & (off >= first[..., None])                         # [T, TQ, NB·Bk]
    heads = torch.arange(h_kv, device=qt.device)
    win = (((start // n)[:, None] * h_kv + heads) * n + (start % n)[:, None]).reshape(-1)   # [T·h_kv]
    keys = _windows(key.reshape(-1, d), win, run, "keys")                             # [T·h_kv, NB·Bk, D]
    vals = _windows(value.reshape(-1, d), win, run, "values")
    # Values no query of the tile sees become +0 (× 0, then + 0 turns −0 into +0; every key row
    # is finite), so the products with their zero weights are +0 whatever those rows held.
    seen = vis.any(1).to(vals.dtype)                                                  # [T, NB·Bk]
    vals.view(t, h_kv, run, d).mul_(seen[:, None, :, None]).add_(0.0)
    q_rep = qt[:, None].expand(t * h_kv, nb, rows, d).reshape(-1, rows, d)          # [T·h_kv·NB, rows, D]
    s = blocked_bmm(q_rep, keys.view(-1, KEY_BLOCK, d).transpose(1, 2))            # [T·h_kv·NB, rows, Bk]
    bias = torch.zeros(vis.shape, dtype=s.dtype, device=s.device).masked_fill_(~vis, -math.inf)
    s.view(t, h_kv, nb, tq, rep, KEY_BLOCK).add_(bias.view(t, 1, tq, 1, nb, KEY_BLOCK).permute(0, 1, 4, 2, 3, 5))
    s4 = s.view(t * h_kv, nb, rows, KEY_BLOCK)
    if live is not None and 2 * int(live.sum()) < live.numel():
        p, l_sum = _live_weights(s4, live.view(t, 1, tq, 1).expand(t, h_kv, tq, rep).reshape(t * h_kv, rows))
    else:
        p, l_sum = _weights(s4, block_dim=1)
    pv = blocked_bmm(p.reshape(-1, rows, KEY_BLOCK), vals.view(-1, KEY_BLOCK, d))     # [T·h_kv·NB, rows, D]
    return _pair_sum(pv.view(t * h_kv, nb, rows, d), 1) / l_sum[..., None]


def _weights(s: torch.Tensor, block_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of query rows, their key blocks along block_dim and each block's keys last (Bk) →
    (e^(s − m) in s's shape, the blocks' sums merged by `_pair_sum`), m a query's maximum score
    (exact in any order). Element-wise work and last-dim sums: a query's bits do not depend on
    which other queries are computed with it, nor on the layout of the rest."""
    m = s.amax(dim=(block_dim, -1), keepdim=True)
    # A query that sees no key at all (an empty slot of a tile) subtracts 0: its row stays zeros.
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)
    p = flat_chunks(torch.exp, s - m)
    return p, _pair_sum(p.sum(-1), block_dim)


def _live_weights(s4: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_weights` of the live rows only (live [T·h_kv, rows]; a decode step's tiles hold one query
    in QUERY_TILE): the same bits for them, zeros for the others (sum 1, so no 0/0)."""
    p_live, l_live = _weights(s4.permute(0, 2, 1, 3)[live], block_dim=1)             # [R, NB, Bk]
    p = torch.zeros_like(s4)                                                          # [T·h_kv, NB, rows, Bk]
    p.permute(0, 2, 1, 3)[live] = p_live
    l_sum = s4.new_ones(live.shape)
    l_sum[live] = l_live
    return p, l_sum


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
        qidx, nvis, start = _tiles(key_start[index], n_visible[index], index, n, alone=lq == 1)
        key, value = key.float(), value.float()                 # once for every group (a no-op in fp32)
        t = qidx.shape[0]
        qt = q[qidx].view(t, QUERY_TILE, h_kv, rep, d).permute(0, 2, 1, 3, 4).reshape(t * h_kv, QUERY_TILE * rep, d)
        first = (nvis - 1 - window).clamp(min=0) if window >= 0 else torch.zeros_like(nvis)
        out = q.new_zeros(n + 1, h, d)
        qt = qt.view(t, h_kv, QUERY_TILE * rep, d)
        for g in _tile_groups((nvis.amax(1) + KEY_BLOCK - 1) // KEY_BLOCK):
            out_t = _attend(qt[g].view(-1, QUERY_TILE * rep, d), key, value, start[g], nvis[g], first[g],
                            qidx[g] < n)
            out_t = out_t.view(-1, h_kv, QUERY_TILE, rep, d).permute(0, 2, 1, 3, 4).reshape(-1, h, d)
            out[qidx[g].reshape(-1)] = out_t                                          # empty slots → row n
    return out[:n].view(b, lq, h, d).to(query.dtype)


def _tile_groups(n_blocks: torch.Tensor) -> list[torch.Tensor | slice]:
    """The tiles (their key-block counts [T]) as index groups, one `_attend` call each. A call
    computes every tile over its longest tile's blocks, so tiles of very different lengths (the
    packed forward: each sequence's first tiles see one block, its last ones all) go to groups of
    equal counts (above 8 blocks, rounded up to a power of two); a group is split so that a call
    holds at most TILE_BLOCKS tile-blocks (memory). Grouping changes no bits: each tile is
    computed alone, and blocks past its own add exact zeros."""
    t, top = n_blocks.numel(), int(n_blocks.max())
    if t * top <= 1.25 * int(n_blocks.sum()):                   # close enough: one group, as slices (views)
        step = max(1, TILE_BLOCKS // top)
        return [slice(a, min(a + step, t)) for a in range(0, t, step)]
    index = torch.arange(t, device=n_blocks.device)
    bucket = torch.where(n_blocks <= 8, n_blocks, 2 ** torch.log2(n_blocks.double()).ceil().long())
    buckets = [(index[bucket == c], int(c)) for c in bucket.unique().tolist()]
    return [part for members, count in buckets for part in members.split(max(1, TILE_BLOCKS // count))]


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
        qs, ks, vs = (t[None, start:end].transpose(1, 2) for t in (q, k, v))       # [1, heads, L, D]: 4-D
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scaling,
                                                   enable_gqa=q.shape[1] != k.shape[1])[0].transpose(0, 1))
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
