"""Parity with Liger-Kernel's `LigerFusedLinearGRPOLoss` on the same batch, padded vs packed.

Liger takes a padded batch [B, T, H] with an attention mask and one advantage per sequence;
prolix takes the valid rows packed to [N, H] with per-token advantages and `cu_seqlens`. The
objectives map onto each other as follows (liger_kernel 0.8.x, chunked_loss/grpo_loss.py):

    Liger                                  prolix
    loss_type="dapo"                       loss_agg="token-mean"; Liger divides by the mask sum of
                                           the whole batch (`_compute_dapo_normalizer`), our default
    loss_type="grpo"                       loss_agg="seq-mean-token-mean", normalizer=B: Liger
                                           divides by the batch size, empty rows included, where our
                                           default counts only sequences with response tokens
    loss_type="dr_grpo"                    loss_agg="seq-mean-token-sum-norm", max_len=
                                           max_completion_length, normalizer=B (same reason)
    beta, KL = exp(ref − logp) − (ref − logp) − 1        kl_coef, kl_estimator="k3"
    epsilon_low / epsilon_high, temperature              clip_low / clip_high, temperature
    delta (INTELLECT-2 upper clamp of the ratio)         dual_clip = delta: for A < 0 both give
                                           |A|·min(max(r, clip(r)), δ); for A > 0 the clamp never
                                           binds because clip(r) ≤ 1 + ε_high ≤ δ. Equal only when
                                           δ ≥ 1 + ε_high (true for the values either library uses)
    vllm_is_ratio (a given per-token weight)             tis_cap: we compute
                                           w = min(exp(old − rollout), C); Liger takes w as input,
                                           so the test passes it our w
    metrics (kl, clip ratio) / global mask sum           metrics["kl"], metrics["clip_frac"]

What is not compared: Liger has no entropy bonus and no k1/k2 estimator (ours are tested against
the float64 reference in test_grpo_loss.py). `compiled=False` keeps torch.compile out of the
tests; the math is the same.
"""

from __future__ import annotations

import pytest
import torch

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")

from kernel_testing import DEVICE, TOLERANCES, assert_rel_close  # noqa: E402

from prolix.kernels import GRPOLossConfig, fused_linear_grpo_loss  # noqa: E402
from prolix.kernels.reference import linear_logprobs_ref  # noqa: E402

# Both sides run in fp32 with fp32 accumulation; the project's fp32 kernel tolerances apply.
TOL = TOLERANCES[torch.float32]

# B = 5 rows of T = 11: one single-token row, one full row, one empty row (Liger's "grpo" and
# "dr_grpo" still count it in B), lengths that are not powers of two. V = 333, H = 40: awkward.
LENGTHS = (7, 1, 11, 0, 4)
T, V, H = 11, 333, 40


