"""Checkpoints: a resumed run continues the same trajectory as an uninterrupted one, a kill
in the middle of writing a checkpoint leaves the previous one whole, and old ones rotate.

"Same trajectory" is checked bit for bit: the policy after N steps straight equals the policy
after N/2 steps, a resume, and N/2 more (same prompts, same sampling seeds, same AdamW state),
and the per-step metrics after the resume match the uninterrupted run's.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prolix.trainer import checkpoint
from prolix.trainer.train import main as train_main
from test_loop import TESTS, base_model, one_thread, problems, read_jsonl, tiny_overrides  # noqa: F401  (fixtures)

COMPARED = ("reward/mean", "pass_rate", "response_len/mean", "loss", "pg_loss", "kl", "entropy", "grad_norm",
            "ratio_mean", "batch/groups", "batch/tries")


def weights(ckpt):
    return load_file(str(ckpt / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs between {a} and {b}"


def assert_same_metrics(run_a, run_b, steps):
    a = {r["step"]: r for r in read_jsonl(run_a / "metrics.jsonl")}
    b = {r["step"]: r for r in read_jsonl(run_b / "metrics.jsonl")}
    assert sorted(a) == sorted(b)
    for step in steps:
        for key in COMPARED:
            assert a[step].get(key) == b[step].get(key), (step, key, a[step].get(key), b[step].get(key))


@pytest.fixture(scope="module")
def straight(base_model, problems, tmp_path_factory):   # noqa: F811
    """The uninterrupted reference run: 4 steps, a checkpoint after every step, keep the last 2."""
    out = tmp_path_factory.mktemp("straight")
    assert train_main(tiny_overrides(base_model, problems, out, **{"run.checkpoint_every": 1,
                                                                   "run.keep_last": 2})) == 0
    return out / "run"


def test_old_checkpoints_rotate_and_latest_names_the_newest(straight):
    root = straight / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000003", "step_000004"]
    assert (root / "latest").read_text().strip() == "step_000004"
    state = json.loads((root / "step_000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["sampler"] is not None and state["first_eval"] is not None


def test_resume_continues_the_same_trajectory(straight, base_model, problems, tmp_path):   # noqa: F811
    halves = tiny_overrides(base_model, problems, tmp_path, **{"run.steps": 2, "run.checkpoint_every": 1})
    assert train_main(halves) == 0
    run = tmp_path / "run"
    assert train_main(["--resume", str(run), "run.steps=4"]) == 0
    assert_same_weights(straight / "checkpoints" / "step_000004", run / "checkpoints" / "step_000004")
    assert_same_metrics(straight, run, steps=(1, 2, 3, 4))
    # the reference and the optimizer state travel too
    ref_a = load_file(str(straight / "checkpoints" / "step_000004" / "reference.safetensors"))
    ref_b = load_file(str(run / "checkpoints" / "step_000004" / "reference.safetensors"))
    assert all(torch.equal(ref_a[k], ref_b[k]) for k in ref_a)


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from prolix.trainer import checkpoint
    from prolix.trainer.train import main

    real, calls = checkpoint.capture_rng, []
    def capture_rng_then_die():          # called after the weights, reference and optimizer are written
        calls.append(1)
        if len(calls) == {die_at}:
            os.kill(os.getpid(), signal.SIGKILL)
        return real()
    checkpoint.capture_rng = capture_rng_then_die
    sys.exit(main({argv!r}))
""")


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one_whole(straight, base_model, problems,  # noqa: F811
                                                                      tmp_path):
    argv = tiny_overrides(base_model, problems, tmp_path, **{"run.checkpoint_every": 1, "run.keep_last": 2})
    script = KILLER.format(tests=str(TESTS), die_at=3, argv=argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "run"
    root = run / "checkpoints"
    partial = [p for p in root.iterdir() if p.name.startswith(".tmp-step_000003")]
    assert partial and (partial[0] / "model.safetensors").exists()       # died mid-write
    assert (root / "latest").read_text().strip() == "step_000002"
    assert checkpoint.latest_checkpoint(run) == root / "step_000002"
    AutoModelForCausalLM.from_pretrained(root / "step_000002")            # whole and loadable
    # resuming sweeps the partial folder and ends where the uninterrupted run ended
    assert train_main(["--resume", str(run)]) == 0
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    assert_same_weights(straight / "checkpoints" / "step_000004", root / "step_000004")
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3, 4]   # killed step 3 re-logged once
    assert_same_metrics(straight, run, steps=(3, 4))


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train_main(["--resume", str(tmp_path / "empty")]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_rng_state_round_trips():
    import random

    import numpy as np

    state = checkpoint.capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
