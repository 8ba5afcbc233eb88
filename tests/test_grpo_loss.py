"""GRPO loss: the per-token autograd path and the fused LM-head path against the float64 reference.

Every comparison is against `kernels/reference.py` (`grpo_loss_ref`, `linear_logprobs_ref`),
differentiated by torch.autograd in float64. Inputs are built so that each branch the test
is about is actually taken (clipped low and high, dual clip, capped TIS weights), and the
tests assert that, so a regression that disables a branch cannot pass silently.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from grpo_testing import IGNORE, LENGTHS, close, fused_batch, ours_and_ref, packed_batch
from kernel_testing import DEVICE, TOLERANCES, assert_rel_close, rel_err

from prolix.kernels import FusedLinearGRPOLoss, GRPOLossConfig, fused_linear_grpo_loss, grpo_loss
from prolix.kernels.grpo_config import KL_ESTIMATORS, LOSS_AGGREGATIONS
from prolix.kernels.reference import grpo_loss_ref, linear_logprobs_ref

# --- tolerances ------------------------------------------------------------------------------
# Kernel outputs (the fused path: loss, d hidden, d weight) use the project's table,
# kernel_testing.TOLERANCES (relative L2 error vs float64), and in bf16 flash-attn's rule: at
# most BF16_VS_EAGER times as wrong as torch eager in bf16. The loss math on given log-probs
# has no kernel and is checked elementwise (grpo_testing.LOSS_TOL, `close`).
BF16_VS_EAGER = 2.0

BACKENDS = ("torch", "triton")   # conftest sets TRITON_INTERPRET=1 without CUDA


def clip_sides(b, config):
    """Masked tokens where the low / high clipped branch is active, computed from the definition."""
    r = torch.exp(b["logp"] - b["old_logp"]).double()
    a, m = b["advantages"].double(), b["mask"]
    clipped = -a * r.clamp(1 - config.clip_low, 1 + config.clip_high) > -a * r
    return clipped & (r < 1) & m, clipped & (r > 1) & m


# --- the per-token path against the float64 reference ---------------------------------------


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
def test_loss_and_logp_grad_match_float64_reference(kl_estimator, loss_agg):
    b = packed_batch()
    config = GRPOLossConfig(kl_coef=0.1, kl_estimator=kl_estimator, loss_agg=loss_agg, max_len=16,
                            clip_low=0.2, clip_high=0.28)
    low, high = clip_sides(b, config)
    assert low.any() and high.any(), "the batch must clip on both sides or this test proves nothing"
    (loss, grads, _), (loss_ref, grads_ref, _) = ours_and_ref(b, config)
    close(loss, loss_ref, torch.float64, "loss")
    close(grads[0], grads_ref[0], torch.float64, "d loss / d logp")
    (_, (pg_grad,), _), _ = ours_and_ref(b, dataclasses.replace(config, kl_coef=0.0))
    assert (pg_grad[low | high] == 0).all(), "clipped tokens must get no policy-gradient signal"
    assert (pg_grad[b["mask"] & ~(low | high) & (b["advantages"] != 0)] != 0).all()


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
def test_all_terms_together_match_float64_reference(kl_estimator, loss_agg):
    # clip + dual clip + TIS + KL + entropy bonus at once: the terms must compose as in the reference
    b = packed_batch(seed=14, log_ratio=1.2)
    config = GRPOLossConfig(kl_coef=0.1, kl_estimator=kl_estimator, loss_agg=loss_agg, max_len=16,
                            dual_clip=2.0, tis_cap=1.2, entropy_coef=0.02)
    (loss, grads, metrics), (loss_ref, grads_ref, _) = ours_and_ref(b, config, with_entropy=True)
    assert metrics["dual_clip_frac"] > 0 and metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0
    w = torch.exp(b["old_logp"] - b["rollout_logp"])[b["mask"]]
    assert (w > 1.2).any() and (w < 1.2).any(), "the TIS cap must bind on some tokens only"
    close(loss, loss_ref, torch.float64, "loss")
    close(grads[0], grads_ref[0], torch.float64, "d loss / d logp")
    close(grads[1], grads_ref[1], torch.float64, "d loss / d entropy")


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
def test_float32_logp_matches_reference_to_float32_precision(loss_agg):
    b = packed_batch(dtype=torch.float32, seed=1)
    config = GRPOLossConfig(kl_coef=0.05, loss_agg=loss_agg, max_len=16, entropy_coef=0.01)
    (loss, grads, _), (loss_ref, grads_ref, _) = ours_and_ref(b, config, with_entropy=True)
    assert loss.dtype == torch.float32 and grads[0].dtype == torch.float32
    close(loss, loss_ref, torch.float32, "loss")
    for g, g_ref, name in zip(grads, grads_ref, ("logp", "entropy")):
        close(g, g_ref, torch.float32, f"d loss / d {name}")


def test_dual_clip_bounds_negative_advantage_loss_and_zeroes_its_gradient():
    b = packed_batch(seed=2, log_ratio=1.5)   # ratios up to e^1.5 ≈ 4.5 > c
    config = GRPOLossConfig(dual_clip=2.0, kl_coef=0.02)
    r = torch.exp(b["logp"] - b["old_logp"])
    dual = b["mask"] & (b["advantages"] < 0) & (r > config.dual_clip)
    assert dual.any(), "no token hits the dual clip"
    (loss, grads, metrics), (loss_ref, grads_ref, _) = ours_and_ref(b, config)
    close(loss, loss_ref, torch.float64, "loss")
    close(grads[0], grads_ref[0], torch.float64, "d loss / d logp")
    assert metrics["dual_clip_frac"] > 0
    # without the KL term, dual-clipped tokens get exactly no gradient
    (_, (pg_grad,), _), _ = ours_and_ref(b, dataclasses.replace(config, kl_coef=0.0))
    assert (pg_grad[dual] == 0).all() and (pg_grad[b["mask"] & ~dual & (r < 1.1)] != 0).any()


@pytest.mark.parametrize("with_old_logp", [True, False])
def test_tis_weight_is_capped_and_constant(with_old_logp):
    b = packed_batch(seed=3)
    if not with_old_logp:
        b["old_logp"] = None
    config = GRPOLossConfig(tis_cap=1.1, kl_coef=0.05)
    old = b["logp"] if b["old_logp"] is None else b["old_logp"]
    w = torch.exp(old - b["rollout_logp"])
    assert ((w > 1.1) & b["mask"]).any() and ((w < 1.1) & b["mask"]).any(), "the cap must bind on some tokens only"
    (loss, grads, metrics), (loss_ref, grads_ref, _) = ours_and_ref(b, config)
    close(loss, loss_ref, torch.float64, "loss")
    close(grads[0], grads_ref[0], torch.float64, "d loss / d logp")
    m = b["mask"].double()
    close(metrics["tis_weight_mean"], (w.clamp(max=1.1) * m).sum() / m.sum(), torch.float64, "tis_weight_mean")


def test_rollout_logp_without_tis_cap_does_not_change_the_loss():
    b = packed_batch(seed=4)
    config = GRPOLossConfig(kl_coef=0.05)
    with_rollout = ours_and_ref(b, config)[0]
    b["rollout_logp"] = None
    without = ours_and_ref(b, config)[0]
    assert torch.equal(with_rollout[0], without[0]) and torch.equal(with_rollout[1][0], without[1][0])


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_entropy_bonus_gradient_flows_into_entropy(loss_agg):
    b = packed_batch(seed=5)
    config = GRPOLossConfig(entropy_coef=0.03, kl_coef=0.1, loss_agg=loss_agg)
    (loss, grads, _), (loss_ref, grads_ref, _) = ours_and_ref(b, config, with_entropy=True)
    close(loss, loss_ref, torch.float64, "loss")
    close(grads[0], grads_ref[0], torch.float64, "d loss / d logp")
    close(grads[1], grads_ref[1], torch.float64, "d loss / d entropy")
    assert (grads[1][b["mask"]] < 0).all(), "an entropy bonus must push the entropy up"


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
def test_all_masked_microbatch_gives_zero_loss_zero_grad_no_nan(loss_agg):
    b = packed_batch(seed=6)
    b["mask"] = torch.zeros_like(b["mask"])
    config = GRPOLossConfig(kl_coef=0.1, entropy_coef=0.01, loss_agg=loss_agg, max_len=8)
    (loss, grads, metrics), (loss_ref, _, _) = ours_and_ref(b, config, with_entropy=True)
    assert loss.item() == 0.0 and loss_ref.item() == 0.0
    assert all((g == 0).all() for g in grads)
    assert all(torch.isfinite(v) for v in metrics.values()) and metrics["num_tokens"] == 0


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("cu_seqlens", [[0], [0, 0, 0]], ids=["no-sequences", "empty-sequences"])
def test_empty_microbatch_gives_zero_loss(loss_agg, cu_seqlens):
    # a data-parallel rank can be left with no tokens at the end of an epoch
    empty = torch.zeros(0, dtype=torch.float64, device=DEVICE)
    logp = empty.clone().requires_grad_()
    loss, metrics = grpo_loss(logp, empty, empty.bool(), old_logp=empty, ref_logp=empty,
                              cu_seqlens=torch.tensor(cu_seqlens, device=DEVICE),
                              config=GRPOLossConfig(kl_coef=0.1, loss_agg=loss_agg, max_len=8))
    loss.backward()
    assert loss.item() == 0.0 and logp.grad.shape == (0,)
    assert all(v.item() == 0.0 for v in metrics.values())


def test_masked_rows_with_overflowing_ratios_do_not_poison_the_loss():
    # Masked-out rows may carry garbage (e.g. prompt tokens with old_logp = 0 and logp = −1e4).
    b = packed_batch(seed=7)
    b["old_logp"] = torch.where(b["mask"], b["old_logp"], torch.full_like(b["old_logp"], -1e4))
    (loss, grads, metrics), _ = ours_and_ref(b, GRPOLossConfig(kl_coef=0.1))
    clean = packed_batch(seed=7)
    (loss_clean, grads_clean, _), _ = ours_and_ref(clean, GRPOLossConfig(kl_coef=0.1))
    assert torch.isfinite(loss) and torch.isfinite(grads[0]).all()
    close(loss, loss_clean, torch.float64, "loss")
    close(grads[0], grads_clean[0], torch.float64, "d loss / d logp")
    assert torch.isfinite(metrics["ratio_max"])


def test_seq_mean_equals_token_mean_when_every_sequence_has_one_token():
    b = packed_batch(lengths=(1, 0, 1, 1, 0, 1, 1), seed=8)
    b["mask"] = torch.ones_like(b["mask"])
    token = ours_and_ref(b, GRPOLossConfig(kl_coef=0.1))[0]
    seq = ours_and_ref(b, GRPOLossConfig(kl_coef=0.1, loss_agg="seq-mean-token-mean"))
    close(seq[0][0], seq[1][0], torch.float64, "loss vs reference")
    close(seq[0][0], token[0], torch.float64, "seq-mean-token-mean vs token-mean")
    close(seq[0][1][0], token[1][0], torch.float64, "grads")


def test_without_old_logp_the_gradient_is_the_plain_policy_gradient():
    b = packed_batch(seed=9)
    b["old_logp"] = None
    (loss, grads, metrics), _ = ours_and_ref(b, GRPOLossConfig())
    m = b["mask"].double()
    close(grads[0], -b["advantages"] * m / m.sum(), torch.float64, "d loss / d logp")
    close(loss, (-b["advantages"] * m).sum() / m.sum(), torch.float64, "loss")
    assert metrics["clip_frac"] == 0 and metrics["ratio_max"] == 1.0


def test_backward_is_a_multiply_by_grad_output_and_saves_only_per_token_vectors():
    b = packed_batch(seed=10)
    logp = b["logp"].clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss, _ = grpo_loss(logp, b["advantages"], b["mask"], old_logp=b["old_logp"], ref_logp=b["ref_logp"],
                            config=GRPOLossConfig(kl_coef=0.1))
    assert saved and all(s == logp.shape for s in saved), f"saved {saved}"
    (g1,) = torch.autograd.grad(loss, logp, retain_graph=True)
    (g3,) = torch.autograd.grad(3.0 * loss, logp)
    close(g3, 3.0 * g1, torch.float64, "grad of 3·loss")


def test_metrics_match_direct_computation():
    b = packed_batch(seed=11, log_ratio=1.2)
    config = GRPOLossConfig(kl_coef=0.1, kl_estimator="k2", dual_clip=2.5, tis_cap=1.5, clip_high=0.28)
    _, metrics = grpo_loss(b["logp"], b["advantages"], b["mask"], old_logp=b["old_logp"], ref_logp=b["ref_logp"],
                           rollout_logp=b["rollout_logp"], entropy=b["entropy"], config=config)
    m, a = b["mask"].double(), b["advantages"]
    r = torch.exp(b["logp"] - b["old_logp"])
    unclipped, clipped_val = -a * r, -a * r.clamp(0.8, 1.28)
    clipped = clipped_val > unclipped
    pg = torch.maximum(unclipped, clipped_val)
    dual = (a < 0) & (pg > -2.5 * a)
    pg = torch.where(dual, -2.5 * a, pg) * torch.exp(b["old_logp"] - b["rollout_logp"]).clamp(max=1.5)
    delta = b["ref_logp"] - b["logp"]
    mean = lambda x: (x.double() * m).sum() / m.sum()
    expected = dict(pg_loss=mean(pg), kl=mean(delta ** 2 / 2), entropy=mean(b["entropy"]),
                    clip_frac=mean(clipped), clip_frac_low=mean(clipped & (r < 1)),
                    clip_frac_high=mean(clipped & (r > 1)), dual_clip_frac=mean(dual),
                    tis_weight_mean=mean(torch.exp(b["old_logp"] - b["rollout_logp"]).clamp(max=1.5)),
                    ratio_mean=mean(r), ratio_max=r[b["mask"]].max(), num_tokens=m.sum())
    assert set(metrics) == set(expected)
    for k, v in expected.items():
        close(metrics[k], v, torch.float64, k)
        assert metrics[k].dim() == 0 and not metrics[k].requires_grad
    assert 0 < metrics["clip_frac_low"] and 0 < metrics["clip_frac_high"] and 0 < metrics["dual_clip_frac"]


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_microbatches_with_global_normalizer_sum_to_full_batch(loss_agg):
    b = packed_batch(seed=12)
    config = GRPOLossConfig(kl_coef=0.1, entropy_coef=0.01, loss_agg=loss_agg, max_len=16)
    full = ours_and_ref(b, config, with_entropy=True)[0]
    seq_tokens = torch.stack([b["mask"][s:e].sum() for s, e in zip(b["cu_seqlens"][:-1], b["cu_seqlens"][1:])])
    normalizer = b["mask"].sum() if loss_agg == "token-mean" else (seq_tokens > 0).sum()
    k = 4   # split after the 4th sequence
    cut = int(b["cu_seqlens"][k])
    halves = []
    for rows, cu in ((slice(0, cut), b["cu_seqlens"][: k + 1]), (slice(cut, None), b["cu_seqlens"][k:] - cut)):
        part = {key: v[rows] for key, v in b.items() if key != "cu_seqlens"}
        halves.append(ours_and_ref({**part, "cu_seqlens": cu}, config, normalizer, with_entropy=True)[0])
    close(halves[0][0] + halves[1][0], full[0], torch.float64, "summed micro-batch losses")
    for i, name in enumerate(("logp", "entropy")):
        close(torch.cat([halves[0][1][i], halves[1][1][i]]), full[1][i], torch.float64, f"d loss / d {name}")


def test_normalizer_may_be_a_tensor():
    b = packed_batch(seed=13)
    config = GRPOLossConfig(kl_coef=0.1)
    as_float = ours_and_ref(b, config, normalizer=50.0)[0]
    as_tensor = ours_and_ref(b, config, normalizer=torch.tensor(50, device=DEVICE))[0]
    reference = ours_and_ref(b, config, normalizer=50.0)[1]
    close(as_tensor[0], as_float[0], torch.float64, "loss")
    close(as_tensor[0], reference[0], torch.float64, "loss vs reference")
    close(as_tensor[1][0], reference[1][0], torch.float64, "d loss / d logp")


# --- bad inputs: a clear error naming the argument, before any compute -----------------------


def _call(b, config=GRPOLossConfig(kl_coef=0.1), **override):
    kw = {k: b[k] for k in ("old_logp", "ref_logp", "cu_seqlens")}
    kw.update(override)
    args = [kw.pop(k, b[k]) for k in ("logp", "advantages", "mask")]
    return grpo_loss(*args, **kw, config=config)


N = sum(LENGTHS)
BAD_INPUTS = {
    # name: (override builder (batch -> kwargs), config, exception, message pattern)
    "logp_2d": (lambda b: dict(logp=b["logp"][None]), None, ValueError, r"logp: expected a 1-D"),
    "logp_int": (lambda b: dict(logp=b["mask"].long()), None, TypeError, r"logp: expected a floating"),
    "advantages_short": (lambda b: dict(advantages=b["advantages"][1:]), None, ValueError,
                         rf"advantages: expected length N={N}"),
    "advantages_int": (lambda b: dict(advantages=b["mask"].long()), None, TypeError, r"advantages"),
    "mask_long": (lambda b: dict(mask=torch.ones(N + 1, device=DEVICE)), None, ValueError, r"mask: expected length"),
    "old_logp_short": (lambda b: dict(old_logp=b["old_logp"][:-1]), None, ValueError, r"old_logp: expected length"),
    "ref_logp_other_device": (lambda b: dict(ref_logp=torch.empty(N, device="meta", dtype=torch.float64)), None,
                              ValueError, r"ref_logp: expected device"),
    "cu_seqlens_not_from_0": (lambda b: dict(cu_seqlens=b["cu_seqlens"] + 1), None, ValueError,
                              r"cu_seqlens: expected cu_seqlens\[0\] == 0"),
    "cu_seqlens_not_to_N": (lambda b: dict(cu_seqlens=b["cu_seqlens"][:-1]), None, ValueError,
                            r"cu_seqlens: expected cu_seqlens\[-1\] == N"),
    "cu_seqlens_decreasing": (lambda b: dict(cu_seqlens=torch.tensor([0, 9, 4, N], device=DEVICE)), None, ValueError,
                              r"cu_seqlens: expected non-decreasing"),
    "cu_seqlens_float": (lambda b: dict(cu_seqlens=b["cu_seqlens"].double()), None, TypeError,
                         r"cu_seqlens: expected an integer"),
    "cu_seqlens_2d": (lambda b: dict(cu_seqlens=b["cu_seqlens"][None]), None, ValueError, r"cu_seqlens: expected a 1-D"),
    "seq_agg_without_cu_seqlens": (lambda b: dict(cu_seqlens=None), GRPOLossConfig(loss_agg="seq-mean-token-sum"),
                                   ValueError, r"cu_seqlens: required by loss_agg='seq-mean-token-sum'"),
    "kl_without_ref_logp": (lambda b: dict(ref_logp=None), GRPOLossConfig(kl_coef=0.1), ValueError,
                            r"ref_logp: required when config.kl_coef > 0"),
    "entropy_bonus_without_entropy": (lambda b: {}, GRPOLossConfig(entropy_coef=0.01), ValueError,
                                      r"entropy: required when config.entropy_coef"),
    "tis_without_rollout_logp": (lambda b: {}, GRPOLossConfig(tis_cap=2.0), ValueError,
                                 r"rollout_logp: required when config.tis_cap"),
    "normalizer_zero": (lambda b: dict(normalizer=0), None, ValueError, r"normalizer: expected > 0"),
    "normalizer_negative_tensor": (lambda b: dict(normalizer=torch.tensor(-3.0, device=DEVICE)), None, ValueError,
                                   r"normalizer: expected > 0"),
    "normalizer_nan": (lambda b: dict(normalizer=float("nan")), None, ValueError, r"normalizer: expected > 0"),
    "normalizer_vector": (lambda b: dict(normalizer=torch.ones(2)), None, ValueError, r"normalizer: expected a scalar"),
    "config_not_a_config": (lambda b: {}, {"kl_coef": 0.1}, TypeError, r"config: expected a GRPOLossConfig"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_naming_the_argument(case):
    build, config, exc, pattern = BAD_INPUTS[case]
    b = packed_batch()
    with pytest.raises(exc, match=pattern):
        _call(b, **({} if config is None else {"config": config}), **build(b))


@pytest.mark.parametrize("field, value, pattern", [
    ("kl_estimator", "k4", r"kl_estimator must be one of"),
    ("loss_agg", "sequence-mean", r"loss_agg must be one of"),
    ("loss_agg", "seq-mean-token-sum-norm", r"needs max_len > 0"),
])
def test_unknown_estimator_or_aggregation_is_rejected_by_the_config(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        GRPOLossConfig(**{field: value})


# --- the fused path: hidden states → loss, against linear_logprobs_ref + grpo_loss_ref -------

# (N, V, H): one token (N = 1 is legal and splits the vocabulary across programs); V = 333 and
# 1000 are not powers of two and not multiples of any block size; H = 40 is not a multiple of 16.
FUSED_SHAPES = [(1, 333, 40), (37, 1000, 64), (64, 333, 40)]


def fused_ours(b, config, backend, **kw):
    hidden = b["hidden"].clone().requires_grad_()
    weight = b["weight"].clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(
        hidden, weight, b["targets"], b["advantages"], b["mask"], old_logp=b["old_logp"], ref_logp=b["ref_logp"],
        cu_seqlens=b["cu_seqlens"], config=config, ignore_index=IGNORE, backend=backend, **kw)
    return (loss, *torch.autograd.grad(loss, (hidden, weight))), metrics


def fused_ref(b, config, upcast=True):
    """Float64 reference (upcast=True) or torch eager in the inputs' dtype (upcast=False)."""
    # float64 leaves for the reference: a bf16 leaf would round the reference gradient to bf16
    cast = (lambda t: t.double()) if upcast else (lambda t: t.clone())
    hidden = cast(b["hidden"]).requires_grad_()
    weight = cast(b["weight"]).requires_grad_()
    logp, entropy = linear_logprobs_ref(hidden, weight, b["targets"], temperature=config.temperature,
                                        ignore_index=IGNORE, upcast=upcast)
    loss = grpo_loss_ref(logp, b["advantages"], b["mask"], old_logp=b["old_logp"], ref_logp=b["ref_logp"],
                         entropy=entropy, cu_seqlens=b["cu_seqlens"], config=config, upcast=upcast)
    return (loss, *torch.autograd.grad(loss, (hidden, weight)))