def padded_batch(seed=0, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    B = len(LENGTHS)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    targets = torch.randint(0, V, (B, T), generator=g)      # padded positions get valid ids too
    attn = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).float()
    adv = torch.randn(B, generator=g)
    adv[:2] = torch.tensor([1.3, -0.9])                     # both signs
    logp, _ = linear_logprobs_ref(hidden, weight, targets, temperature=temperature)
    # log ratios ±0.08 (unclipped) and ±0.6 (clipped, beyond ε = 0.2/0.28), and ±1.6 (beyond δ):
    # far from every clip edge, so the two libraries' rounding cannot flip a branch
    log_ratio = torch.tensor([-1.6, -0.6, -0.08, 0.08, 0.6, 1.6], dtype=torch.float64)[
        torch.randint(0, 6, (B, T), generator=g)]
    old = (logp - log_ratio).float()
    ref = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    rollout = (old.double() + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    b = dict(hidden=hidden, weight=weight, targets=targets, attn=attn, adv=adv, old=old, ref=ref, rollout=rollout)
    return {k: v.to(DEVICE) for k, v in b.items()}


def pack(b):
    """Padded [B, T, ...] → packed valid rows [N, ...], per-token advantages, cu_seqlens [B+1]."""
    valid = b["attn"].bool()
    lens = valid.sum(1)
    cu = torch.zeros(len(LENGTHS) + 1, dtype=torch.int32, device=DEVICE)
    cu[1:] = torch.cumsum(lens, 0)
    return dict(hidden=b["hidden"][valid], targets=b["targets"][valid], old=b["old"][valid], ref=b["ref"][valid],
                rollout=b["rollout"][valid], adv=torch.repeat_interleave(b["adv"], lens),
                mask=torch.ones(int(lens.sum()), dtype=torch.bool, device=DEVICE), cu_seqlens=cu), valid


def run_liger(b, *, beta, eps_low, eps_high, loss_type, temperature, delta=None, is_ratio=None):
    hidden = b["hidden"].clone().requires_grad_()
    weight = b["weight"].clone().requires_grad_()
    module = liger_grpo.LigerFusedLinearGRPOLoss(
        beta=beta, epsilon_low=eps_low, epsilon_high=eps_high, loss_type=loss_type, temperature=temperature,
        max_completion_length=T, compiled=False, use_ref_model=beta != 0, chunk_size=1, delta=delta)
    loss, metrics = module(hidden, weight, b["targets"], b["attn"], b["adv"], ref_per_token_logps=b["ref"],
                           old_per_token_logps=b["old"], vllm_is_ratio=is_ratio)
    grads = torch.autograd.grad(loss, (hidden, weight))
    return loss, grads, metrics


def run_prolix(p, weight, config, normalizer=None):
    hidden = p["hidden"].clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(
        hidden, weight, p["targets"], p["adv"], p["mask"], old_logp=p["old"], ref_logp=p["ref"],
        rollout_logp=p["rollout"], cu_seqlens=p["cu_seqlens"], config=config, normalizer=normalizer,
        backend="torch")
    grads = torch.autograd.grad(loss, (hidden, weight))
    return loss, grads, metrics


def assert_parity(ours, theirs, valid):
    loss, (d_hidden, d_weight), _ = ours
    loss_l, (d_hidden_l, d_weight_l), _ = theirs
    assert_rel_close(loss, loss_l, TOL["value"], "loss")
    assert_rel_close(d_hidden, d_hidden_l[valid], TOL["grad"], "d hidden (valid rows)")
    assert (d_hidden_l[~valid] == 0).all(), "Liger must give padded rows no gradient"
    assert_rel_close(d_weight, d_weight_l, TOL["grad"], "d weight")


@pytest.mark.parametrize("loss_type, loss_agg, use_b", [
    ("dapo", "token-mean", False),
    ("grpo", "seq-mean-token-mean", True),
    ("dr_grpo", "seq-mean-token-sum-norm", True),
])
def test_matches_liger_on_padded_batch_flattened_to_packed_rows(loss_type, loss_agg, use_b):
    b = padded_batch(temperature=0.8)
    p, valid = pack(b)
    config = GRPOLossConfig(kl_coef=0.04, kl_estimator="k3", clip_low=0.2, clip_high=0.28, loss_agg=loss_agg,
                            max_len=T, temperature=0.8)
    ours = run_prolix(p, b["weight"], config, normalizer=len(LENGTHS) if use_b else None)
    theirs = run_liger(b, beta=0.04, eps_low=0.2, eps_high=0.28, loss_type=loss_type, temperature=0.8)
    assert_parity(ours, theirs, valid)
    # Liger's metrics: [kl, clip ratio], each a mean over the batch's valid tokens
    kl_l, clip_l = theirs[2]
    assert_rel_close(ours[2]["kl"], kl_l, TOL["value"], "kl metric")
    assert_rel_close(ours[2]["clip_frac"], clip_l, TOL["value"], "clip fraction metric")
    assert ours[2]["clip_frac_low"] > 0 and ours[2]["clip_frac_high"] > 0, "clipping must be active on both sides"


def test_dual_clip_matches_liger_delta():
    b = padded_batch(seed=1)
    p, valid = pack(b)
    config = GRPOLossConfig(kl_coef=0.04, clip_high=0.28, dual_clip=3.0)
    ours = run_prolix(p, b["weight"], config)
    theirs = run_liger(b, beta=0.04, eps_low=0.2, eps_high=0.28, loss_type="dapo", temperature=1.0, delta=3.0)
    assert ours[2]["dual_clip_frac"] > 0, "some negative-advantage token must exceed the dual clip"
    assert_parity(ours, theirs, valid)


def test_tis_cap_matches_liger_vllm_is_ratio():
    b = padded_batch(seed=2)
    p, valid = pack(b)
    config = GRPOLossConfig(kl_coef=0.04, tis_cap=1.2)
    w = torch.exp(b["old"] - b["rollout"]).clamp(max=1.2)
    assert ((w < 1.2) & b["attn"].bool()).any() and ((w == 1.2) & b["attn"].bool()).any(), "the cap must bind on some tokens"
    ours = run_prolix(p, b["weight"], config)
    theirs = run_liger(b, beta=0.04, eps_low=0.2, eps_high=0.2, loss_type="dapo", temperature=1.0, is_ratio=w)
    assert_parity(ours, theirs, valid)


def test_without_kl_matches_liger_beta_zero():
    b = padded_batch(seed=3)
    p, valid = pack(b)
    ours = run_prolix(p, b["weight"], GRPOLossConfig())
    theirs = run_liger(b, beta=0.0, eps_low=0.2, eps_high=0.2, loss_type="dapo", temperature=1.0)
    assert_parity(ours, theirs, valid)
