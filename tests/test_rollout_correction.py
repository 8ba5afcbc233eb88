"""Rollout correction and GSPO: `grpo_loss` against the float64 references, rule by rule.

Every rule (token/sequence importance weight × truncate/mask, rejection by k1/k3, the
off-policy sequence mask, GSPO's sequence ratio) is checked on the packed batch of
grpo_testing (ragged sequences, an empty one) with one sequence fully masked, in every
aggregation, loss and d loss / d logp, against `rollout_correction_ref` / `grpo_loss_ref`
(one sequence at a time, float64, autograd). Each case asserts that its rule actually fires
(drops or truncates something, keeps something), so a rule that silently does nothing fails.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from grpo_testing import close, fused_batch, ours_and_ref, packed_batch

from prolix.kernels import (
    GRPOLossConfig,
    RolloutCorrectionConfig,
    fused_linear_grpo_loss,
    grpo_loss,
)
from prolix.kernels.grpo_config import LOSS_AGGREGATIONS
from prolix.kernels.reference import linear_logprobs_ref, rollout_correction_ref
from prolix.kernels.rollout_correction import kept_counts, rollout_correction

LENGTHS = (5, 0, 1, 9, 3, 12, 1, 7, 6, 4)
FULLY_MASKED = 3          # the 9-token sequence: every row masked out

RULES = {
    "token-truncate": RolloutCorrectionConfig(is_level="token", is_mode="truncate", is_min=0.6, is_max=1.8),
    "token-mask": RolloutCorrectionConfig(is_level="token", is_mode="mask", is_min=0.6, is_max=1.8),
    "sequence-truncate": RolloutCorrectionConfig(is_level="sequence", is_mode="truncate", is_min=1.0, is_max=1.3),
    "sequence-mask": RolloutCorrectionConfig(is_level="sequence", is_mode="mask", is_min=0.9, is_max=1.3),
    "seq-mask-tis": RolloutCorrectionConfig(is_level="token", is_min=0.6, is_max=1.8, seq_mask_min=0.9,
                                            seq_mask_max=1.3),
    "reject-k3": RolloutCorrectionConfig(reject_threshold=0.12),
    "reject-k1": RolloutCorrectionConfig(reject_estimator="k1", reject_threshold=0.3),
    "off-policy-old": RolloutCorrectionConfig(off_policy_threshold=0.0),
    "off-policy-current": RolloutCorrectionConfig(off_policy_threshold=0.1, off_policy_logp="current"),
    "all": RolloutCorrectionConfig(is_level="token", is_mode="mask", is_min=0.5, is_max=5.0,
                                   reject_threshold=0.2, off_policy_threshold=0.05),
}


def batch(seed=0):
    """test_grpo_loss's packed batch with a fully masked sequence and a rollout policy that
    differs from the old one by a per-sequence offset (±0.3) plus per-token noise (±0.4)."""
    b = packed_batch(LENGTHS, seed=seed)
    cu = b["cu_seqlens"]
    b["mask"][cu[FULLY_MASKED]:cu[FULLY_MASKED + 1]] = False
    g = torch.Generator().manual_seed(seed + 100)
    offset = torch.repeat_interleave(0.6 * torch.rand(len(LENGTHS), generator=g, dtype=torch.float64) - 0.3,
                                     torch.tensor(LENGTHS))
    b["rollout_logp"] = b["old_logp"] + offset + 0.8 * torch.rand(offset.shape[0], generator=g,
                                                                    dtype=torch.float64) - 0.4
    return b


def assert_fires(b, rc: RolloutCorrectionConfig):
    """The rule changes something and leaves something: some response token dropped or its
    weight truncated, some kept with weight != its bound."""
    weight, keep = rollout_correction_ref(b["old_logp"], b["rollout_logp"], b["advantages"], b["mask"],
                                          b["cu_seqlens"], rc, current_logp=b["logp"])
    on = b["mask"]
    if rc.is_mode == "truncate" and rc.is_level is not None and not rc.seq_masks:
        raw, _ = rollout_correction_ref(b["old_logp"], b["rollout_logp"], b["advantages"], b["mask"],
                                        b["cu_seqlens"], dataclasses.replace(rc, is_min=None, is_max=math.inf))
        assert (raw[on] != weight[on]).any() and (raw[on] == weight[on]).any(), "truncation never/always binds"
    else:
        assert (keep[on] == 0).any() and (keep[on] == 1).any(), "the rule drops nothing or everything"


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("rule", RULES)
def test_each_rule_matches_float64_reference(rule, loss_agg):
    b = batch(seed=3)
    rc = RULES[rule]
    assert_fires(b, rc)
    config = GRPOLossConfig(kl_coef=0.1, loss_agg=loss_agg, max_len=16, rollout_correction=rc)
    (loss, grads, metrics), (ref, ref_grads, _) = ours_and_ref(b, config)
    close(loss, ref, torch.float64, "loss")
    close(grads[0], ref_grads[0], torch.float64, "d loss / d logp")
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_weight_and_keep_match_reference_in_float32(ratio_level):
    b = {k: (v.float() if v.is_floating_point() else v) for k, v in batch(seed=5).items()}
    for rc in RULES.values():
        corr = rollout_correction(b["old_logp"], b["rollout_logp"], b["advantages"], b["mask"].float(),
                                  b["cu_seqlens"], rc, current_logp=b["logp"])
        weight, keep = rollout_correction_ref(b["old_logp"], b["rollout_logp"], b["advantages"], b["mask"],
                                              b["cu_seqlens"], rc, current_logp=b["logp"])
        on = b["mask"]
        torch.testing.assert_close(corr.keep[on].double(), keep[on])
        if rc.is_level is not None:
            torch.testing.assert_close(corr.weight[on].double(), weight[on], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_gspo_sequence_ratio_matches_float64_reference(loss_agg, dual_clip):
    b = batch(seed=7)
    config = GRPOLossConfig(ratio_level="sequence", kl_coef=0.05, dual_clip=dual_clip, clip_low=0.05,
                            clip_high=0.05, loss_agg=loss_agg, max_len=16, tis_cap=1.5)
    (loss, grads, metrics), (ref, ref_grads, _) = ours_and_ref(b, config)
    close(loss, ref, torch.float64, "loss")
    close(grads[0], ref_grads[0], torch.float64, "d loss / d logp")
    assert 0 < metrics["clip_frac"] < 1, "the sequence ratio is clipped for some sequences, not all"


def test_gspo_with_rollout_correction_matches_reference():
    b = batch(seed=8)
    config = GRPOLossConfig(ratio_level="sequence", loss_agg="seq-mean-token-mean", rollout_correction=RULES["all"])
    (loss, grads, _), (ref, ref_grads, _) = ours_and_ref(b, config)
    close(loss, ref, torch.float64, "loss")
    close(grads[0], ref_grads[0], torch.float64, "d loss / d logp")


def test_gspo_equals_token_ratio_when_every_sequence_has_one_token():
    b = packed_batch((1,) * 12, seed=2)
    token, seq = (ours_and_ref(b, GRPOLossConfig(ratio_level=lvl, kl_coef=0.1))[0] for lvl in ("token", "sequence"))
    close(seq[0], token[0], torch.float64, "loss")
    close(seq[1][0], token[1][0], torch.float64, "d loss / d logp")


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("rule", ["token-mask", "sequence-mask", "reject-k3", "off-policy-old"])
def test_microbatches_with_kept_counts_sum_to_the_one_batch_gradient(rule, loss_agg):
    """Dropped tokens leave the normaliser: the global count over m·keep makes the halves add up."""
    b = batch(seed=11)
    rc = RULES[rule]
    config = GRPOLossConfig(kl_coef=0.1, entropy_coef=0.01, loss_agg=loss_agg, max_len=16, rollout_correction=rc)
    corr = rollout_correction(b["old_logp"], b["rollout_logp"], b["advantages"], b["mask"].double(),
                              b["cu_seqlens"], rc)
    tokens, seqs = kept_counts(b["mask"], corr.keep, b["cu_seqlens"])
    assert tokens < b["mask"].sum(), "the rule drops some response tokens"
    normalizer = tokens if loss_agg == "token-mean" else seqs
    full = ours_and_ref(b, config, with_entropy=True)
    close(full[0][0], full[1][0], torch.float64, "one-batch loss vs reference")
    # the local normaliser of the whole batch is the kept count
    close(ours_and_ref(b, config, normalizer, with_entropy=True)[0][0], full[0][0], torch.float64, "kept count")
    k = 5
    cut = int(b["cu_seqlens"][k])
    halves = []
    for rows, cu in ((slice(0, cut), b["cu_seqlens"][: k + 1]), (slice(cut, None), b["cu_seqlens"][k:] - cut)):
        part = {key: v[rows] for key, v in b.items() if key != "cu_seqlens"}
        halves.append(ours_and_ref({**part, "cu_seqlens": cu}, config, normalizer, with_entropy=True))
    close(halves[0][0][0] + halves[1][0][0], full[0][0], torch.float64, "summed micro-batch losses")
    close(halves[0][1][0] + halves[1][1][0], full[1][0], torch.float64, "summed reference micro-batch losses")
    for i, name in enumerate(("logp", "entropy")):
        close(torch.cat([halves[0][0][1][i], halves[1][0][1][i]]), full[0][1][i], torch.float64, f"d / d {name}")


def test_dropped_tokens_get_no_gradient_and_leave_the_token_count():
    b = batch(seed=4)
    rc = RULES["token-mask"]
    config = GRPOLossConfig(rollout_correction=rc)
    (loss, grads, metrics), _ = ours_and_ref(b, config)
    corr = rollout_correction(b["old_logp"], b["rollout_logp"], b["advantages"], b["mask"].double(),
                              b["cu_seqlens"], rc)
    dropped = b["mask"] & (corr.keep == 0)
    assert dropped.any() and (grads[0][dropped] == 0).all()
    assert metrics["num_tokens"] == (b["mask"].double() * corr.keep).sum()


# --- perturbing the rollout log-probs on purpose ---------------------------------------------


def quiet_batch():
    """Rollout log-probs equal to old ones (no mismatch); sequences 0..3 of 6 tokens, advantages
    + − + −."""
    n, lens = 24, (6, 6, 6, 6)
    cu = torch.tensor([0, 6, 12, 18, 24], dtype=torch.int32)
    old = torch.linspace(-3.0, -0.1, n, dtype=torch.float64)
    adv = torch.repeat_interleave(torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64), torch.tensor(lens))
    return dict(old=old, rollout=old.clone(), adv=adv, mask=torch.ones(n, dtype=torch.float64), cu=cu)


def corr_of(q, rc, current=None):
    return rollout_correction(q["old"], q["rollout"], q["adv"], q["mask"], q["cu"], rc, current_logp=current)


def test_no_mismatch_fires_no_rule_and_reports_zero_divergence():
    q = quiet_batch()
    corr = corr_of(q, RULES["all"])
    assert (corr.keep == 1).all() and (corr.weight == 1).all()
    for name in ("mismatch_k1", "mismatch_k3", "mismatch_k1_seq_max", "mismatch_k3_seq_max",
                 "is_masked_tokens", "rejected_seqs", "off_policy_tokens"):
        assert corr.metrics["rollout_corr/" + name] == 0, name


def test_perturbed_tokens_are_masked_by_the_token_rule_and_nothing_else():
    q = quiet_batch()
    q["rollout"][[2, 13]] -= 2.0       # w = e² > 5 on two tokens
    q["rollout"][20] += 1.0            # w = e⁻¹ < 0.5 on one
    corr = corr_of(q, RolloutCorrectionConfig(is_level="token", is_mode="mask", is_min=0.5, is_max=5.0))
    assert torch.nonzero(corr.keep == 0).flatten().tolist() == [2, 13, 20]
    assert corr.metrics["rollout_corr/is_masked_tokens"] == 3 / 24
    assert corr.metrics["rollout_corr/is_masked_seqs"] == 3 / 4
    truncated = corr_of(q, RolloutCorrectionConfig(is_level="token", is_min=0.5, is_max=5.0))
    assert (truncated.keep == 1).all() and truncated.weight[2] == 5.0 and truncated.weight[20] == 0.5


def test_perturbed_sequence_is_masked_whole_by_the_sequence_rule():
    q = quiet_batch()
    q["rollout"][6:12] -= 0.5          # sequence 1: geometric-mean weight e^0.5 = 1.65
    q["rollout"][18] -= 0.5            # one token of sequence 3: mean weight e^(0.5/6) = 1.09
    corr = corr_of(q, RolloutCorrectionConfig(is_level="sequence", is_mode="mask", is_min=0.8, is_max=1.25))
    assert torch.nonzero(corr.keep == 0).flatten().tolist() == list(range(6, 12))
    torch.testing.assert_close(corr.weight[18:24], torch.full((6,), math.exp(0.5 / 6), dtype=torch.float64))


def test_perturbed_sequence_is_dropped_by_the_sequence_mask_and_others_keep_truncated_weights():
    q = quiet_batch()
    q["rollout"][0:6] -= 2.0           # sequence 0: mean weight e² > 5, dropped whole
    q["rollout"][13] -= 3.0            # one token of sequence 2: w = e³ truncated to 5, mean e^0.5 kept
    rc = RolloutCorrectionConfig(is_level="token", is_min=0.5, is_max=5.0, seq_mask_min=0.5, seq_mask_max=5.0)
    corr = corr_of(q, rc)
    assert torch.nonzero(corr.keep == 0).flatten().tolist() == list(range(0, 6))
    assert corr.weight[13] == 5.0 and corr.metrics["rollout_corr/seq_masked_seqs"] == 0.25


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_perturbed_sequence_is_rejected_by_mismatch(estimator):
    q = quiet_batch()
    q["rollout"][0:6] += torch.tensor([0.6, -0.6, 0.6, -0.6, 0.6, -0.6], dtype=torch.float64)  # mean k1 0, k3 > 0
    q["rollout"][12:18] += 0.3                                                                 # mean k1 0.3
    corr = corr_of(q, RolloutCorrectionConfig(reject_estimator=estimator, reject_threshold=0.1))
    rejected = torch.nonzero(corr.keep == 0).flatten().tolist()
    if estimator == "k3":     # k3(±0.6) ≈ 0.19, 0.15 and k3(−0.3) ≈ 0.041: only sequence 0
        assert rejected == list(range(0, 6))
    else:                     # k1 of sequence 0 cancels to 0; sequence 2's is 0.3
        assert rejected == list(range(12, 18))
    assert corr.metrics["rollout_corr/rejected_seqs"] == 0.25


@pytest.mark.parametrize("source", ["old", "current"])
def test_off_policy_mask_drops_only_negative_advantage_sequences_that_diverged(source):
    q = quiet_batch()
    current = q["old"].clone()
    target = q["rollout"] if source == "old" else current
    # the rollout policy liked these tokens more than the trainer does: mean (rollout − x) = 0.4
    for a, b in ((0, 6), (6, 12)):     # sequence 0 has A > 0 (kept), sequence 1 A < 0 (dropped)
        if source == "old":
            target[a:b] += 0.4
        else:
            target[a:b] -= 0.4
    q["rollout"][18:24] += 0.05 if source == "old" else 0.0   # A < 0 but below δ: kept
    rc = RolloutCorrectionConfig(off_policy_threshold=0.1, off_policy_logp=source)
    corr = corr_of(q, rc, current=current)
    assert torch.nonzero(corr.keep == 0).flatten().tolist() == list(range(6, 12))
    assert corr.metrics["rollout_corr/off_policy_seqs"] == 0.25


def test_metrics_match_direct_computation():
    b = batch(seed=9)
    rc = RULES["all"]
    _, _, metrics = ours_and_ref(b, GRPOLossConfig(rollout_correction=rc))[0]
    m = b["mask"]
    lam = (b["old_logp"] - b["rollout_logp"])
    k3 = lam.exp() - 1 - lam
    close(metrics["rollout_corr/mismatch_k1"], (-lam)[m].mean(), torch.float64, "mismatch_k1")
    close(metrics["rollout_corr/mismatch_k3"], k3[m].mean(), torch.float64, "mismatch_k3")
    seq_k3 = [k3[a:e][m[a:e]].mean() for a, e in zip(b["cu_seqlens"][:-1], b["cu_seqlens"][1:]) if m[a:e].any()]
    close(metrics["rollout_corr/mismatch_k3_seq_max"], torch.stack(seq_k3).max(), torch.float64, "k3 seq max")
    weight, _ = rollout_correction_ref(b["old_logp"], b["rollout_logp"], b["advantages"], m, b["cu_seqlens"], rc)
    close(metrics["rollout_corr/is_weight_max"], weight[m].max(), torch.float64, "is_weight_max")
    close(metrics["rollout_corr/is_weight_min"], weight[m].min(), torch.float64, "is_weight_min")


# --- the fused path, flags and validation ----------------------------------------------------


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_fused_loss_with_correction_equals_grpo_loss_on_reference_logprobs(ratio_level):
    b = fused_batch(40, 96, 32, torch.float32, seed=1)
    rollout = b["old_logp"] + 0.4 * torch.randn(40, generator=torch.Generator().manual_seed(0))
    config = GRPOLossConfig(kl_coef=0.05, ratio_level=ratio_level, loss_agg="seq-mean-token-mean",
                            rollout_correction=RULES["all"])
    kw = dict(old_logp=b["old_logp"], ref_logp=b["ref_logp"], rollout_logp=rollout, cu_seqlens=b["cu_seqlens"],
              config=config)
    loss, metrics = fused_linear_grpo_loss(b["hidden"], b["weight"], b["targets"], b["advantages"], b["mask"],
                                           ignore_index=-100, backend="torch", **kw)
    logp, _ = linear_logprobs_ref(b["hidden"], b["weight"], b["targets"])
    ref, ref_metrics = grpo_loss(logp.float(), b["advantages"], b["mask"], **kw)
    close(loss, ref, torch.float32, "loss")
    assert metrics.keys() == ref_metrics.keys()


def test_sequence_dependent_configs_are_flagged_for_the_fused_path():
    assert GRPOLossConfig().token_local
    assert GRPOLossConfig(rollout_correction=RULES["all"]).token_local
    assert GRPOLossConfig(ratio_level="sequence").needs_sequence_logp
    assert GRPOLossConfig(rollout_correction=RULES["off-policy-current"]).needs_sequence_logp


@pytest.mark.parametrize("kw, pattern", [
    (dict(is_level="tok", is_max=2.0), r"is_level must be None or one of"),
    (dict(is_level="token"), r"needs is_min or is_max"),
    (dict(is_level="token", is_mode="clip", is_max=2.0), r"is_mode must be one of"),
    (dict(is_level="token", is_min=3.0, is_max=2.0), r"is_min must be <= is_max"),
    (dict(is_level="token", is_max=0.0), r"is_max must be > 0"),
    (dict(seq_mask_min=2.0, seq_mask_max=1.0), r"seq_mask_min must be <= seq_mask_max"),
    (dict(seq_mask_max=0.0), r"seq_mask_max must be > 0"),
    (dict(reject_estimator="k2", reject_threshold=0.1), r"reject_estimator must be one of"),
    (dict(reject_threshold=-1.0), r"reject_threshold must be >= 0"),
    (dict(off_policy_threshold=math.nan), r"off_policy_threshold must be a finite number"),
    (dict(off_policy_threshold=0.1, off_policy_logp="new"), r"off_policy_logp must be one of"),
])
def test_bad_correction_config_is_rejected(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        RolloutCorrectionConfig(**kw)


def test_bad_loss_options_are_rejected_before_any_computation():
    with pytest.raises(ValueError, match=r"ratio_level must be one of"):
        GRPOLossConfig(ratio_level="seq")
    with pytest.raises(ValueError, match=r"tis_cap=2.0 and rollout_correction.is_level"):
        GRPOLossConfig(tis_cap=2.0, rollout_correction=RolloutCorrectionConfig(is_level="token", is_max=2.0))
    b = batch()
    rc = GRPOLossConfig(rollout_correction=RULES["reject-k3"])
    with pytest.raises(ValueError, match=r"rollout_logp: required when config.rollout_correction"):
        grpo_loss(b["logp"], b["advantages"], b["mask"], cu_seqlens=b["cu_seqlens"], config=rc)
    with pytest.raises(ValueError, match=r"cu_seqlens: required by ratio_level='sequence' and by rollout_corr"):
        grpo_loss(b["logp"], b["advantages"], b["mask"], rollout_logp=b["rollout_logp"], config=rc)
    with pytest.raises(ValueError, match=r"cu_seqlens: required by ratio_level='sequence'"):
        grpo_loss(b["logp"], b["advantages"], b["mask"], config=GRPOLossConfig(ratio_level="sequence"))
