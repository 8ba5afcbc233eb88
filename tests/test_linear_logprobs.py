"""linear_logprobs: every backend against the float64 reference, at awkward shapes.

On a machine without CUDA the "triton" backend runs the real kernels through the Triton
interpreter (tests/conftest.py); with CUDA it runs them compiled, on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import DEVICE, TOLERANCES, assert_rel_close, rel_err, requires_cuda

from prolix.kernels import linear_logprob as llp
from prolix.kernels import linear_logprobs
from prolix.kernels.reference import linear_logprobs_ref

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (leading shape, H, V, temperature). Why each:
SHAPES = {
    "one_row": ((1,), 40, 333, 1.0),          # N = 1: a tile that is almost all padding
    "odd_vocab": ((37,), 72, 1000, 0.7),     # V not a power of two, H not a multiple of 16, τ ≠ 1
    "leading_dims": ((3, 5), 24, 130, 1.3),  # [B, T] targets; V just past one 128-wide tile
}


def make_inputs(lead, H, V, dtype, *, scale=1.0, ignore_frac=0.2, seed=0):
    """Fresh random hidden/weight/targets with a fraction of ignored rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*lead, H, generator=g) * scale / H**0.25).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.25).to(dtype)
    targets = torch.randint(0, V, lead, generator=g)
    targets[torch.rand(lead, generator=g) < ignore_frac] = -100
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE)


