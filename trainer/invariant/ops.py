"""Batch-invariant operators: a row's result has the same bits whatever else is computed with it.

Why the stock CPU operators are not: a GEMM picks its kernel from the shape, so row n of
`linear(x[:M], W)` changes bits with M (a one-row call takes a GEMV path); an element-wise
transcendental (SiLU, exp, rsqrt, cos, sin) runs vectorised over whole vectors and falls back to
the scalar libm routine on the tail, so an element's bits depend on where the tensor ends; a
reduction with a single output is split across threads.

`batch_invariant_ops()` is a context (a `TorchFunctionMode`) under which the operators a Hugging
Face decoder reaches are replaced at the Python API:

    operator                                how
    linear, matmul (2-D right operand),     rows in blocks of ROW_BLOCK (the last one padded with
    mm, softmax / log_softmax, rms_norm,    zeros): every call has the shape [ROW_BLOCK, K], so
    layer_norm, mean / sum / amax /         kernel choice and reduction order depend on K and
    logsumexp over the last dim             the weights alone
    exp, sigmoid, silu, gelu, tanh, rsqrt,  the flattened tensor in chunks of FLAT_CHUNK elements
    cos, sin, log                           (a multiple of every vector width, below the
                                            threading grain): every element on the vector path
    matmul / bmm with inner dimension 1     unchanged (one product per output: exact)
    scaled_dot_product_attention, bmm,      an error naming the operator: nothing here makes
    addmm, baddbmm, einsum, in-place        them invariant, so a model that reaches them is not
    transcendentals, a floating reduction   covered (attention is `attention.py`'s job)
    over another dimension

Additions, products and divisions are correctly rounded on every path and pass through, as do
indexing, concatenation and embedding lookups. The promise is about forward bits: a linear
layer's backward is the stock one (two whole GEMMs, `_BlockedLinear`), not the blocks' own. The
cost is the padding of the last block and one call per block.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["ROW_BLOCK", "BMM_BLOCK", "FLAT_CHUNK", "batch_invariant_ops", "row_blocks", "blocked_linear", "flat_chunks",
           "blocked_bmm", "stock_ops"]

ROW_BLOCK = 128
"""Rows per call of a row operator (matmul, normalisation, last-dim reduction). On the demo's
step (one CPU thread) 128 beat 64 and 256: fewer, larger GEMMs in the packed forward against
more padding in a decode step of fewer rows."""
BMM_BLOCK = 256
"""Matrices per call of a batched matmul (`blocked_bmm`, the attention's)."""
FLAT_CHUNK = 16384
"""Elements per call of an element-wise transcendental: a multiple of 2 × the widest vector
(AVX-512: 32 floats) and under ATen's parallel grain (32768), so no tail and no thread split."""

T = torch.Tensor
_ELEMENTWISE = {torch.exp, T.exp, torch.sigmoid, T.sigmoid, F.silu, F.gelu, torch.tanh, T.tanh, F.tanh,
                torch.rsqrt, T.rsqrt, torch.cos, T.cos, torch.sin, T.sin, torch.log, T.log, torch.special.expit}
_OUT_FORMS = {f: out for out in (torch.exp, torch.sigmoid, torch.tanh, torch.rsqrt, torch.cos, torch.sin, torch.log)
              for f in (out, getattr(T, out.__name__))}
_ROW_OPS = {F.linear, torch.mm, T.mm, F.rms_norm, F.layer_norm}
_LAST_DIM_OPS = {torch.softmax, T.softmax, F.softmax, torch.log_softmax, T.log_softmax, F.log_softmax,
                 torch.mean, T.mean, torch.sum, T.sum, torch.amax, T.amax, torch.logsumexp, T.logsumexp}
_MATMULS = {torch.matmul, T.matmul, T.__matmul__, torch.bmm, T.bmm}
_UNCOVERED = {F.scaled_dot_product_attention, torch.baddbmm, T.baddbmm, torch.addmm, T.addmm, torch.einsum,
              T.exp_, T.sigmoid_, T.tanh_, T.rsqrt_}

_HANDLED = _ELEMENTWISE | _ROW_OPS | _LAST_DIM_OPS | _MATMULS | _UNCOVERED
_STOCK = contextvars.ContextVar("prolix_stock_ops", default=False)


def _blocks(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    """rows [n, ...] as blocks of exactly `size` rows: views of the whole ones, and a zero-padded
    copy of the last partial one (no copy of the rest)."""
    n = rows.shape[0]
    whole = n - n % size
    blocks = list(rows[:whole].split(size)) if whole else []
    if whole < n or n == 0:
        blocks.append(torch.cat([rows[whole:], rows.new_zeros(size - (n - whole), *rows.shape[1:])]))
    return blocks


def row_blocks(fn, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """fn applied to x's rows (all dims but the last) in fixed [ROW_BLOCK, C] blocks; fn must
    map each row on its own and keep the leading dimension (x: [..., C] → [..., C'])."""
    lead, c = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, c)
    m = rows.shape[0]
    outs = [fn(block, *args, **kwargs) for block in _blocks(rows, ROW_BLOCK)]
    out = (outs[0] if len(outs) == 1 else torch.cat(outs))[:m]
    return out.reshape(*lead, *out.shape[1:])


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear on fixed [ROW_BLOCK, K] row blocks, each GEMM writing its slice of the output."""
    if torch.is_autocast_enabled(x.device.type) or x.dtype != weight.dtype:
        return row_blocks(F.linear, x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    m, wt = rows.shape[0], weight.t()
    blocks = _blocks(rows, ROW_BLOCK)
    out = x.new_empty(len(blocks) * ROW_BLOCK, weight.shape[0])
    for i, block in enumerate(blocks):
        dest = out[i * ROW_BLOCK:(i + 1) * ROW_BLOCK]
        torch.mm(block, wt, out=dest) if bias is None else torch.addmm(bias, block, wt, out=dest)
    return out[:m].reshape(*x.shape[:-1], weight.shape[0])


def flat_chunks(fn, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """An element-wise fn over x in contiguous chunks of exactly FLAT_CHUNK elements (written in
    place into one output where fn has an `out=` form: the same kernel on the same chunk)."""
    flat = x.reshape(-1)
    blocks = _blocks(flat, FLAT_CHUNK)
    into = _OUT_FORMS.get(fn) if len(blocks) > 1 and not args and not kwargs else None
    if into is not None and flat.is_floating_point() and not torch.is_autocast_enabled(flat.device.type):
        out = flat.new_empty(len(blocks) * FLAT_CHUNK)
        for i, chunk in enumerate(blocks):
            into(chunk, out=out[i * FLAT_CHUNK:(i + 1) * FLAT_CHUNK])
        return out[:flat.numel()].view(x.shape)
    outs = [fn(chunk, *args, **kwargs) for chunk in blocks]
    return (outs[0] if len(outs) == 1 else torch.cat(outs))[:flat.numel()].view(x.shape)


class _BlockedLinear(torch.autograd.Function):
    """F.linear with the row-blocked forward and the stock backward (whole GEMMs)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        with stock_ops():
            return blocked_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        with stock_ops():
            dx = grad @ weight if ctx.needs_input_grad[0] else None
            dw = g2.T @ x2 if ctx.needs_input_grad[1] else None
            db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def _linear(func, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if func is F.linear and grads and not torch.is_autocast_enabled(x.device.type):
        return _BlockedLinear.apply(x, weight, bias)
    if func is F.linear:
        return blocked_linear(x, weight, bias)
    return row_blocks(func, *args, **kwargs)


def blocked_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.bmm of contiguous a: [n, r, k] and b: [n, k, c] in calls of exactly BMM_BLOCK
    matrices (the last padded with zeros): one shape per call, so each product's bits do not
    depend on n (a whole-batch bmm changes its threading with n). b may also be the transpose of
    a contiguous [n, c, k]: every call, the padded one included, then gets b in that layout."""
    n = a.shape[0]
    if not b.is_contiguous() and b.transpose(1, 2).is_contiguous():
        b_blocks = [y.transpose(1, 2) for y in _blocks(b.transpose(1, 2), BMM_BLOCK)]
    else:
        b_blocks = _blocks(b.contiguous(), BMM_BLOCK)
    pairs = list(zip(_blocks(a.contiguous(), BMM_BLOCK), b_blocks))
    out = a.new_empty(len(pairs) * BMM_BLOCK, a.shape[1], b.shape[2])
    for i, (x, y) in enumerate(pairs):
        torch.bmm(x, y, out=out[i * BMM_BLOCK:(i + 1) * BMM_BLOCK])
    return out[:n]


def _last_dim(x: torch.Tensor, dim) -> bool:
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return len(dims) == 1 and dims[0] is not None and dims[0] % max(x.dim(), 1) == x.dim() - 1


def _reduction(func, args, kwargs):
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if not x.is_floating_point():
        return func(*args, **kwargs)
    if dim is None or not _last_dim(x, dim):
        raise NotImplementedError(f"algorithm.batch_invariant: {getattr(func, '__name__', func)} over dim={dim} "
                                  "of a floating tensor has no batch-invariant form here")
    rest = {k: v for k, v in kwargs.items() if k != "dim"}
    return row_blocks(lambda b: func(b, -1, *args[2:], **rest), x)


def _matmul(func, args, kwargs):
    a, b = args[0], args[1]
    if a.shape[-1] == 1:                       # one product per output element: exact everywhere
        return func(*args, **kwargs)
    if func in (torch.matmul, T.matmul, T.__matmul__) and b.dim() == 2 and a.dim() >= 2:
        return row_blocks(torch.matmul, a, b)
    raise NotImplementedError(f"algorithm.batch_invariant: {getattr(func, '__name__', func)} of "
                              f"{tuple(a.shape)} x {tuple(b.shape)} has no batch-invariant form here")


class _BatchInvariantMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _HANDLED or _STOCK.get() or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        if func in _ELEMENTWISE:
            return flat_chunks(func, *args, **kwargs)
        if func in _ROW_OPS:
            return _linear(func, args, kwargs) if func is F.linear else row_blocks(func, *args, **kwargs)
        if func in _LAST_DIM_OPS:
            return _reduction(func, args, kwargs)
        if func in _MATMULS:
            return _matmul(func, args, kwargs)
        if func in _UNCOVERED:
            raise NotImplementedError(f"algorithm.batch_invariant: {getattr(func, '__name__', func)} is not "
                                      "covered by the batch-invariant operator set")
        return func(*args, **kwargs)


@contextlib.contextmanager
def batch_invariant_ops():
    """Run the enclosed forward with the batch-invariant operator set (module docstring)."""
    with _BatchInvariantMode():
        yield


@contextlib.contextmanager
def stock_ops():
    """Inside `batch_invariant_ops`, let the enclosed code call the stock operators (code that
    makes its own invariance, such as the fixed-block attention)."""
    token = _STOCK.set(True)
    try:
        yield
    finally:
        _STOCK.reset(token)
