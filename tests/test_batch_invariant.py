"""The batch-invariant mode: a row's log-prob and entropy have the same bits wherever it is computed.

Every claim is a bit comparison (`torch.equal` on the int32 view), not a tolerance: a row computed
alone, in batches of N ∈ {1, T − 1, T, T + 1, 3T + 5} rows (T the row block of the backend: the
torch backend's INVARIANT_ROWS, the Triton tile's rows), shuffled, behind other rows and beside
ignored rows, and in chunks of any size, gives the bits it has in one big batch; the two
algorithms of the fused loss give `linear_logprobs`' bits, so a ratio against them is exactly 1;
gradients are the same bits run to run. The Triton kernels run under TRITON_INTERPRET=1 on CPU.
One thread on both sides of every comparison (conftest). Shapes are tiny: V = 333 is no multiple
of any tile, H = 40 no multiple of 16.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, TOLERANCES, assert_rel_close

from prolix.kernels import GRPOLossConfig, batch_invariant, fused_linear_grpo_loss, linear_logprobs
from prolix.kernels import three_gemm as tg
from prolix.kernels._common import INVARIANT_ROWS
from prolix.kernels.reference import linear_logprobs_ref

H, V, IGNORE = 40, 333, -100


def row_block(backend: str, dtype: torch.dtype) -> int:
    """T: the rows a fixed-shape block holds (torch) or a GEMM tile spans (Triton)."""
    if backend == "torch":
        return INVARIANT_ROWS
    return tg.gemm1_config(dtype, 90, True, batch_invariant=True).block_n


def pool(n: int, dtype: torch.dtype, seed: int = 0, overflow_rows=()):
    """n rows of hidden states and targets, and a weight. `overflow_rows` put their target ~100
    nats below the row maximum (S would pass 2^63: the redo path)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    targets = torch.randint(1, V, (n,), generator=g)
    hidden[:, 0], weight[:, 0] = 0.0, 0.0
    weight[0, 0] = 10.0
    for r in overflow_rows:
        hidden[r, 0] = 10.0
    return hidden.to(dtype).to(DEVICE), weight.to(dtype).to(DEVICE), targets.to(DEVICE)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def logp_entropy(hidden, weight, targets, backend, invariant):
    return linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend,
                           batch_invariant=invariant)


def layouts(n_pool: int, T: int, seed: int = 1):
    """(name, pool indices, ignored flags) of batches drawn from a pool of rows: N rows in a random
    order behind 0–6 ignored rows (a pack offset), with an ignored row after every third row;
    N = 1 is one row alone, four times (a one-row matmul is a matrix-vector product: other code)."""
    g = torch.Generator().manual_seed(seed)
    for n in (1, 1, 1, 1, T - 1, T, T + 1, 3 * T + 5):
        rows = torch.randperm(n_pool, generator=g)[:n].tolist()
        filler = torch.randint(0, n_pool, (n_pool,), generator=g).tolist()
        lead = int(torch.randint(0, 7, (), generator=g)) if n > 1 else 0
        order, ignored = filler[:lead], [True] * lead
        for k, r in enumerate(rows):
            order.append(r)
            ignored.append(False)
            if k % 3 == 2:
                order.append(filler[lead + k // 3])
                ignored.append(True)
        yield f"N={n}", torch.tensor(order, device=DEVICE), torch.tensor(ignored, device=DEVICE)


def invariance_failures(backend: str, dtype: torch.dtype, invariant: bool) -> list[str]:
    """Every (batch, row) whose logp or entropy bits differ from those of the same row in one
    batch of the whole pool; empty when the mode holds."""
    T = row_block(backend, dtype)
    n_pool = 3 * T + 9
    hidden, weight, targets = pool(n_pool, dtype, overflow_rows=(2, n_pool - 1))
    ref_lp, ref_ent = logp_entropy(hidden, weight, targets, backend, invariant)
    failures = []
    for name, order, ignored in layouts(n_pool, T):
        y_b = torch.where(ignored, IGNORE, targets[order])
        lp, ent = logp_entropy(hidden[order], weight, y_b, backend, invariant)
        for what, out, ref in (("logp", lp, ref_lp), ("entropy", ent, ref_ent)):
            diff = (bits(out) != bits(ref[order])) & ~ignored
            failures += [f"{name} {what} row {int(order[i])}" for i in torch.nonzero(diff).flatten().tolist()]
        if not (lp[ignored] == 0).all():
            failures.append(f"{name}: an ignored row has a nonzero logp")
    return failures


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                           ("triton", torch.float32)], ids=str)
def test_a_rows_logprob_and_entropy_have_the_same_bits_in_every_batch(backend, dtype):
    failures = invariance_failures(backend, dtype, invariant=True)
    assert not failures, f"{len(failures)} rows changed bits: {failures[:10]}"


