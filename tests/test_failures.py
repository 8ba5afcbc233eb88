"""Failing clearly, never saving a broken state, stopping gracefully.

- Expected failures (configuration, a missing model, no CUDA, an unwritable run directory, a full
  disk) end in one line naming the key or path, exit status 2, before any model is built.
- Nothing non-finite is saved: a non-finite lr is a config error; weights that an update turned
  non-finite, or non-finite logits in the sampler, stop the run with status 3 before it saves.
- A torn last line of metrics.jsonl is dropped on resume; a re-used run name logs step 0 once.
- SIGINT / SIGTERM finish the step, checkpoint, exit 130 / 143; a second signal stops at once.
- A stop at step 3 and a resume to 6 follow the run straight to 6, reference resets included.
- A checkpoint write that fails leaves `latest` and the previous checkpoints as they were.

All runs are the tiny ones of `trainer_testing.tiny_overrides` (seconds each); the signal tests
run `prolix train` in a subprocess, as a user's terminal or a scheduler would signal it.
"""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_testing import TESTS, read_jsonl, tiny_overrides

from prolix.trainer import metrics
from prolix.trainer.checkpoint import store as checkpoint
from prolix.trainer.config import ConfigError, load_config
from prolix.trainer.guards import NonFiniteLogitsError, all_finite
from prolix.trainer.loop import Trainer
from prolix.trainer.metrics import MetricsFileError, MetricsLogger
from prolix.trainer.rollout import engines
from prolix.trainer.rollout.engines import sample_tokens
from prolix.trainer.train import main as train_main

