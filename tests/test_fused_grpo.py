"""The three-GEMM fused GRPO loss (kernels/three_gemm.py) against float64 references.

Every value and gradient is compared with `linear_logprobs_ref` + `grpo_loss_ref` in float64,
differentiated by autograd (relative L2 errors, kernel_testing.TOLERANCES), for both backends:
torch, and Triton under TRITON_INTERPRET=1 on CPU. Shapes are small for the interpreter and
awkward on purpose: V = 333 and 1000 are no multiple of any tile, H = 40 no multiple of 16,
and `chunk_rows` is small (16, 24) so that N = 37 and 64 cross several chunks, the last one
partial. Inputs put each branch the test is about in play, and the tests assert that.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from kernel_testing import DEVICE, TOLERANCES, assert_rel_close, rel_err

from prolix.kernels import GRPOLossConfig, RolloutCorrectionConfig, fused_linear_grpo_loss
from prolix.kernels import three_gemm as fg
from prolix.kernels.grpo_config import KL_ESTIMATORS, LOSS_AGGREGATIONS
from prolix.kernels.reference import grpo_loss_ref, linear_logprobs_ref

BACKENDS = ("torch", "triton")
IGNORE = -100
NAMES = ("loss", "d loss / d hidden", "d loss / d weight")
# the module (`prolix.kernels.grpo_loss` the attribute is the function of the same name)
grpo_loss_module = importlib.import_module("prolix.kernels.grpo_loss")


def make_batch(n, v, h, dtype, *, seed=0, temperature=1.0, overflow_rows=(), log_ratio=0.5):
    """Packed rows in 4 sequences, ~20% masked, one ignored row; ratios on both sides of the clip.

    overflow_rows: rows whose target logit sits ~100 nats below their row maximum (hidden
    dimension 0 carries +100 into one vocabulary column that is not their target)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / math.sqrt(h)
    targets = torch.randint(1, v, (n,), generator=g)
    hidden[:, 0], weight[:, 0] = 0.0, 0.0
    weight[0, 0] = 10.0                       # column 0 (never a target) gets +100 on those rows
    mask = torch.rand(n, generator=g) < 0.8
    mask[0] = True
    for r in overflow_rows:
        hidden[r, 0], mask[r] = 10.0 * temperature, True
    if n > 2:
        targets[n // 2], mask[n // 2] = IGNORE, False
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    logp64, _ = linear_logprobs_ref(hidden, weight, targets, temperature=temperature, ignore_index=IGNORE)
    side = torch.tensor([-log_ratio, -0.08, 0.08, log_ratio], dtype=torch.float64)[
        torch.randint(0, 4, (n,), generator=g)]
    lens = [n // 3, 0, n - 2 * (n // 3), n // 3] if n > 2 else [n]
    cu = torch.tensor([0] + torch.cumsum(torch.tensor(lens), 0).tolist(), dtype=torch.int32)
    seq_adv = torch.randn(len(lens), generator=g, dtype=torch.float64)
    seq_adv[0] = -seq_adv[0].abs()
    b = dict(hidden=hidden, weight=weight, targets=targets, mask=mask, cu_seqlens=cu,
             advantages=torch.repeat_interleave(seq_adv, torch.tensor(lens)).float(),
             old_logp=(logp64 - side).float(), ref_logp=(logp64 + 0.3 * torch.randn(n, generator=g)).float(),
             rollout_logp=(logp64 - side + 0.3 * torch.randn(n, generator=g)).float())
    return {k: v.to(DEVICE) for k, v in b.items()}


def ours(b, config, backend, *, algorithm="three_gemm", chunk_rows=16, frozen_weight=False, **kw):
    hidden = b["hidden"].clone().requires_grad_()
    weight = b["weight"].clone().requires_grad_(not frozen_weight)
    loss, metrics = fused_linear_grpo_loss(
        hidden, weight, b["targets"], b["advantages"], b["mask"], old_logp=b["old_logp"], ref_logp=b["ref_logp"],
        rollout_logp=b["rollout_logp"], cu_seqlens=b["cu_seqlens"], config=config, ignore_index=IGNORE,
        backend=backend, algorithm=algorithm, chunk_rows=chunk_rows if algorithm == "three_gemm" else None, **kw)
    leaves = (hidden,) if frozen_weight else (hidden, weight)
    return (loss, *torch.autograd.grad(loss, leaves)), metrics


def reference(b, config, upcast=True):
    cast = (lambda t: t.double()) if upcast else (lambda t: t.clone())
    hidden, weight = cast(b["hidden"]).requires_grad_(), cast(b["weight"]).requires_grad_()
    logp, entropy = linear_logprobs_ref(hidden, weight, b["targets"], temperature=config.temperature,
                                        ignore_index=IGNORE, upcast=upcast)
    loss = grpo_loss_ref(logp, b["advantages"], b["mask"], old_logp=b["old_logp"], ref_logp=b["ref_logp"],
                         rollout_logp=b["rollout_logp"], entropy=entropy, cu_seqlens=b["cu_seqlens"],
                         config=config, upcast=upcast)
    return (loss, *torch.autograd.grad(loss, (hidden, weight))), logp


def assert_matches_reference(out, ref, dtype):
    for i, name in enumerate(NAMES[: len(out)]):
        assert_rel_close(out[i], ref[i], TOLERANCES[dtype]["value" if i == 0 else "grad"], name)


# --- every loss term and aggregation, both backends, against float64 -----------------------

CONFIGS = {
    "token-mean+k3+entropy-in-graph": GRPOLossConfig(kl_coef=0.05, entropy_coef=0.02, clip_high=0.28),
    "seq-mean+k2+temperature": GRPOLossConfig(kl_coef=0.1, kl_estimator="k2", loss_agg="seq-mean-token-mean",
                                              temperature=0.7),
    "seq-sum+k1+dual-clip+tis": GRPOLossConfig(kl_coef=0.1, kl_estimator="k1", loss_agg="seq-mean-token-sum",
                                               dual_clip=1.5, tis_cap=1.1),
    "dr-grpo+entropy+temperature": GRPOLossConfig(loss_agg="seq-mean-token-sum-norm", max_len=40,
                                                  entropy_coef=-0.05, temperature=1.3),
}


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("shape, chunk", [((37, 1000, 64), 16), ((64, 333, 40), 24)],
                         ids=["N37-V1000-H64-C16", "N64-V333-H40-C24"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_loss_and_grads_match_float64_reference(backend, shape, chunk, config_name):
    config = CONFIGS[config_name]
    b = make_batch(*shape, torch.float32, temperature=config.temperature, log_ratio=1.0)
    out, metrics = ours(b, config, backend, chunk_rows=chunk)
    assert_matches_reference(out, reference(b, config)[0], torch.float32)
    assert metrics["clip_frac"] > 0, "some token must clip, or the clip branch is untested"
    if config.dual_clip is not None:
        assert metrics["dual_clip_frac"] > 0


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
def test_every_aggregation_and_estimator_matches_the_four_gemm_path(kl_estimator, loss_agg):
    config = GRPOLossConfig(kl_coef=0.1, kl_estimator=kl_estimator, loss_agg=loss_agg, max_len=30,
                            entropy_coef=0.01, dual_clip=2.0, tis_cap=1.2)
    b = make_batch(37, 333, 40, torch.float32, seed=1)
    three, m3 = ours(b, config, "torch")
    four, m4 = ours(b, config, "torch", algorithm="four_gemm")
    for i, name in enumerate(NAMES):
        assert_rel_close(three[i], four[i], TOLERANCES[torch.float32]["grad"], name)
    assert m3.keys() == m4.keys()
    for k in m3:
        assert_rel_close(m3[k], m4[k], TOLERANCES[torch.float32]["value"], k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_is_no_worse_than_the_four_gemm_path(backend):
    # E is stored in bf16 like the four-GEMM path's dz; the gradient error against float64 must
    # be of the same size (a 25% margin for a different rounding pattern, not a different order).
    config = CONFIGS["token-mean+k3+entropy-in-graph"]
    b = make_batch(64, 1000, 64, torch.bfloat16, seed=2)
    three, _ = ours(b, config, backend)
    four, _ = ours(b, config, backend, algorithm="four_gemm")
    ref, _ = reference(b, config)
    assert_matches_reference(three, ref, torch.bfloat16)
    for i, name in enumerate(NAMES):
        err3, err4 = rel_err(three[i], ref[i]), rel_err(four[i], ref[i])
        assert err3 <= 1.25 * err4 + 1e-6, f"{name}: three-GEMM error {err3:.2e} vs four-GEMM {err4:.2e}"
        assert three[i].dtype == (torch.float32 if i == 0 else torch.bfloat16)


# --- the edge cases of the algorithm --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_with_the_target_100_nats_below_the_max_are_exact(backend, dtype):
    # exp(z − c) = e^100 overflows the clamp (2^64): these rows must be redone with c = the max.
    rows = (0, 5, 17, 30)
    config = GRPOLossConfig(kl_coef=0.05, entropy_coef=0.01)
    b = make_batch(37, 333, 40, dtype, seed=3, overflow_rows=rows)
    ref, logp = reference(b, config)
    assert (logp[list(rows)] < -90).all(), "the overflow rows must have p(target) < e^-90"
    out, metrics = ours(b, config, backend)
    assert_matches_reference(out, ref, dtype)
    assert torch.isfinite(metrics["entropy"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_gets_no_weight_gradient_work(backend, monkeypatch):
    config = CONFIGS["seq-mean+k2+temperature"]
    b = make_batch(37, 1000, 64, torch.float32, seed=4, temperature=config.temperature)

    def no_dw(*args):
        raise AssertionError("a dW GEMM ran for a frozen weight")
    monkeypatch.setattr(fg, "_addmm_fp32_", no_dw)
    out, _ = ours(b, config, backend, frozen_weight=True)
    ref, _ = reference(b, config)
    assert_matches_reference(out, ref[:2], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_does_no_gradient_work_and_gives_the_same_loss(backend, monkeypatch):
    config = CONFIGS["token-mean+k3+entropy-in-graph"]
    b = make_batch(37, 333, 40, torch.float32, seed=5)
    (loss, *_), metrics = ours(b, config, backend)

    def no_grads(*args):
        raise AssertionError("gradient GEMMs ran under no_grad")
    monkeypatch.setattr(fg, "_chunk_grads", no_grads)
    with torch.no_grad():
        loss_ng, _ = fused_linear_grpo_loss(
            b["hidden"].clone().requires_grad_(), b["weight"].clone().requires_grad_(), b["targets"],
            b["advantages"], b["mask"], old_logp=b["old_logp"], ref_logp=b["ref_logp"],
            rollout_logp=b["rollout_logp"], cu_seqlens=b["cu_seqlens"], config=config, ignore_index=IGNORE,
            backend=backend, chunk_rows=16)
    assert loss_ng.grad_fn is None
    torch.testing.assert_close(loss_ng, loss.detach(), rtol=0, atol=0)
    with pytest.raises(AssertionError, match="gradient GEMMs"):   # the spy is live: grads do call it
        ours(b, config, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_all_masked_chunk_and_an_all_masked_batch(backend):
    config = GRPOLossConfig(kl_coef=0.1, entropy_coef=0.01, loss_agg="seq-mean-token-mean")
    b = make_batch(64, 333, 40, torch.float32, seed=6)
    b["mask"][:24] = False            # the whole first chunk of 24 rows carries no loss
    b["targets"][3] = IGNORE          # an ignored target inside it
    out, _ = ours(b, config, backend, chunk_rows=24)
    ref, _ = reference(b, config)
    assert_matches_reference(out, ref, torch.float32)
    assert (out[1][:24] == 0).all(), "rows without loss weight must get exactly zero gradient"
    b["mask"][:] = False
    out, metrics = ours(b, config, backend, chunk_rows=24)
    assert out[0].item() == 0.0 and (out[1] == 0).all() and (out[2] == 0).all()
    assert metrics["num_tokens"] == 0 and all(torch.isfinite(v) for v in metrics.values())


def test_backward_scales_by_grad_output_and_saves_no_vocabulary_sized_tensor():
    n, v, h = 64, 1000, 16      # N·V = 64000 > V·H = 16000 > N·H: only dh, dW may be saved
    config = CONFIGS["token-mean+k3+entropy-in-graph"]
    b = make_batch(n, v, h, torch.float32, seed=7)
    hidden, weight = b["hidden"].clone().requires_grad_(), b["weight"].clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss, _ = fused_linear_grpo_loss(hidden, weight, b["targets"], b["advantages"], b["mask"],
                                         old_logp=b["old_logp"], ref_logp=b["ref_logp"], config=config,
                                         ignore_index=IGNORE, backend="torch", chunk_rows=16)
    assert sorted(saved) == [n * h, v * h], f"saved tensor sizes {sorted(saved)}"
    g1 = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    g3 = torch.autograd.grad(-3.0 * loss, (hidden, weight))
    for a, c in zip(g1, g3):
        torch.testing.assert_close(c, -3.0 * a)


def test_default_chunk_keeps_e_near_its_budget_and_bad_arguments_are_named():
    assert fg.default_chunk_rows(151936, 2) == 4096          # 4096 × 151936 × 2 B = 1.24 GB
    assert fg.default_chunk_rows(151936, 4) == 2048
    assert fg.default_chunk_rows(151936, 4, fg.TORCH_E_BUDGET_BYTES) == 384   # 0.23 GB fp32
    assert fg.default_chunk_rows(10 ** 9, 2) == 128
    b = make_batch(37, 333, 40, torch.float32)
    args = (b["hidden"], b["weight"], b["targets"], b["advantages"], b["mask"])
    with pytest.raises(ValueError, match=r"algorithm: expected one of .* got 'fast'"):
        fused_linear_grpo_loss(*args, ignore_index=IGNORE, algorithm="fast")
    with pytest.raises(ValueError, match=r"chunk_rows: expected a positive int or None, got 0"):
        fused_linear_grpo_loss(*args, ignore_index=IGNORE, chunk_rows=0)


# --- rollout correction in the three-GEMM pass; sequence-coupled configs take four GEMMs ----
# make_batch(37, 1000, 64, seed=3): sequences 0, 2, 3 (1 is empty) with advantages −1.03, 2.02,
# −0.19, geometric-mean weights π_old/π_rollout 1.15, 1.025, 1.132, mean k3 0.073, 0.049, 0.028,
# mean k1 −0.14, −0.024, −0.124 and token weights in [0.6, 2.27]: each bound below sits between
# those values, so every rule drops (or truncates) some tokens and keeps others.
RC = RolloutCorrectionConfig
TOKEN_LOCAL_CORRECTIONS = {
    "token-truncate": RC(is_level="token", is_mode="truncate", is_min=0.8, is_max=1.25),
    "token-mask": RC(is_level="token", is_mode="mask", is_min=0.7, is_max=1.6),
    "sequence-truncate": RC(is_level="sequence", is_mode="truncate", is_min=1.0, is_max=1.1),
    "sequence-mask": RC(is_level="sequence", is_mode="mask", is_min=0.9, is_max=1.14),
    "seq-mask-tis": RC(is_level="token", is_min=0.8, is_max=1.25, seq_mask_min=0.9, seq_mask_max=1.14),
    "reject-k3": RC(reject_threshold=0.06),
    "reject-k1": RC(reject_estimator="k1", reject_threshold=0.13),
    "off-policy-old": RC(off_policy_threshold=-0.13),
}
DROP_METRICS = ("is_masked_tokens", "seq_masked_tokens", "rejected_tokens", "off_policy_tokens")


def counting_three_gemm(monkeypatch) -> list[int]:
    """Count calls of the three-GEMM pass made by fused_linear_grpo_loss."""
    calls = []
    real = grpo_loss_module.three_gemm_logprob_grads

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(grpo_loss_module, "three_gemm_logprob_grads", spy)
    return calls


def assert_rule_fired(metrics, rule: RolloutCorrectionConfig) -> None:
    dropped = [metrics["rollout_corr/" + k].item() for k in DROP_METRICS if "rollout_corr/" + k in metrics]
    assert all(0 < d < 1 for d in dropped), f"a rule must drop some tokens and keep others: {dropped}"
    if rule.is_level is not None and rule.is_mode == "truncate":
        assert metrics["rollout_corr/is_weight_max"] == pytest.approx(rule.is_max), "the upper bound must bind"
    assert dropped or rule.is_level is not None


@pytest.mark.parametrize("rule_name", TOKEN_LOCAL_CORRECTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_three_gemm_with_each_token_local_correction_matches_float64_reference(backend, rule_name, monkeypatch):
    rule = TOKEN_LOCAL_CORRECTIONS[rule_name]
    config = GRPOLossConfig(kl_coef=0.05, loss_agg="seq-mean-token-mean", rollout_correction=rule)
    assert config.token_local
    b = make_batch(37, 1000, 64, torch.float32, seed=3)
    calls = counting_three_gemm(monkeypatch)
    out, metrics = ours(b, config, backend, algorithm="auto", chunk_rows=16)
    assert calls, "a token-local correction must take the three-GEMM path"
    assert_matches_reference(out, reference(b, config)[0], torch.float32)
    assert_rule_fired(metrics, rule)


def test_three_gemm_tis_without_old_logp_weights_each_chunk_from_its_own_logp(monkeypatch):
    # old = logp.detach(): the weight min(exp(logp − rollout), C) is per token but not a constant
    config = GRPOLossConfig(kl_coef=0.05, tis_cap=1.1)
    b = {**make_batch(37, 1000, 64, torch.float32, seed=3), "old_logp": None}
    calls = counting_three_gemm(monkeypatch)
    out, metrics = ours(b, config, "torch", algorithm="auto", chunk_rows=16)
    assert calls
    assert_matches_reference(out, reference(b, config)[0], torch.float32)
    assert 0 < metrics["tis_weight_mean"] < 1.1


SEQUENCE_CONFIGS = {
    "gspo": GRPOLossConfig(kl_coef=0.05, ratio_level="sequence", loss_agg="seq-mean-token-mean"),
    "gspo+token-mask": GRPOLossConfig(ratio_level="sequence", rollout_correction=TOKEN_LOCAL_CORRECTIONS["token-mask"]),
    "off-policy-current": GRPOLossConfig(kl_coef=0.05, rollout_correction=RC(off_policy_threshold=-0.13,
                                                                              off_policy_logp="current")),
}


@pytest.mark.parametrize("config_name", SEQUENCE_CONFIGS)
def test_a_sequence_level_config_takes_the_four_gemm_path_and_matches(config_name, monkeypatch):
    config = SEQUENCE_CONFIGS[config_name]
    assert config.needs_sequence_logp
    b = make_batch(37, 1000, 64, torch.float32, seed=3)
    calls = counting_three_gemm(monkeypatch)
    out, _ = ours(b, config, "torch", algorithm="auto")
    assert not calls, "a loss that couples a sequence's tokens cannot be computed chunk by chunk"
    assert_matches_reference(out, reference(b, config)[0], torch.float32)
    with pytest.raises(ValueError, match=r"algorithm: 'three_gemm' needs each token's loss"):
        ours(b, config, "torch", algorithm="three_gemm")


def test_rollout_correction_without_old_logp_takes_the_four_gemm_path(monkeypatch):
    # old = the current logp, which the sequence rules read across whole sequences
    config = GRPOLossConfig(rollout_correction=TOKEN_LOCAL_CORRECTIONS["sequence-mask"])
    b = {**make_batch(37, 1000, 64, torch.float32, seed=3), "old_logp": None}
    calls = counting_three_gemm(monkeypatch)
    out, _ = ours(b, config, "torch", algorithm="auto")
    assert not calls
    assert_matches_reference(out, reference(b, config)[0], torch.float32)