def test_the_same_comparison_finds_changed_bits_with_the_mode_off():
    # The default Triton forward splits the vocabulary by the number of rows (forward_splits), so
    # its merge order, and some rows' bits, follow N: the comparison above can fail. (The torch
    # backend's default mode differs only now and then at these shapes, so it makes no claim.)
    assert invariance_failures("triton", torch.float32, invariant=False)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_loss_rows_have_linear_logprobs_bits_at_every_chunk_size(backend):
    # the three-GEMM pass over the rows with nonzero loss weight, in chunks of 1 (the first 9
    # rows: one chunk per row), 7, T and 1000 rows, against linear_logprobs on the whole batch:
    # bit for bit, with and without entropy
    dtype = torch.bfloat16 if backend == "torch" else torch.float32
    T = row_block(backend, dtype)
    hidden, weight, targets = pool(T + 3, dtype, seed=3, overflow_rows=(5,))
    lp, ent = logp_entropy(hidden, weight, targets, backend, True)
    lp_only = linear_logprobs(hidden, weight, targets, backend=backend, batch_invariant=True)
    assert torch.equal(bits(lp_only), bits(lp)), "logp changes with return_entropy"
    rows = torch.nonzero(torch.arange(T + 3) % 4 != 1).squeeze(1).to(DEVICE)   # dropped rows in between
    for chunk in (1, 7, T, 1000):
        part = rows[:9] if chunk == 1 else rows
        for with_entropy in (True, False):
            got_lp, got_ent, _, _ = tg.three_gemm_logprob_grads(
                hidden, weight, targets, part, None, inv_temp=1.0, with_entropy=with_entropy, need_dh=False,
                need_dw=False, backend=backend, chunk_rows=chunk, batch_invariant=True)
            assert torch.equal(bits(got_lp[part]), bits(lp[part])), f"logp, chunk_rows={chunk}"
            if with_entropy:
                assert torch.equal(bits(got_ent[part]), bits(ent[part])), f"entropy, chunk_rows={chunk}"


def loss_and_grads(b, backend, algorithm, chunk_rows=None, invariant=True):
    hidden = b["hidden"].clone().requires_grad_()
    weight = b["weight"].clone().requires_grad_()
    config = GRPOLossConfig(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    loss, metrics = fused_linear_grpo_loss(
        hidden, weight, b["targets"], b["advantages"], b["mask"], old_logp=b["old_logp"], ref_logp=b["ref_logp"],
        config=config, ignore_index=IGNORE, backend=backend, algorithm=algorithm, chunk_rows=chunk_rows,
        batch_invariant=invariant)
    return (loss, *torch.autograd.grad(loss, (hidden, weight))), metrics


def loss_batch(backend, n=37):
    hidden, weight, targets = pool(n, torch.float32, seed=5)
    targets[n // 2] = IGNORE
    mask = (targets != IGNORE) & (torch.arange(n, device=DEVICE) % 5 != 0)
    old = linear_logprobs(hidden, weight, targets, backend=backend, batch_invariant=True)
    g = torch.Generator().manual_seed(6)
    return dict(hidden=hidden, weight=weight, targets=targets, mask=mask, old_logp=old,
                ref_logp=old + 0.1 * torch.randn(n, generator=g).to(DEVICE),
                advantages=torch.randn(n, generator=g).to(DEVICE))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("algorithm", ["three_gemm", "four_gemm"])
def test_first_update_ratio_is_exactly_one_and_gradients_repeat_bit_for_bit(backend, algorithm):
    # old_logp from linear_logprobs in the same mode: every ratio is exp(0) = 1 exactly
    b = loss_batch(backend)
    chunk = 16 if algorithm == "three_gemm" else None
    first, metrics = loss_and_grads(b, backend, algorithm, chunk)
    assert metrics["ratio_max"].item() == 1.0 and metrics["ratio_mean"].item() == 1.0
    second, _ = loss_and_grads(b, backend, algorithm, chunk)
    for name, x, y in zip(("loss", "dh", "dW"), first, second):
        assert torch.equal(bits(x), bits(y)), f"{name} differs between two identical runs"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_invariant_mode_is_as_accurate_as_the_default(backend):
    # against the float64 reference, with the default mode's tolerance (kernel_testing)
    hidden, weight, targets = pool(29, torch.bfloat16, seed=7)
    targets[3] = IGNORE
    ref_lp, ref_ent = linear_logprobs_ref(hidden, weight, targets, ignore_index=IGNORE)
    lp, ent = logp_entropy(hidden, weight, targets, backend, True)
    tol = TOLERANCES[torch.bfloat16]["value"]
    assert_rel_close(lp, ref_lp, tol, "logp")
    assert_rel_close(ent, ref_ent, tol, "entropy")


def test_context_manager_switches_the_mode_for_every_call():
    hidden, weight, targets = pool(5, torch.float32, seed=8)
    on = linear_logprobs(hidden, weight, targets, backend="torch", batch_invariant=True)
    with batch_invariant():
        inside = linear_logprobs(hidden, weight, targets, backend="torch")
    assert torch.equal(bits(inside), bits(on))
    with pytest.raises(TypeError, match="batch_invariant"):
        linear_logprobs(hidden, weight, targets, batch_invariant=1)


def test_target_rows_by_gemm_add_what_index_add_adds():
    # the CUDA path of the invariant weight gradient, run on CPU: repeated targets summed by a
    # selection GEMM give index_add_'s sums (to fp32 rounding: another order), the same bits twice
    g = torch.Generator().manual_seed(9)
    y = torch.randint(0, 7, (50,), generator=g)
    g_t, h = torch.randn(50, generator=g), torch.randn(50, 12, generator=g)
    by_index, by_gemm, again = (torch.randn(7, 12, generator=torch.Generator().manual_seed(1)) for _ in range(3))
    tg.add_target_rows(by_index, y, g_t, h, by_gemm=False)
    tg.add_target_rows(by_gemm, y, g_t, h, by_gemm=True)
    tg.add_target_rows(again, y, g_t, h, by_gemm=True)
    assert torch.allclose(by_gemm, by_index, rtol=1e-5, atol=1e-5)
    assert torch.equal(bits(by_gemm), bits(again))
