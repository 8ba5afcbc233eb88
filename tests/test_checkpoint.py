"""Checkpoints: a resumed run continues the same trajectory as an uninterrupted one, a kill
in the middle of writing a checkpoint leaves the previous one whole, old ones rotate, and a
damaged checkpoint is caught by its manifest (and passed over by `--resume RUN`).

"Same trajectory" is checked bit for bit: the policy after N steps straight equals the policy
after N/2 steps, a resume, and N/2 more (same prompts, same sampling seeds, same AdamW state),
and the per-step metrics after the resume match the uninterrupted run's; the step right after
a resume draws the same prompts and samples the same tokens with the same log-probs.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_testing import TESTS, make_trainer, read_jsonl, tiny_overrides
from transformers import AutoModelForCausalLM

from prolix.trainer import checkpoint
from prolix.trainer.loop import Trainer
from prolix.trainer.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

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
def straight(base_model, problems, tmp_path_factory):
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


def test_resume_continues_the_same_trajectory(straight, base_model, problems, tmp_path):
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


def run_recorded_step(trainer: Trainer) -> tuple[list, dict]:
    """One train_step, returning the groups it trained on (every rollout it kept) and its metrics."""
    seen, collect = [], trainer.collect_groups

    def collect_and_record(step):
        groups, metrics = collect(step)
        seen.extend(groups)
        return groups, metrics

    trainer.collect_groups = collect_and_record
    metrics = trainer.train_step()
    rollouts = [(g.problem.prompt, [(c.response_ids, c.response_logprobs, c.finished) for c in g.completions],
                 g.rewards.tolist(), g.advantages.tolist()) for g in seen]
    return rollouts, metrics


def test_a_resumed_trainer_samples_and_trains_exactly_the_next_step(base_model, problems, tmp_path):
    # trainer `a` is the uninterrupted run; `b` resumes from a's checkpoint after step 2
    (tmp_path / "a").mkdir()
    a = make_trainer(base_model, problems, tmp_path / "a")
    a.train_step()
    a.train_step()
    ckpt = a.save()
    global_rng = checkpoint.capture_rng()          # what an uninterrupted process would go on with
    (tmp_path / "b").mkdir()
    b = Trainer(a.cfg, tmp_path / "b", resume_from=ckpt)
    rollouts_b, metrics_b = run_recorded_step(b)
    checkpoint.restore_rng(global_rng)             # b's construction and step used the shared global RNG
    rollouts_a, metrics_a = run_recorded_step(a)
    assert a.state.step == b.state.step == 3
    # the same prompts, every sampled token, its log-prob, the rewards and advantages of step 3
    assert rollouts_b == rollouts_a and len(rollouts_a) == metrics_a["batch/groups"] > 0
    assert {k: v for k, v in metrics_b.items() if not k.startswith("perf/")} == \
        {k: v for k, v in metrics_a.items() if not k.startswith("perf/")}
    for (name, p), q in zip(a.policy.state_dict().items(), b.policy.state_dict().values()):
        assert torch.equal(p, q), name


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from prolix.trainer.checkpoint import store as checkpoint
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


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one_whole(straight, base_model, problems,
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


# ----------------------------------------------------------------------------- manifest


def test_every_checkpoint_carries_a_manifest_of_its_files(straight):
    ckpt = straight / "checkpoints" / "step_000004"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["step"] == 4
    listed = {e["path"]: e for e in manifest["files"]}
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk
    assert {"config.json", "model.safetensors", "reference.safetensors", "optimizer.pt", "rng.pt",
            "trainer_state.json", "tokenizer.json"} <= on_disk
    for rel, entry in listed.items():
        data = (ckpt / rel).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest(), rel
    assert checkpoint.verify_checkpoint(ckpt) == manifest


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01                         # mid-file: tensor data, not the header
    path.write_bytes(bytes(data))


def damage(ckpt, how: str) -> None:
    action, name = how.split()
    path = ckpt / name
    if action == "flip":
        flip_byte(path)
    elif action == "delete":
        path.unlink()
    elif action == "truncate":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    elif action == "garble":
        path.write_text("{not json")


@pytest.mark.parametrize("how, message", [
    ("flip model.safetensors", r"model.safetensors is corrupted \(its sha256 differs"),
    ("flip trainer_state.json", r"trainer_state.json is corrupted"),
    ("delete optimizer.pt", r"optimizer.pt is missing \(listed in manifest.json\)"),
    ("truncate reference.safetensors", r"reference.safetensors has \d+ bytes, manifest.json recorded \d+"),
    ("delete manifest.json", r"no manifest.json"),
    ("garble manifest.json", r"manifest.json is unreadable"),
])
def test_a_damaged_checkpoint_fails_verification_naming_it_and_the_file(straight, tmp_path, how, message):
    ckpt = Path(shutil.copytree(straight / "checkpoints" / "step_000004", tmp_path / "step_000004"))
    damage(ckpt, how)
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint {re.escape(str(ckpt))}: {message}"):
        checkpoint.verify_checkpoint(ckpt)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load_checkpoint(ckpt, optimizer=None, reference=None, restore_rng_state=False)


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(straight, tmp_path, capsys):
    run = Path(shutil.copytree(straight, tmp_path / "run"))
    root = run / "checkpoints"
    flip_byte(root / "step_000004" / "model.safetensors")
    assert checkpoint.resolve_checkpoint(run) == (run, root / "step_000003")
    err = capsys.readouterr().err
    assert "step_000004: model.safetensors is corrupted" in err and "resuming from step_000003 instead" in err
    # the resumed run redoes step 4 and replaces the damaged checkpoint by the one the uninterrupted run wrote
    assert train_main(["--resume", str(run)]) == 0
    assert "resuming from step_000003 instead" in capsys.readouterr().err
    checkpoint.verify_checkpoint(root / "step_000004")
    assert_same_weights(straight / "checkpoints" / "step_000004", root / "step_000004")
    assert_same_metrics(straight, run, steps=(4,))


def test_resume_when_no_checkpoint_verifies_is_a_clear_error(straight, tmp_path, capsys):
    run = Path(shutil.copytree(straight, tmp_path / "run"))
    root = run / "checkpoints"
    (root / "step_000004" / "optimizer.pt").unlink()
    (root / "step_000003" / "manifest.json").unlink()
    assert train_main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"prolix train: error: --resume: no checkpoint of {run} passes "
                                               "verification")
    assert "step_000004: optimizer.pt is missing" in err[0] and "step_000003: no manifest.json" in err[0]
    # a checkpoint named on the command line is used as it is, or not at all
    assert train_main(["--resume", str(root / "step_000004")]) == 2
    assert "step_000004: optimizer.pt is missing" in capsys.readouterr().err


def test_resume_under_another_thread_count_warns_in_one_line(straight, tmp_path, capsys):
    run = Path(shutil.copytree(straight, tmp_path / "run"))
    state = json.loads((run / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state["torch_threads"] == torch.get_num_threads() == 1          # recorded with the run (one_thread)
    assert train_main(["--resume", str(run), "run.steps=5"]) == 0
    assert "thread" not in capsys.readouterr().err                         # same count: nothing to say
    torch.set_num_threads(2)
    try:
        assert train_main(["--resume", str(run), "run.steps=6"]) == 0
    finally:
        torch.set_num_threads(1)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "CPU threads" in line]
    assert warnings == ["prolix: warning: step_000005 was written computing on 1 CPU threads, this process has 2 "
                        "(OMP_NUM_THREADS): the resumed run will not be bit-identical to an uninterrupted one"]


OLD_RUN = TESTS / "fixtures" / "old_run"       # written by tests/fixtures/make_old_checkpoint.py


def test_a_checkpoint_written_by_an_older_prolix_resumes_and_continues_its_trajectory(tmp_path):
    """The checkpoint (and config.yaml, with the flat loss keys of that version) of a run saved by
    the commit in old_run/COMMIT resumes with today's code, and its next step is the one the
    old code took: same rollouts, rewards, loss and gradient norm."""
    run = Path(shutil.copytree(OLD_RUN, tmp_path / "run", ignore=shutil.ignore_patterns("metrics.jsonl")))
    written_at = re.search(r"path: (\S+)/base_model", (run / "config.yaml").read_text()).group(1)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(written_at, str(run)))
    assert train_main(["--resume", str(run), "run.steps=3"]) == 0
    old = {r["step"]: r for r in read_jsonl(OLD_RUN / "metrics.jsonl")}
    new = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl")}
    compared = [k for k in old[3] if k != "time" and not k.startswith("perf/")]
    assert {"reward/mean", "loss", "kl", "grad_norm", "eval/score"} <= set(compared)
    # the same rollouts and rewards exactly; the loss terms and gradient norm to fp32 rounding, since
    # the default fused loss (three GEMMs) sums them in another order than the old code's four-GEMM one
    assert {k: new[3].get(k) for k in compared} == pytest.approx({k: old[3][k] for k in compared}, rel=1e-5)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"
