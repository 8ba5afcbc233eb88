"""Metric sinks (trainer/sinks.py): every record metrics.jsonl gets also reaches TensorBoard and
Weights & Biases, and a sink that fails costs one warning line, never the run.

The W&B run is read back from its offline `.wandb` file with wandb's own reader
(`wandb leet inspect --json`, one record per line). Each real W&B run starts wandb's service
process (about 1-2 s), so the real-wandb tests are two, each in a fresh interpreter: the demo
with a resume, and a login failure (test_distributed.py adds the two-rank run). The sink's own logic (resume id, steps a killed run already sent, what it sends) is
checked against a stand-in `wandb` module, in milliseconds.
"""

import json
import os
import subprocess
import sys
import types

import pytest
from trainer_testing import SMALL_DEMO, as_jsonl_record, offline_runs, wandb_importable

from prolix.trainer import sinks
from prolix.trainer.config import ConfigError, load_config
from prolix.trainer.metrics import METRICS_FILE, MetricsLogger, SilentLogger, read_metrics


@pytest.fixture
def wandb_env(tmp_path) -> dict[str, str]:
    """The environment of a fresh interpreter that runs W&B: offline, settings and caches in
    tmp_path (never ~), no WANDB_DIR (the sink then puts its files in the run directory).

    Real W&B runs happen in a subprocess, never in the pytest process: wandb reads the
    environment once per process, and one in-process W&B start (even a failed one) makes the
    gc-tracked objects of a later test_soak.py in the same session jump by ~170 once mid-run
    (the cause inside wandb is unknown)."""
    if not wandb_importable():
        pytest.skip("wandb is not installed")
    home = tmp_path / "wandb_home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_CONSOLE")}
    env.update(WANDB_MODE="offline", HOME=str(home),                     # no ~/.netrc login either
               **{var: str(home) for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")})
    return env


def run_python(code: str, env: dict[str, str]) -> str:
    """Run `code` in a fresh interpreter; its stdout (the test fails with its stderr if it fails)."""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"the subprocess exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc.stdout


# ----------------------------------------------------------------------------- real wandb


def test_demo_logs_every_jsonl_record_to_offline_wandb_and_a_resume_appends_to_the_same_run(tmp_path, wandb_env):
    pytest.importorskip("reasoning_gym")
    run = tmp_path / "demo"
    first = [f"run.out_dir={tmp_path}", "run.name=demo", *SMALL_DEMO, "run.steps=2", "run.wandb=true",
             "run.wandb_tags=[ci, tiny]"]
    out = run_python("from prolix.trainer.train import main\n"
                     f"assert main({first!r}) == 0\n"
                     f"assert main({['--resume', str(run), 'run.steps=3']!r}) == 0\n", wandb_env)
    assert "metrics sink" not in out

    jsonl = read_metrics(run)
    assert [r["step"] for r in jsonl] == [0, 1, 2, 3]
    (first, first_items), (resumed, resumed_items) = offline_runs(run)       # exactly two segments
    run_id = json.loads((run / sinks.WANDB_STATE_FILE).read_text())["id"]
    assert first["run_id"] == resumed["run_id"] == run_id
    # the same keys and values at every step, the resumed segment carrying on where the first stopped
    assert [as_jsonl_record(i) for i in first_items + resumed_items] == jsonl
    assert [i["_step"] for i in resumed_items] == [3]
    assert first["display_name"] == "demo" and first["project"] == "prolix" and first["tags"] == ["ci", "tiny"]
    config = first["config"]["update"]
    assert config["rollout"]["n"] == 2 and config["run"]["wandb"] is True and config["run"]["steps"] == 2
    assert config["git_commit"] == sinks.git_commit() and config["run_dir"] == str(run)
    assert resumed["config"]["update"]["run"]["steps"] == 3                # the resume's resolved config


def test_wandb_not_logged_in_is_one_warning_and_the_run_goes_on(tmp_path, wandb_env):
    """Online mode without an API key: wandb refuses to start (no prompt without a terminal)."""
    out = run_python(
        "from prolix.trainer.config import load_config\n"
        "from prolix.trainer.metrics import MetricsLogger\n"
        f"log = MetricsLogger({str(tmp_path)!r}, total_steps=2, progress=False, tensorboard=False,\n"
        "                    config=load_config(None, ['run.wandb=true']))\n"
        "log.log(1, {'loss': 0.5})\n"
        "log.close(plot=False)\n", {**wandb_env, "WANDB_MODE": "online"})
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: metrics sink 'wandb' did not start (UsageError: "), lines
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]


# ----------------------------------------------------------------------------- without wandb


def _config(**run):
    return load_config(None, [f"run.{k}={v}" for k, v in run.items()])


def test_wandb_missing_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)                # `import wandb` now fails
    log = MetricsLogger(tmp_path, total_steps=2, progress=False, tensorboard=False, config=_config(wandb=True))
    log.log(1, {"loss": 0.5})
    log.log(2, {"loss": float("nan")})
    log.close(plot=False)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: metrics sink 'wandb' did not start (ModuleNotFoundError: "), lines
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": None}]


class _Recorder:
    """A sink that keeps what it got and fails on a chosen step."""

    name = "recorder"
    fail_at: int | None = None
    instances: list = []

    @staticmethod
    def wanted(ctx):
        return True

    def __init__(self, ctx):
        self.records, self.closed = [], False
        _Recorder.instances.append(self)

    def log(self, step, record):
        if step == self.fail_at:
            raise ConnectionError("network is unreachable\n(retrying gave up)")
        self.records.append(record)

    def close(self):
        self.closed = True


def test_a_sink_failing_mid_run_is_dropped_with_one_warning_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    class Flaky(_Recorder):
        name, fail_at = "flaky", 2

    _Recorder.instances = []
    monkeypatch.setattr(sinks, "OPTIONAL_SINKS", {"flaky": Flaky, "recorder": _Recorder})
    log = MetricsLogger(tmp_path, total_steps=3, progress=False, tensorboard=False)
    for step in (1, 2, 3):
        log.log(step, {"loss": step / 10})
    log.close(plot=False)
    flaky, steady = _Recorder.instances
    assert capsys.readouterr().out.splitlines() == [
        "step 2: warning: metrics sink 'flaky' failed (ConnectionError: network is unreachable (retrying gave up)); "
        "the run goes on without it"]
    assert [r["step"] for r in flaky.records] == [1] and not flaky.closed       # dropped, not closed
    assert steady.records == read_metrics(tmp_path) == [{"step": s, "loss": s / 10} for s in (1, 2, 3)]
    assert steady.closed


def test_every_sink_gets_the_record_metrics_jsonl_gets(tmp_path, monkeypatch):
    """Cleaned once: tensors become numbers, NaN/inf become None, strings pass through."""
    import torch

    _Recorder.instances = []
    monkeypatch.setattr(sinks, "OPTIONAL_SINKS", {"recorder": _Recorder})
    log = MetricsLogger(tmp_path, total_steps=1, progress=False, tensorboard=False)
    log.log(1, {"loss": torch.tensor(0.25), "grad_norm": float("inf"), "reference/reset_reason": "patience"})
    log.close(plot=False)
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert _Recorder.instances[0].records == [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 0.25, "grad_norm": None, "reference/reset_reason": "patience"}]


# ----------------------------------------------------------------------------- the W&B sink's logic


class _FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.finished = kwargs, [], False
        self.id = kwargs["id"] or f"fake{len(_FakeRun.started)}"
        _FakeRun.started.append(self)

    def log(self, data, *, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in `wandb` module with the two calls the sink makes (`init`, and the run's
    `log`/`finish`); records every run started."""
    _FakeRun.started = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: _FakeRun(**kw)))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    return _FakeRun.started


def test_wandb_resume_continues_the_recorded_run_and_skips_steps_the_killed_run_sent(tmp_path, fake_wandb, capsys):
    cfg = _config(wandb=True, wandb_project="grpo", wandb_entity="lab", wandb_tags="[a]")
    killed = MetricsLogger(tmp_path, total_steps=6, progress=False, tensorboard=False, config=cfg)
    for step in range(5):                                          # killed after step 4, checkpoint at 2
        killed.log(step, {"loss": step})
    first = fake_wandb[0]
    assert first.kwargs["id"] is None and first.kwargs["resume"] is None
    assert (first.kwargs["project"], first.kwargs["entity"], first.kwargs["tags"]) == ("grpo", "lab", ["a"])
    assert first.kwargs["name"] == tmp_path.name and first.kwargs["dir"] == str(tmp_path)
    assert first.kwargs["config"]["run"]["wandb_project"] == "grpo" and "git_commit" in first.kwargs["config"]

    resumed = MetricsLogger(tmp_path, total_steps=6, start_step=2, progress=False, tensorboard=False, config=cfg)
    for step in (3, 4, 5):
        resumed.log(step, {"loss": 10 * step})
    resumed.close(plot=False)
    second = fake_wandb[1]
    assert second.kwargs["id"] == first.id and second.kwargs["resume"] == "allow"
    assert second.logged == [(5, {"loss": 50})]                    # steps 3 and 4 are in the W&B run already
    assert [r["loss"] for r in read_metrics(tmp_path)] == [0, 1, 2, 30, 40, 50]
    assert capsys.readouterr().out.splitlines() == [
        f"warning: W&B run {first.id} already has steps up to 4 from the interrupted run; this run's steps 3 to 4 "
        "go to metrics.jsonl only"]
    assert second.finished and json.loads((tmp_path / sinks.WANDB_STATE_FILE).read_text()) == {
        "id": first.id, "last_step": 5}


def test_a_fresh_start_in_a_used_run_directory_is_a_new_wandb_run(tmp_path, fake_wandb):
    cfg = _config(wandb=True)
    MetricsLogger(tmp_path, total_steps=2, progress=False, tensorboard=False, config=cfg).log(1, {"loss": 1})
    again = MetricsLogger(tmp_path, total_steps=2, progress=False, tensorboard=False, config=cfg)
    again.log(1, {"loss": 2})
    assert fake_wandb[1].kwargs["id"] is None and fake_wandb[1].logged == [(1, {"loss": 2})]


def test_wandb_off_by_default_and_never_on_ranks_other_than_zero(tmp_path, fake_wandb):
    MetricsLogger(tmp_path, total_steps=1, progress=False, tensorboard=False, config=_config()).close(plot=False)
    # Under torchrun the loop gives ranks other than 0 a SilentLogger, with the same arguments.
    SilentLogger(tmp_path, total_steps=1, progress=False, tensorboard=False, config=_config(wandb=True)).log(1, {})
    assert fake_wandb == [] and not (tmp_path / sinks.WANDB_STATE_FILE).exists()


def test_wandb_tags_are_checked_with_the_config():
    with pytest.raises(ConfigError, match=r"run\.wandb_tags\[1\]: expected 1-64 characters, got 'x{65}'"):
        load_config(None, ["run.wandb_tags=[ok, " + "x" * 65 + "]"])
    with pytest.raises(ConfigError, match=r"run\.wandb_project: expected a project name"):
        load_config(None, ["run.wandb_project="])