def run_with_grads(fn, hidden, weight, targets, upstream, **kw):
    """Call fn with fresh leaf copies, backprop Σ a·logp + Σ b·entropy; return outputs and grads."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, ent = fn(h, w, targets, **kw)
    a, b = upstream
    (logp * a.to(logp.dtype)).sum().add((ent * b.to(ent.dtype)).sum()).backward()
    return logp, ent, h.grad, w.grad


def kernel(backend):
    return lambda h, w, y, **kw: linear_logprobs(h, w, y, return_entropy=True, backend=backend, **kw)


def reference(h, w, y, **kw):
    return linear_logprobs_ref(h.double(), w.double(), y, **kw)


def check_against_reference(backend, dtype, lead, H, V, temperature, *, scale=1.0, seed=0,
                            entropy_atol=None):
    """Values and gradients vs float64; `entropy_atol` switches the entropy to an absolute check
    (for near-one-hot rows, where H ≈ 0 is a difference of two large fp32 numbers)."""
    hidden, weight, targets = make_inputs(lead, H, V, dtype, scale=scale, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    upstream = (torch.randn(lead, generator=g).to(DEVICE), torch.randn(lead, generator=g).to(DEVICE))
    out = run_with_grads(kernel(backend), hidden, weight, targets, upstream, temperature=temperature)
    ref = run_with_grads(reference, hidden, weight, targets, upstream, temperature=temperature)
    tol = TOLERANCES[dtype]
    for name, o, r, kind in zip(("logp", "entropy", "d_hidden", "d_weight"), out, ref,
                                ("value", "value", "grad", "grad")):
        assert o.dtype == (torch.float32 if kind == "value" else dtype), f"{name} dtype {o.dtype}"
        if name == "entropy" and entropy_atol is not None:
            worst = (o.double() - r).abs().max().item()
            assert worst <= entropy_atol, f"entropy: max abs error {worst:.2e} > {entropy_atol:.1e}"
            assert (o >= 0).all(), "entropy must never be negative"
            continue
        assert_rel_close(o, r, tol[kind], f"{backend}/{dtype}/{name}")
    return out, ref


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_entropy_and_grads_match_float64_reference(backend, dtype, shape):
    lead, H, V, temperature = SHAPES[shape]
    check_against_reference(backend, dtype, lead, H, V, temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_of_magnitude_1e3_do_not_overflow(backend, dtype):
    # |z| ~ 1e3: exp(z) overflows fp32 unless the running max is subtracted first. The rows are
    # then nearly one-hot: H ≈ 0 is lse − E[z] with both ~1e3, so it is checked to fp32 absolute
    # resolution at that magnitude (1e3 · 2^-24 ≈ 6e-5), not relatively.
    hidden, weight, targets = make_inputs((9,), 32, 200, dtype, scale=400.0)
    logits = hidden.double() @ weight.double().T
    assert logits.abs().max() > 1e3, "the test no longer produces large logits"
    check_against_reference(backend, dtype, (9,), 32, 200, 1.0, scale=400.0, entropy_atol=2e-4)


@pytest.mark.parametrize("sub_tiles", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_small_tiles_cover_every_tile_edge(monkeypatch, dtype, sub_tiles):
    # Tiles much smaller than the shape: several row tiles (the last partial), a K loop whose
    # last step is partial (H = 40 over 16), vocabulary split across programs, and a backward
    # that walks the vocabulary in several chunks, the last one partial; the forward's raster
    # groups 3 row tiles (70 rows / 16 = 5 tiles: the second group is partial) and reduces each
    # 64-wide tile as 2 or 4 column slices, the last tile (333 = 5·64 + 13) leaving slices with
    # no valid column.
    cfg = llp.KernelConfig(16, 64, 16, 4, 1, group_n=3, sub_tiles=sub_tiles)
    monkeypatch.setattr(llp, "forward_config", lambda dt, sm=90, variant=None: cfg)
    monkeypatch.setattr(llp, "backward_config", lambda dt, sm=90, variant=None: llp.KernelConfig(16, 32, 16, 4, 1))
    monkeypatch.setattr(llp, "BWD_BUFFER_BYTES", 70 * 100 * 4)  # 100 fp32 columns of 70 rows
    widths = []
    real_chunk_width = llp.chunk_width
    monkeypatch.setattr(llp, "chunk_width", lambda *a: widths.append(real_chunk_width(*a)) or widths[-1])
    check_against_reference("triton", dtype, (70,), 40, 333, 0.9)
    assert widths and widths[0] < 333, "the backward did not split the vocabulary into chunks"


@pytest.mark.parametrize("variant", llp.CONFIG_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_production_grid_with_ragged_tiles_matches_reference(monkeypatch, dtype, variant):
    # The production tiles (v2: 128×256, K step 64) at N = 200 (two row tiles, the second
    # partial: N not a multiple of 128) and V = 1500: the interpreter's 4-program wave splits the
    # vocabulary into slices of 768 = 3 tiles, the last slice ending in a ragged 220-column tile;
    # H = 72 leaves a partial K step. Both configuration sets (PROLIX_LLP_CONFIG) must be exact.
    monkeypatch.setenv(llp.CONFIG_ENV, variant)
    cfg = llp.forward_config(dtype, 90)
    splits, per_split = llp.forward_splits(200, 1500, cfg, 4)
    assert 1500 % cfg.block_v and 200 % cfg.block_n, "the shape no longer leaves ragged tiles"
    if variant == "v2" and dtype != torch.float32:
        assert (cfg.block_n, cfg.block_v) == (128, 256) and (splits, per_split) == (2, 3 * cfg.block_v)
    check_against_reference("triton", dtype, (200,), 72, 1500, 0.8)


def test_v2_grid_at_the_reference_shape_is_one_wave_of_grouped_slices():
    # qwen-1.5b head, N = 16384, an H100/H200's 132 SMs: 8 row tiles × 17 slices per wave, each
    # slice 35 tiles of 256 (the numbers the module docstring's cost section counts with).
    cfg = llp.forward_config(torch.bfloat16, 90, "v2")
    splits, per_split = llp.forward_splits(16384, 151936, cfg, 132, "v2")
    assert (cfg.block_n, cfg.block_v, cfg.group_n, cfg.sub_tiles) == (128, 256, 8, 4)
    assert (splits, per_split) == (17, 35 * 256)
    # N = 1: one row tile, so the whole wave goes to vocabulary slices (whole 256-wide tiles
    # each: 119 slices of 5 tiles, rounding up from 132).
    assert 100 < llp.forward_splits(1, 151936, cfg, 132, "v2")[0] <= 132
    # v1 splits only to fill two waves: 256 row tiles of 64 < 264 programs, so 2 slices.
    v1 = llp.forward_config(torch.bfloat16, 90, "v1")
    assert llp.forward_splits(16384, 151936, v1, 264, "v1")[0] == 2


def test_backward_buffer_is_flat_in_n_under_v2():
    # v2's dz buffer is a fixed budget (extra memory flat from 16k to 64k tokens); v1's grew with N.
    for N in (16384, 65536):
        width = llp.chunk_width(N, 151936, 2, 256, "v2")
        assert N * width * 2 <= llp.BWD_BUFFER_BYTES
        assert N * (width + 256) * 2 > llp.BWD_BUFFER_BYTES
    v1 = {N: N * llp.chunk_width(N, 151936, 2, 256, "v1") * 2 for N in (16384, 65536)}
    assert v1[65536] > 3.9 * v1[16384]


def test_unknown_config_variant_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(llp.CONFIG_ENV, "fast")
    hidden, weight, targets = make_inputs((4,), 16, 50, torch.float32)
    with pytest.raises(ValueError, match=f"{llp.CONFIG_ENV} must be one of"):
        linear_logprobs(hidden, weight, targets, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_give_zero_and_receive_no_gradient(backend):
    hidden, weight, targets = make_inputs((20,), 24, 150, torch.float32, ignore_frac=0.5)
    ignored = targets == -100
    assert ignored.any() and (~ignored).any()
    h = hidden.clone().requires_grad_()
    logp, ent = linear_logprobs(h, weight, targets, return_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (h.grad[ignored] == 0).all()
    assert (h.grad[~ignored].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_logprobs_independent_of_neighbours(backend):
    # A row's log-prob must not depend on which other rows share its tile or launch.
    hidden, weight, targets = make_inputs((37,), 72, 1000, torch.float32)
    full = linear_logprobs(hidden, weight, targets, backend=backend)
    part = linear_logprobs(hidden[11:16], weight, targets[11:16], backend=backend)
    assert_rel_close(part, full[11:16], 1e-6, "rows 11..15 alone vs packed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_costs_no_weight_gradient(monkeypatch, backend):
    seen = {}
    name = f"{backend}_backward"
    real = getattr(llp, name)

    def spy(*args):
        seen["need_dh"], seen["need_dw"] = args[-2], args[-1]
        return real(*args)

    monkeypatch.setattr(llp, name, spy)
    hidden, weight, targets = make_inputs((10,), 24, 150, torch.float32)
    h = hidden.clone().requires_grad_()
    linear_logprobs(h, weight, targets, backend=backend).sum().backward()
    assert seen == {"need_dh": True, "need_dw": False}
    ref_h = hidden.double().requires_grad_()
    linear_logprobs_ref(ref_h, weight.double(), targets)[0].sum().backward()
    assert_rel_close(h.grad, ref_h.grad, TOLERANCES[torch.float32]["grad"], "d_hidden")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_is_at_most_twice_as_wrong_as_torch_eager(backend):
    # The flash-attention criterion: in the same dtype, the kernel may be at most 2x as far
    # from the float64 truth as plain torch (bf16 matmul, fp32 log_softmax) is.
    hidden, weight, targets = make_inputs((64,), 64, 777, torch.bfloat16)
    upstream = (torch.randn(64).to(DEVICE), torch.zeros(64).to(DEVICE))
    out = run_with_grads(kernel(backend), hidden, weight, targets, upstream)
    eager = run_with_grads(lambda h, w, y: linear_logprobs_ref(h, w, y, upcast=False),
                           hidden, weight, targets, upstream)
    ref = run_with_grads(reference, hidden, weight, targets, upstream)
    for i, name in ((0, "logp"), (2, "d_hidden"), (3, "d_weight")):
        ours, theirs = rel_err(out[i], ref[i]), rel_err(eager[i], ref[i])
        assert ours <= 2 * theirs + 1e-7, f"{name}: kernel error {ours:.2e} vs eager {theirs:.2e}"


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), h=st.integers(1, 48), v=st.integers(1, 300),
       temperature=st.floats(0.25, 4.0), seed=st.integers(0, 2**16))
def test_torch_backend_matches_reference_on_random_shapes(n, h, v, temperature, seed):
    check_against_reference("torch", torch.float32, (n,), h, v, temperature, seed=seed)


def test_empty_batch_returns_empty_outputs():
    hidden, weight, _ = make_inputs((3,), 16, 50, torch.float32)
    logp, ent = linear_logprobs(hidden[:0], weight, torch.zeros(0, dtype=torch.long, device=DEVICE),
                                return_entropy=True)
    assert logp.shape == (0,) and ent.shape == (0,) and logp.dtype == torch.float32


def _bad_inputs():
    h = torch.randn(4, 8)
    w = torch.randn(10, 8)
    y = torch.randint(0, 10, (4,))
    return [
        ("hidden size", dict(hidden=torch.randn(4, 9)), ValueError),
        ("targets shape", dict(targets=torch.randint(0, 10, (5,))), ValueError),
        ("integer tensor", dict(targets=y.float()), TypeError),
        (r"targets must lie in \[0, 10\)", dict(targets=torch.tensor([0, 10, 1, 2])), ValueError),
        (r"targets must lie in \[0, 10\)", dict(targets=torch.tensor([0, -1, 1, 2])), ValueError),
        ("weight dtype", dict(weight=w.double()), TypeError),
        ("hidden must be float32", dict(hidden=h.double(), weight=w.double()), TypeError),
        ("empty vocabulary", dict(weight=torch.randn(0, 8)), ValueError),
        ("temperature", dict(temperature=0.0), ValueError),
        ("temperature", dict(temperature=float("nan")), ValueError),
        ("backend must be one of", dict(backend="cuda"), ValueError),
        ("hidden must be a torch.Tensor", dict(hidden=[[1.0]]), TypeError),
    ], (h, w, y)


@pytest.mark.parametrize("case", range(len(_bad_inputs()[0])))
def test_bad_input_raises_a_named_error_before_any_launch(monkeypatch, case):
    (match, override, exc), (h, w, y) = _bad_inputs()[0][case], _bad_inputs()[1]

    def no_launch(*a, **k):
        raise AssertionError("a kernel ran before the input was validated")

    for fn in ("torch_forward", "triton_forward"):
        monkeypatch.setattr(llp, fn, no_launch)
    args = dict(hidden=h, weight=w, targets=y)
    kw = {k: v for k, v in override.items() if k not in args}
    args.update({k: v for k, v in override.items() if k in args})
    with pytest.raises(exc, match=match):
        linear_logprobs(args["hidden"], args["weight"], args["targets"], **kw)


@requires_cuda
def test_triton_on_gpu_at_a_real_vocabulary():
    # Qwen2.5 vocabulary, a few hundred rows: production tiles, several vocabulary splits.
    check_against_reference("triton", torch.bfloat16, (300,), 256, 151936, 1.0)