FUSED_CONFIGS = {
    "token-mean+k3+entropy": GRPOLossConfig(kl_coef=0.05, entropy_coef=0.01, clip_high=0.28),
    "seq-mean+k2+temperature": GRPOLossConfig(kl_coef=0.1, kl_estimator="k2", loss_agg="seq-mean-token-mean",
                                              temperature=0.7),
}


@pytest.mark.parametrize("config_name", FUSED_CONFIGS)
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "N{}-V{}-H{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_loss_and_hidden_weight_grads_match_reference(backend, dtype, shape, config_name):
    config = FUSED_CONFIGS[config_name]
    b = fused_batch(*shape, dtype, temperature=config.temperature)
    ours, _ = fused_ours(b, config, backend)
    ref = fused_ref(b, config)
    eager = fused_ref(b, config, upcast=False) if dtype == torch.bfloat16 else None
    for i, name in enumerate(("loss", "d loss / d hidden", "d loss / d weight")):
        assert ours[i].dtype == (torch.float32 if i == 0 else dtype), name
        assert_rel_close(ours[i], ref[i], TOLERANCES[dtype]["value" if i == 0 else "grad"], name)
        if eager is not None:
            err, err_eager = rel_err(ours[i], ref[i]), rel_err(eager[i], ref[i])
            assert err <= BF16_VS_EAGER * err_eager + 1e-7, f"{name}: error {err:.2e} vs eager bf16 {err_eager:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_entropy_metric_costs_no_gradient_change(backend):
    config = GRPOLossConfig(kl_coef=0.05)
    b = fused_batch(37, 1000, 64, torch.float32, seed=1)
    plain, m_plain = fused_ours(b, config, backend)
    with_metric, m_metric = fused_ours(b, config, backend, entropy_metric=True)
    assert "entropy" not in m_plain
    for x, y in zip(plain, with_metric):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    _, entropy = linear_logprobs_ref(b["hidden"], b["weight"], b["targets"], ignore_index=IGNORE)
    m = b["mask"].double()
    assert_rel_close(m_metric["entropy"], (entropy * m).sum() / m.sum(), TOLERANCES[torch.float32]["value"], "entropy")