# the signal tests compare this process's runs with a subprocess's (OMP_NUM_THREADS="1") bit for bit
pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_one_error_line(capsys, *fragments: str) -> str:
    lines = error_lines(capsys)
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def latest_name(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


# ----------------------------------------------------------------------------- expected failures


@pytest.mark.parametrize("lr", ["inf", "-inf", "nan"])
def test_a_non_finite_learning_rate_is_a_config_error(base_model, problems, tmp_path, capsys, lr):
    assert train_main(tiny_overrides(base_model, problems, tmp_path, **{"optim.lr": lr})) == 2
    assert_one_error_line(capsys, "prolix train: error: optim.lr: expected a finite value > 0")
    assert not (tmp_path / "run").exists()


def demo_argv(tmp_path: Path, *extra: str) -> list[str]:
    """The embedded demo (no model.path), with a warm start of 0 steps should a check come too late."""
    return [f"run.out_dir={tmp_path}", "run.name=demo", "demo.warmup_steps=0", "run.steps=1",
            "run.progress=false", "run.tensorboard=false", *extra]


def test_an_unknown_engine_fails_before_the_demo_builds_its_model(tmp_path, capsys):
    assert train_main(demo_argv(tmp_path, "rollout.engine=vllmm")) == 2
    assert_one_error_line(capsys, "rollout.engine: expected one of ('torch', 'vllm'), got 'vllmm'")
    assert not (tmp_path / "demo" / "base_model").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_cuda_device_without_cuda_fails_before_the_demo_builds_its_model(tmp_path, capsys, device):
    assert train_main(demo_argv(tmp_path, f"run.device={device}")) == 2
    assert_one_error_line(capsys, f"run.device: '{device}' requested but CUDA is not available")
    assert not (tmp_path / "demo" / "base_model").exists()


def test_a_missing_model_path_names_model_path(base_model, problems, tmp_path, capsys):
    argv = tiny_overrides(base_model, problems, tmp_path, **{"model.path": "/nonexistent"})
    assert train_main(argv) == 2
    assert_one_error_line(capsys, "prolix train: error: model.path: policy path '/nonexistent' does not exist")
    # the library entry point says the same, before any file is read
    (tmp_path / "api").mkdir()
    with pytest.raises(ConfigError, match="model.path: policy path '/nonexistent' does not exist"):
        Trainer(load_config(None, argv), tmp_path / "api")


def refuse_writes_in(folder: Path, monkeypatch) -> None:
    """Make `folder` unwritable: permission bits where they bind, else (root ignores them) the
    probe's file creation fails as it does on a read-only mount."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(dir) / kwargs.get("prefix", "")))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("where", ["run.out_dir", "checkpoints"])
def test_an_unwritable_run_directory_fails_before_any_model_is_built(base_model, problems, tmp_path,
                                                                     capsys, monkeypatch, where):
    out = tmp_path / "out"
    folder = out if where == "run.out_dir" else out / "run" / "checkpoints"
    folder.mkdir(parents=True)
    refuse_writes_in(folder, monkeypatch)
    built = []
    monkeypatch.setattr(Trainer, "__init__", lambda self, *a, **k: built.append(1) or None)
    try:
        assert train_main(tiny_overrides(base_model, problems, out)) == 2
    finally:
        folder.chmod(0o755)
    line = assert_one_error_line(capsys, f"prolix train: error: run.out_dir: cannot write to {folder}")
    assert "Read-only file system" in line or "Permission denied" in line
    assert built == []


# ----------------------------------------------------------------------------- nothing non-finite is saved


def test_all_finite_sees_nan_and_inf_but_not_large_finite_weights():
    tensors = [torch.randn(3, 4), torch.full((5,), 1e38), torch.randn(2, dtype=torch.bfloat16)]
    assert all_finite(tensors)                          # a 2-norm of these would overflow to inf
    for bad in (NAN, INF, -INF):
        poisoned = [t.clone() for t in tensors]
        poisoned[2][1] = bad
        assert not all_finite(poisoned), bad
    assert all_finite([])


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_the_sampler_refuses_non_finite_logits(temperature, top_p):
    logits = torch.randn(3, 10)
    logits[1, 4] = NAN
    with pytest.raises(NonFiniteLogitsError, match="logits are not finite"):
        sample_tokens(logits, temperature, top_p, None)
    assert engines.NonFiniteLogitsError is NonFiniteLogitsError


def saved_weights_are_finite(run: Path) -> None:
    root = run / "checkpoints"
    for ckpt in root.glob("step_*"):
        for name in ("model.safetensors", "reference.safetensors"):
            assert all_finite(load_file(str(ckpt / name)).values()), f"{ckpt.name}/{name} holds non-finite weights"


# 1e20: weights near 1e20, finite, but the forward overflows (caught before the first save);
# 1e35: the updates themselves stop being finite (skipped, then optim.max_consecutive_skips)
@pytest.mark.parametrize("lr", ["1e20", "1e35"])
def test_a_huge_learning_rate_stops_with_status_3_and_saves_nothing_non_finite(base_model, problems,
                                                                              tmp_path, capsys, lr):
    argv = tiny_overrides(base_model, problems, tmp_path, **{"optim.lr": lr, "run.checkpoint_every": 1})
    assert train_main(argv) == 3
    line = assert_one_error_line(capsys, "prolix train: error: ", "stopped without saving this state")
    run = tmp_path / "run"
    saved_weights_are_finite(run)
    latest = checkpoint.latest_checkpoint(run)
    assert line.endswith(str(latest) if latest is not None else "last good checkpoint: none"), line
    if lr == "1e20":                  # step 1 already overflows: nothing is saved, not even step 1
        assert latest is None and "step 1: the policy's log-probs are not finite" in line, line


def test_weights_an_update_made_non_finite_stop_the_run_before_it_saves(base_model, problems, tmp_path,
                                                                       capsys, monkeypatch):
    real_step = torch.optim.AdamW.step

    def step_then_poison_at_step_3(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        if poison[0] is not None and poison[0].state.step + 1 == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = NAN
        return out

    poison = [None]
    real_init = Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        poison[0] = self

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_poison_at_step_3)
    monkeypatch.setattr(Trainer, "__init__", init)
    argv = tiny_overrides(base_model, problems, tmp_path, **{"run.checkpoint_every": 1, "run.steps": 4})
    assert train_main(argv) == 3
    assert_one_error_line(capsys, "step 3: the weights are not finite after the optimizer update (optim.lr=0.01)",
                          "step_000002")
    run = tmp_path / "run"
    assert latest_name(run) == "step_000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000001", "step_000002"]
    saved_weights_are_finite(run)
    checkpoint.verify_checkpoint(run / "checkpoints" / "step_000002")


# ----------------------------------------------------------------------------- metrics.jsonl on resume


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_resume_drops_a_torn_last_metrics_line_with_a_warning(tmp_path, capsys):
    whole = [json.dumps({"step": s, "reward/mean": 0.5}) for s in range(3)]
    write_lines(tmp_path / "metrics.jsonl", whole + ['{"step": 3, "reward/me'])     # killed mid-write
    log = MetricsLogger(tmp_path, total_steps=4, start_step=2, tensorboard=False, progress=False)
    log.log(3, {"reward/mean": 0.25})
    log.close(plot=False)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert "dropped its last line, cut short by a killed run" in capsys.readouterr().err


def test_an_unreadable_metrics_line_before_the_last_names_the_file_and_line(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", ['{"step": 0}', "{garbage", '{"step": 1}'])
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl: line 2 is not a JSON object"):
        MetricsLogger(tmp_path, total_steps=4, start_step=1, tensorboard=False, progress=False)


def test_a_run_name_reused_after_a_kill_before_the_first_checkpoint_logs_step_0_once(tmp_path):
    # the killed run logged its start evaluation (step 0) and step 1, then died in its first save
    write_lines(tmp_path / "metrics.jsonl", [json.dumps({"step": 0, "eval/score": 0.1}), json.dumps({"step": 1})])
    log = MetricsLogger(tmp_path, total_steps=2, start_step=0, tensorboard=False, progress=False)
    log.log(0, {"eval/score": 0.1})
    log.close(plot=False)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0]


def test_resume_keeps_one_line_per_step(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [json.dumps({"step": s, "v": i}) for i, s in enumerate([0, 1, 2, 2, 3])])
    MetricsLogger(tmp_path, total_steps=4, start_step=2, tensorboard=False, progress=False).close(plot=False)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 0, "v": 0}, {"step": 1, "v": 1}, {"step": 2, "v": 3}]


# ----------------------------------------------------------------------------- write failures during a save


FULL = os.strerror(errno.ENOSPC)


def fill_the_disk_at(writer: str, monkeypatch) -> None:
    """From the second checkpoint on, `writer` fails the way it does on a full file system:
    Python's file writes with an OSError (no file name), safetensors with a SafetensorError
    carrying the os error, torch.save's zip writer with a RuntimeError and no errno (the free
    space then says why). Seen on a real 3 MiB tmpfs: each of the three, depending on where the
    space ran out."""
    calls = []

    def second_call() -> bool:
        calls.append(1)
        return len(calls) >= 2

    if writer == "torch.save":
        real = torch.save

        def save(obj, f, *args, **kwargs):
            if Path(str(f)).name == "optimizer.pt" and second_call():
                monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil_usage(0))
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
            return real(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    elif writer == "safetensors":
        from safetensors import SafetensorError

        real = checkpoint.save_model

        def save_model(model, filename, *args, **kwargs):
            if second_call():
                raise SafetensorError(f"Error while serializing: I/O error: {FULL} (os error {errno.ENOSPC})")
            return real(model, filename, *args, **kwargs)

        monkeypatch.setattr(checkpoint, "save_model", save_model)
    else:
        real = checkpoint._write_manifest

        def write_manifest(folder, step):
            if second_call():
                raise OSError(errno.ENOSPC, FULL)
            return real(folder, step)

        monkeypatch.setattr(checkpoint, "_write_manifest", write_manifest)


def shutil_usage(free: int):
    import shutil

    return shutil._ntuple_diskusage(total=3 << 20, used=(3 << 20) - free, free=free)


@pytest.mark.parametrize("writer", ["torch.save", "safetensors", "python"])
def test_a_full_disk_during_a_save_leaves_latest_and_the_previous_checkpoint(
        base_model, problems, tmp_path, capsys, monkeypatch, writer):
    def plot_on_a_full_disk(run_dir):                      # what the end-of-run plot meets next
        raise OSError(errno.ENOSPC, FULL, str(Path(run_dir) / metrics.PLOT_FILE))

    fill_the_disk_at(writer, monkeypatch)
    monkeypatch.setattr(metrics, "plot_curves", plot_on_a_full_disk)
    argv = tiny_overrides(base_model, problems, tmp_path, **{"run.checkpoint_every": 1, "run.plot": "true"})
    assert train_main(argv) == 2
    run = tmp_path / "run"
    root = run / "checkpoints"
    assert_one_error_line(capsys, f"prolix train: error: cannot write checkpoint step_000002: {root}/.tmp-step_000002-",
                          f"{FULL} (ENOSPC); `latest` still names step_000001")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]     # the partial folder removed
    assert latest_name(run) == "step_000001"
    checkpoint.verify_checkpoint(root / "step_000001")
    # the run resumes from it once there is room again
    monkeypatch.undo()
    assert train_main(["--resume", str(run)]) == 0 and latest_name(run) == "step_000004"


def test_an_unexpected_error_during_a_save_keeps_its_traceback(base_model, problems, tmp_path,
                                                               monkeypatch):
    def broken(folder, step):
        raise KeyError("a bug, not a full disk")

    monkeypatch.setattr(checkpoint, "_write_manifest", broken)
    with pytest.raises(KeyError, match="a bug"):
        train_main(tiny_overrides(base_model, problems, tmp_path, **{"run.steps": 1}))
    assert not any((tmp_path / "run" / "checkpoints").iterdir())


# ----------------------------------------------------------------------------- stop and resume


def patience_overrides(base_model, problems, out_dir, **extra):
    """6 steps, evaluated every 2, a reset after each evaluation without a new best, and no score
    counts as a new best after the first (min_improvement 1): resets at steps 2, 4 and 6."""
    return tiny_overrides(base_model, problems, out_dir, **{"run.steps": 6, "eval.every": 2, "reference.patience": 1,
                                                            "reference.min_improvement": 1.0,
                                                            "run.checkpoint_every": 0, **extra})


@pytest.fixture(scope="module")
def straight_to_6(base_model, problems, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight6")
    assert train_main(patience_overrides(base_model, problems, out)) == 0
    return out / "run"


def assert_same_run(a: Path, b: Path) -> None:
    """Same weights, reference and resets at step 6, and the same per-step training metrics."""
    ca, cb = a / "checkpoints" / "step_000006", b / "checkpoints" / "step_000006"
    for name in ("model.safetensors", "reference.safetensors"):
        wa, wb = load_file(str(ca / name)), load_file(str(cb / name))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    sa, sb = (json.loads((c / "trainer_state.json").read_text()) for c in (ca, cb))
    assert sa["resets"] == sb["resets"] and sa["best_score"] == sb["best_score"]
    ra = {r["step"]: r for r in read_jsonl(a / "metrics.jsonl")}
    rb = {r["step"]: r for r in read_jsonl(b / "metrics.jsonl")}
    assert sorted(ra) == sorted(rb) == list(range(7))
    for step in range(1, 7):
        for key in ("reward/mean", "loss", "kl", "grad_norm", "reference/resets", "reference/reset_reason"):
            assert ra[step].get(key) == rb[step].get(key), (step, key)


def test_a_run_ended_at_3_and_resumed_to_6_resets_where_a_run_to_6_does(
        straight_to_6, base_model, problems, tmp_path):
    resets = json.loads((straight_to_6 / "checkpoints" / "step_000006" / "trainer_state.json").read_text())["resets"]
    assert [r["step"] for r in resets] == [2, 4, 6] and {r["reason"] for r in resets} == {"patience"}
    # the first leg ends at step 3 with its end-of-run evaluation, which must not count toward patience
    assert train_main(patience_overrides(base_model, problems, tmp_path, **{"run.steps": 3})) == 0
    run = tmp_path / "run"
    assert train_main(["--resume", str(run), "run.steps=6"]) == 0
    assert_same_run(straight_to_6, run)


SIGNALLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from prolix.trainer.loop import Trainer
    from prolix.trainer.train import main

    real = Trainer.train_step
    def train_step_signalled(self):         # the signal arrives while step {at} is running
        if self.state.step + 1 == {at}:
            for _ in range({times}):
                os.kill(os.getpid(), {signum})
        return real(self)
    Trainer.train_step = train_step_signalled
    sys.exit(main({argv!r}))
""")


