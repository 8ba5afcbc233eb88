"""The "torch" backend of `linear_logprobs`: the Triton kernels' recurrences in plain torch.

Used for CPU tensors (and anywhere with backend="torch"). It streams over [rows, cols] chunks
of the logits in fp32, so its memory is bounded like the kernels' (one 1024 × 8192 fp32 tile,
32 MB, plus O(N) vectors and fp32 gradient accumulators), and it computes the same quantities
from the same formulas as `linear_logprob.py` (whose docstring has the math):

    forward:  online max / Σexp / Σz·exp over vocabulary chunks → (z_y, lse, E_p[z]) per row
    backward: dz = g·(1[v = y] − p) − g_H·p·(z − E_p[z]), then dh += dz·W/τ, dW += dzᵀ·h/τ
"""

from __future__ import annotations

import torch

_TORCH_ROWS = 1024    # rows per chunk of the torch backend
_TORCH_COLS = 8192    # vocabulary columns per chunk: a [1024, 8192] fp32 tile is 32 MB


def torch_forward(h, w, y, inv_temp, with_entropy):
    """The same online recurrence as the Triton forward, over [rows, cols] chunks in fp32."""
    N, V = h.shape[0], w.shape[0]
    zy = torch.zeros(N, device=h.device, dtype=torch.float32)
    lse = torch.empty_like(zy)
    mean_z = torch.empty_like(zy) if with_entropy else None
    for r0 in range(0, N, _TORCH_ROWS):
        hr = h[r0 : r0 + _TORCH_ROWS].float()
        yr = y[r0 : r0 + _TORCH_ROWS]
        m = torch.full((hr.shape[0],), float("-inf"), device=h.device)
        s = torch.zeros_like(m)
        t = torch.zeros_like(m)
        for v0 in range(0, V, _TORCH_COLS):
            z = (hr @ w[v0 : v0 + _TORCH_COLS].float().T) * inv_temp     # (rows, cols) fp32
            m_new = torch.maximum(m, z.max(dim=1).values)
            e = torch.exp(z - m_new[:, None])
            alpha = torch.exp(m - m_new)
            s = s * alpha + e.sum(dim=1)
            if with_entropy:
                t = t * alpha + (z * e).sum(dim=1)
            inside = (yr >= v0) & (yr < v0 + z.shape[1])
            picked = z.gather(1, (yr - v0).clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
            zy[r0 : r0 + _TORCH_ROWS] += torch.where(inside, picked, 0.0)
            m = m_new
        lse[r0 : r0 + _TORCH_ROWS] = m + torch.log(s)
        if with_entropy:
            mean_z[r0 : r0 + _TORCH_ROWS] = t / s
    return zy, lse, mean_z


def torch_backward(h, w, y, lse, g, gh, ez, inv_temp, need_dh, need_dw):
    """Recompute each [rows, cols] logit chunk, form dz, accumulate dh and dW in fp32."""
    N, V = h.shape[0], w.shape[0]
    dh = torch.zeros(h.shape, device=h.device, dtype=torch.float32) if need_dh else None
    dw = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if need_dw else None
    for r0 in range(0, N, _TORCH_ROWS):
        rs = slice(r0, r0 + _TORCH_ROWS)
        hr, yr = h[rs].float(), y[rs]
        for v0 in range(0, V, _TORCH_COLS):
            wc = w[v0 : v0 + _TORCH_COLS].float()
            z = (hr @ wc.T) * inv_temp
            p = torch.exp(z - lse[rs, None])
            coef = g[rs, None] if gh is None else g[rs, None] + gh[rs, None] * (z - ez[rs, None])
            dz = -p * coef
            inside = (yr >= v0) & (yr < v0 + z.shape[1])
            col = (yr - v0).clamp(0, z.shape[1] - 1)[:, None]
            dz.scatter_add_(1, col, torch.where(inside, g[rs], 0.0)[:, None])
            dz *= inv_temp
            if need_dh:
                dh[rs] += dz @ wc
            if need_dw:
                dw[v0 : v0 + _TORCH_COLS] += dz.T @ hr
    return dh, dw