def test_fused_metrics_equal_those_of_grpo_loss_on_reference_logprobs():
    config = FUSED_CONFIGS["token-mean+k3+entropy"]
    b = fused_batch(64, 333, 40, torch.float32, seed=2)
    _, metrics = fused_ours(b, config, "torch")
    logp, entropy = linear_logprobs_ref(b["hidden"], b["weight"], b["targets"], ignore_index=IGNORE)
    _, expected = grpo_loss(logp, b["advantages"], b["mask"], old_logp=b["old_logp"], ref_logp=b["ref_logp"],
                            entropy=entropy, cu_seqlens=b["cu_seqlens"], config=config)
    assert set(metrics) == set(expected)
    assert expected["clip_frac_low"] > 0 and expected["clip_frac_high"] > 0
    for k in expected:
        assert_rel_close(metrics[k], expected[k], TOLERANCES[torch.float32]["value"], k)


def test_fused_graph_saves_no_vocabulary_sized_tensor():
    n, v, h = 64, 1000, 16   # N·V = 64000 > V·H = 16000: the weight itself does not count
    b = fused_batch(n, v, h, torch.float32, seed=3)
    hidden, weight = b["hidden"].clone().requires_grad_(), b["weight"].clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss, _ = fused_linear_grpo_loss(hidden, weight, b["targets"], b["advantages"], b["mask"],
                                         old_logp=b["old_logp"], ref_logp=b["ref_logp"],
                                         config=GRPOLossConfig(kl_coef=0.1, entropy_coef=0.01),
                                         ignore_index=IGNORE, backend="torch")
    assert saved and max(saved) < n * v, f"saved tensor sizes {sorted(saved)}"
    loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_module_wrapper_equals_the_function():
    config = FUSED_CONFIGS["seq-mean+k2+temperature"]
    b = fused_batch(37, 333, 40, torch.float32, seed=4)
    module = FusedLinearGRPOLoss(config, ignore_index=IGNORE, backend="torch")
    loss, metrics = module(b["hidden"], b["weight"], b["targets"], b["advantages"], b["mask"],
                           old_logp=b["old_logp"], ref_logp=b["ref_logp"], cu_seqlens=b["cu_seqlens"])
    (expected, *_), expected_metrics = fused_ours(b, config, "torch")
    assert torch.equal(loss.detach(), expected.detach()) and metrics.keys() == expected_metrics.keys()
    assert "GRPOLossConfig" in repr(module)


@pytest.mark.parametrize("override, exc, pattern", [
    (lambda b: dict(mask=torch.ones_like(b["mask"])), ValueError, r"mask: expected 0 on rows whose target is ignore"),
    (lambda b: dict(targets=b["targets"][:-1]), ValueError, r"targets: expected length"),
    (lambda b: dict(hidden=b["hidden"][None]), ValueError, r"hidden: expected a 2-D"),
    (lambda b: dict(advantages=b["advantages"][:-1]), ValueError, r"advantages: expected length N=37 \(that of hidden\)"),
])
def test_fused_bad_input_raises_naming_the_argument(override, exc, pattern):
    b = fused_batch(37, 333, 40, torch.float32)
    kw = {**{k: b[k] for k in ("hidden", "weight", "targets", "advantages", "mask")}, **override(b)}
    with pytest.raises(exc, match=pattern):
        fused_linear_grpo_loss(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), kw.pop("advantages"),
                               kw.pop("mask"), ignore_index=IGNORE)
