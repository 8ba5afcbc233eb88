"""The trainer's `algorithm.loss.rollout_correction` section (and GSPO's `algorithm.loss.ratio_level`):
a few steps of the tiny CPU loop (torch sampler) with each correction on, and a rollout whose
engine log-probs are perturbed on purpose so that each rule fires on exactly the sequences it
should.

The torch sampler computes its log-probs with the trainer's own weights, so an unperturbed
run has a mismatch near fp32 rounding: the rules are configured to be live but mostly quiet,
and the perturbation test makes them fire.
"""

import dataclasses
import math

import pytest
import torch
import yaml
from trainer_testing import TESTS, make_trainer, tiny_overrides

from prolix.kernels import RolloutCorrectionConfig
from prolix.trainer.config import ConfigError, config_from_dict, load_config

RC = "algorithm.loss.rollout_correction."
CORRECTIONS = {
    "token-truncate": {RC + "is_level": "token", RC + "is_max": 2.0},
    "token-mask": {RC + "is_level": "token", RC + "is_mode": "mask", RC + "is_min": 0.5, RC + "is_max": 5.0},
    "sequence-mask": {RC + "is_level": "sequence", RC + "is_mode": "mask", RC + "is_min": 0.5, RC + "is_max": 5.0},
    "prorl-v2": {RC + "is_level": "token", RC + "is_min": 0.5, RC + "is_max": 5.0, RC + "seq_mask_min": 0.5,
                 RC + "seq_mask_max": 5.0},
    "reject-k3": {RC + "reject_threshold": 0.01},
    "reject-k1": {RC + "reject_estimator": "k1", RC + "reject_threshold": 0.01},
    "off-policy": {RC + "off_policy_threshold": 0.01},
    "gspo": {"algorithm.loss.ratio_level": "sequence"},
}


@pytest.mark.parametrize("name", CORRECTIONS)
def test_two_steps_with_each_correction_keep_finite_metrics(base_model, problems, tmp_path, name):
    trainer = make_trainer(base_model, problems, tmp_path, **CORRECTIONS[name])
    for _ in range(2):
        metrics = trainer.train_step()
        assert metrics["updates"] == 2 and metrics["skipped_update"] == 0
        for key, value in metrics.items():
            assert not isinstance(value, float) or math.isfinite(value), (key, value)
    if name != "gspo":
        assert 0 <= metrics["rollout_corr/mismatch_k3"] < 1e-3      # the sampler uses the trainer's weights


def _perturbed_records(trainer, shift_first: float, shift_rest: float = 0.0):
    """One rollout's records with the engine log-probs of the first sequence shifted by
    `shift_first` (the others by `shift_rest`), old and ref log-probs attached."""
    groups, _ = trainer.collect_groups(step=1)
    records = [dataclasses.replace(r, rollout_logp=[v + (shift_first if i == 0 else shift_rest) for v in r.rollout_logp])
               for i, r in enumerate(trainer.make_records(groups))]
    return trainer.attach_logps(records)


@pytest.mark.parametrize("rule", ["reject-k3", "sequence-mask", "prorl-v2"])
def test_a_perturbed_sequence_is_dropped_from_the_update(base_model, problems, tmp_path, rule):
    trainer = make_trainer(base_model, problems, tmp_path, **CORRECTIONS[rule])
    records = _perturbed_records(trainer, shift_first=-3.0)     # π_old/π_rollout = e³ on every token
    stats = trainer.update(records, step=1)
    key = {"reject-k3": "rejected_seqs", "sequence-mask": "is_masked_seqs", "prorl-v2": "seq_masked_seqs"}[rule]
    assert stats["rollout_corr/" + key] == pytest.approx(1 / len(records))
    assert stats["rollout_corr/mismatch_k3_seq_max"] > 10


def test_off_policy_mask_drops_only_negative_advantage_sequences(base_model, problems, tmp_path):
    trainer = make_trainer(base_model, problems, tmp_path, **CORRECTIONS["off-policy"])
    records = _perturbed_records(trainer, shift_first=1.0, shift_rest=1.0)   # every sequence diverged
    stats = trainer.update(records, step=1)
    negative = sum(r.advantage < 0 for r in records)
    assert 0 < negative < len(records)
    assert stats["rollout_corr/off_policy_seqs"] == pytest.approx(negative / len(records))


def test_when_every_sequence_is_dropped_the_update_changes_nothing(base_model, problems, tmp_path):
    # no weight decay: AdamW's decay moves the weights even with a zero gradient
    trainer = make_trainer(base_model, problems, tmp_path, **CORRECTIONS["reject-k3"], **{"optim.weight_decay": 0})
    records = _perturbed_records(trainer, shift_first=-3.0, shift_rest=-3.0)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    stats = trainer.update(records, step=1)
    assert stats["rollout_corr/rejected_seqs"] == 1.0 and stats["loss"] == 0.0 and stats["grad_norm"] == 0.0
    for p, q in zip(trainer.policy.parameters(), before):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_rollout_correction_is_off_by_default_and_validated(base_model, problems, tmp_path):
    cfg = load_config(None, tiny_overrides(base_model, problems, tmp_path))
    assert cfg.loss_config().rollout_correction is None and cfg.loss_config().ratio_level == "token"
    with pytest.raises(ConfigError, match=r"algorithm.loss.rollout_correction: is_level='token' needs is_min or is_max"):
        load_config(None, tiny_overrides(base_model, problems, tmp_path, **{RC + "is_level": "token"}))
    with pytest.raises(ConfigError, match=r"algorithm.loss: tis_cap=2.0 and rollout_correction.is_level='token'"):
        load_config(None, tiny_overrides(base_model, problems, tmp_path, **{
            RC + "is_level": "token", RC + "is_max": 2.0, "algorithm.loss.tis_cap": 2.0}))
    # the trainer counts its normaliser before the loss, from old_logp: no current-policy mask
    with pytest.raises(ConfigError, match=r"algorithm.loss.rollout_correction.off_policy_logp: expected 'old'"):
        load_config(None, tiny_overrides(base_model, problems, tmp_path, **{
            RC + "off_policy_threshold": 0.1, RC + "off_policy_logp": "current"}))


def test_prorl_v2_example_section_is_the_seq_mask_tis_correction():
    tree = yaml.safe_load((TESTS.parent / "examples" / "prorl_v2_scheduled_resets.yaml").read_text())
    section = tree["algorithm"]["loss"]["rollout_correction"]
    assert config_from_dict(RolloutCorrectionConfig, section) == RolloutCorrectionConfig(
        is_level="token", is_mode="truncate", is_min=0.5, is_max=5.0, seq_mask_min=0.5, seq_mask_max=5.0)
