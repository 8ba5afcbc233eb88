"""Numerical guards: a non-finite loss or gradient skips the update and leaves the weights and
AdamW's state as they were; the run goes on; optim.max_consecutive_skips skipped steps in a row
stop it before anything is checkpointed, so `latest` still names the last good checkpoint.

NaN is injected where it arises in practice: in the loss (a poisoned `Trainer._loss`, as an
overflowing logit or a 0/0 normaliser would give) and in a gradient (a hook on one parameter,
as an overflowing backward would give), with the model itself untouched.
"""

import json

import pytest
import torch
from trainer_testing import make_trainer, read_jsonl, tiny_overrides
from transformers import AutoModelForCausalLM

from prolix.trainer import checkpoint
from prolix.trainer.config import ConfigError, load_config
from prolix.trainer.loop import Trainer
from prolix.trainer.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

NAN = float("nan")


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.policy.state_dict().items()}


def assert_weights_equal(trainer: Trainer, before: dict[str, torch.Tensor]) -> None:
    for k, v in trainer.policy.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed during a skipped step"


def poison_loss(monkeypatch, should_poison) -> list[int]:
    """Make `Trainer._loss` return NaN when should_poison(trainer, call) is true; returns a list
    that records each backward that reached a poisoned loss (it must stay empty)."""
    real, calls, backwards = Trainer._loss, [0], []

    def poisoned(self, batch, normalizer):
        loss, m = real(self, batch, normalizer)
        calls[0] += 1
        if should_poison(self, calls[0]):
            loss = loss * NAN
            loss.register_hook(lambda grad: backwards.append(calls[0]))
        return loss, m

    monkeypatch.setattr(Trainer, "_loss", poisoned)
    return backwards


def test_a_nan_loss_skips_the_update_before_its_backward_and_the_run_goes_on(
        base_model, problems, tmp_path, monkeypatch, capsys):
    trainer = make_trainer(base_model, problems, tmp_path)
    before = snapshot(trainer)
    backwards = poison_loss(monkeypatch, lambda t, call: t.state.step + 1 == 1)

    metrics = trainer.train_step()                                   # step 1: every update poisoned
    assert metrics["skipped_update"] == metrics["updates"] == 2
    assert metrics["consecutive_skips"] == 1 and trainer.state.consecutive_skips == 1
    assert backwards == []                                           # no backward through the NaN
    assert_weights_equal(trainer, before)
    assert len(trainer.optimizer.state) == 0                         # AdamW never stepped
    out = capsys.readouterr().out
    assert "step 1: warning: non-finite loss (nan); update skipped, weights unchanged" in out
    assert "step 1: warning: no update applied; 1 consecutive skipped step(s)" in out

    # the skip counter travels with the checkpoint
    ckpt = trainer.save()
    assert json.loads((ckpt / "trainer_state.json").read_text())["consecutive_skips"] == 1

    metrics = trainer.train_step()                                   # step 2: healthy again
    assert metrics["skipped_update"] == 0 and trainer.state.consecutive_skips == 0
    assert any(not torch.equal(v, before[k]) for k, v in trainer.policy.state_dict().items())

    (tmp_path / "resumed").mkdir()
    resumed = Trainer(trainer.cfg, tmp_path / "resumed", resume_from=ckpt)
    assert resumed.state.consecutive_skips == 1 and resumed.state.step == 1


def test_a_step_with_one_applied_update_is_not_a_skipped_step(
        base_model, problems, tmp_path, monkeypatch):
    trainer = make_trainer(base_model, problems, tmp_path)
    trainer.state.consecutive_skips = 2
    poison_loss(monkeypatch, lambda t, call: call == 1)               # the first update's first micro-batch
    metrics = trainer.train_step()
    assert metrics["updates"] == 2 and metrics["skipped_update"] == 1
    assert trainer.state.consecutive_skips == 0                      # progress was made: the count restarts
    # the skipped update has no loss-term metrics of its own; the step's are the applied update's
    for key in ("pg_loss", "kl", "entropy", "ratio_mean"):
        assert torch.isfinite(torch.tensor(metrics[key])), key


def test_a_nan_gradient_skips_the_update_and_leaves_weights_and_adamw_alone(
        base_model, problems, tmp_path):
    trainer = make_trainer(base_model, problems, tmp_path)
    trainer.train_step()                                             # AdamW has moments now
    before = snapshot(trainer)
    moments = {k: {n: t.clone() for n, t in s.items()} for k, s in enumerate(trainer.optimizer.state.values())}
    param = next(trainer.policy.parameters())
    hook = param.register_hook(lambda grad: grad * NAN)
    metrics = trainer.train_step()
    hook.remove()
    assert metrics["skipped_update"] == 2 and trainer.state.consecutive_skips == 1
    assert metrics["grad_norm"] != metrics["grad_norm"]             # NaN, logged as null
    assert_weights_equal(trainer, before)                           # weight decay not applied either
    for k, s in enumerate(trainer.optimizer.state.values()):
        for n, t in s.items():
            assert torch.equal(t, moments[k][n]), (k, n)
    trainer.train_step()
    assert trainer.state.consecutive_skips == 0


def test_consecutive_skipped_steps_stop_the_run_and_latest_stays_the_last_good_checkpoint(
        base_model, problems, tmp_path, monkeypatch, capsys):
    # steps 1-4 train, step 4 is checkpointed; from step 5 every loss is NaN: steps 5, 6, 7
    # are skipped and the run stops at 7, before the checkpoint step 8 would write
    poison_loss(monkeypatch, lambda t, call: t.state.step + 1 >= 5)
    argv = tiny_overrides(base_model, problems, tmp_path, **{"run.steps": 8, "run.checkpoint_every": 4,
                                                             "optim.max_consecutive_skips": 3})
    assert train_main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prolix train: error: step 7: 3 consecutive steps without a "
                                               "finite update (optim.max_consecutive_skips=3)")
    assert err[0].endswith("step_000004")
    run = tmp_path / "run"
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004"]       # nothing of steps 5-7
    assert (root / "latest").read_text().strip() == "step_000004"
    records = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl")}
    assert [records[s]["consecutive_skips"] for s in (4, 5, 6)] == [0, 1, 2]      # step 7 raised before logging
    # the last good checkpoint verifies and loads, and a resume starts from it
    checkpoint.verify_checkpoint(root / "step_000004")
    AutoModelForCausalLM.from_pretrained(root / "step_000004")
    monkeypatch.undo()
    assert train_main(["--resume", str(run)]) == 0
    assert (root / "latest").read_text().strip() == "step_000008"


def test_max_consecutive_skips_is_validated(base_model, problems, tmp_path):
    with pytest.raises(ConfigError, match=r"optim.max_consecutive_skips: expected >= 1, got 0"):
        load_config(None, tiny_overrides(base_model, problems, tmp_path, **{"optim.max_consecutive_skips": 0}))