def run_signalled(argv: list[str], signum: int, *, at: int, times: int) -> subprocess.CompletedProcess:
    script = SIGNALLER.format(tests=str(TESTS), at=at, times=times, signum=int(signum), argv=argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_checkpoints_and_a_resume_follows_the_uninterrupted_run(
        straight_to_6, base_model, problems, tmp_path, signum, status):
    proc = run_signalled(patience_overrides(base_model, problems, tmp_path), signum, at=3, times=1)
    assert proc.returncode == status, proc.stderr[-3000:]
    run = tmp_path / "run"
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"prolix train: stopped by {signum.name} after step 3; checkpoint step_000003; "
                    f"continue with --resume {run}"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert latest_name(run) == "step_000003"                        # checkpoint_every=0: written by the stop
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3]
    with open(run / "metrics.jsonl", "a") as f:                     # and a kill tore a line as well
        f.write('{"step": 4, "rew')
    assert train_main(["--resume", str(run)]) == 0
    assert_same_run(straight_to_6, run)


def test_a_second_signal_stops_at_once_without_checkpointing(base_model, problems, tmp_path):
    argv = patience_overrides(base_model, problems, tmp_path, **{"run.checkpoint_every": 1})
    proc = run_signalled(argv, signal.SIGINT, at=3, times=2)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "SIGINT again: stopping now" in proc.stderr and "Traceback" not in proc.stderr
    run = tmp_path / "run"
    assert latest_name(run) == "step_000002"
    assert not (run / "checkpoints" / "step_000003").exists()
    assert math.isfinite(read_jsonl(run / "metrics.jsonl")[-1]["step"])
