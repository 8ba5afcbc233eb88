"""`prolix bench rl-overlap`: what the split placement's overlap buys, on CPU processes.

    prolix bench rl-overlap                      # calibrate, then 2 passes of 3 runs of 10 steps
    prolix bench rl-overlap --steps 4 --passes 1 --calibrations 1 --quick   # a smaller workload (a test runs it)

The workload is the demo's task (chain_sum) on a randomly initialised demo-sized model (no warm
start: responses run to rollout.max_tokens, so a step's generation time is fixed), dynamic
sampling off (one rollout call per step), no evaluation. Every process runs one thread
(OMP_NUM_THREADS=1), so a world of two uses both cores of a 2-core machine.

1. calibrate: colocated runs measure generation g and training t per step and stretch the
   shorter side by the measured ratio (up to 3 runs, until g / t is within [0.8, 1.25]):
   optim.epochs when training is shorter, else more decode batches per step for the torch
   sampler (`max_batch_rows`), which lengthens generation alone;
2. colocated (one process, the synchronous loop): its step time, expected g + t;
3. split, max_staleness 0 (one trainer rank, one rollout rank): synchronous too, g + t + sync;
4. split, max_staleness 1: generation of step s+1 overlaps training of step s, expected
   max(g, t) + sync. Target: ≤ 1.15 × max(g, t).

Medians over the steps after the first two (start-up), over `--passes` rounds in which the
three runs take turns. Reports g, t, each run's step time, the
ratios, the lag and both sides' idle time. Writes `<out>/<time>-rl-overlap-<commit>.json`, a
markdown table and a PNG (`result_files.write_results`). CPU numbers: they say how well the two sides overlap, nothing about a
GPU's speed.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from prolix.trainer.config import load_config
from prolix.trainer.sinks import git_commit

from .cpu_demo_runs import random_demo_model, workload
from .result_files import write_results

WARMUP_STEPS = 2
TARGET = 1.15
CALIBRATIONS = 3


def _run(name: str, args: list[str], out: Path, nproc: int) -> list[dict]:
    """One `prolix train` (under torchrun when nproc > 1); its metrics after the start-up steps."""
    train = ["-m", "prolix.trainer.cli", "train", *args, f"run.name={name}"]
    cmd = [sys.executable, *train] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *train]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: prolix train exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("step", 0) > WARMUP_STEPS]


def _medians(rows: list[dict]) -> dict:
    keys = {"generation_s": "perf/rollout_s", "train_s": "perf/train_s", "step_s": "perf/step_s",
            "trainer_idle_s": "perf/trainer_idle_s", "engine_idle_s": "perf/engine_idle_s",
            "lag_mean": "perf/policy_lag_mean", "lag_max": "perf/policy_lag_max"}
    return {k: statistics.median(r[m] for r in rows) for k, m in keys.items()} | \
        {"lag_max_any": max(r["perf/policy_lag_max"] for r in rows), "steps": len(rows)}


def _calibrated(base: list[str], folder: Path, quick: bool, calibrations: int) -> list[str]:
    """The workload with generation and training balanced (module docstring, step 1): up to
    `calibrations` colocated runs, each scaling the shorter side by the ratio it measured, until
    g / t is within [0.8, 1.25]."""
    step_rows = (4 if quick else 8) * load_config().rollout.n
    epochs, batches = 1, 1.0
    for i in range(calibrations):
        work = [*base, f"optim.epochs={epochs}",
                f"rollout.engine_options={{max_batch_rows: {max(1, round(step_rows / batches))}}}"]
        calib = _medians(_run(f"calibrate_{i}", work, folder, 1))
        ratio = calib["generation_s"] / max(calib["train_s"], 1e-9)
        if 0.8 <= ratio <= 1.25:
            break
        if ratio > 1:
            epochs = max(1, round(epochs * ratio))
        else:
            batches = min(float(step_rows), batches / ratio)
    return work


def measure(steps: int, quick: bool, passes: int, calibrations: int = CALIBRATIONS) -> dict:
    """Calibrate, then `passes` rounds of the three runs taking turns (a shared machine's load
    drifts: each placement sees the same drift); medians over every pass's steps."""
    if steps <= WARMUP_STEPS:
        raise ValueError(f"--steps: expected > {WARMUP_STEPS} (the first {WARMUP_STEPS} are start-up), got {steps}")
    if passes < 1:
        raise ValueError(f"--passes: expected >= 1, got {passes}")
    if calibrations < 1:
        raise ValueError(f"--calibrations: expected >= 1, got {calibrations}")
    variants = {"colocated": ([], 1), "split_k0": (["rollout.placement=split", "rollout.max_staleness=0"], 2),
                "split_k1": (["rollout.placement=split", "rollout.max_staleness=1"], 2)}
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="prolix-rl-overlap-") as tmp:
        folder = Path(tmp)
        base = workload(random_demo_model(folder), folder, steps, quick, prompts=8)
        work = _calibrated(base, folder, quick, calibrations)
        for i in range(passes):
            for name, (extra, nproc) in variants.items():
                rows[name] += _run(f"{name}_{i}", [*work, *extra], folder, nproc)
    runs = {name: _medians(r) for name, r in rows.items()}
    g, t = runs["colocated"]["generation_s"], runs["colocated"]["train_s"]
    return {"benchmark": "rl-overlap", "commit": git_commit(short=12), "date": datetime.date.today().isoformat(),
            "machine": {"cores": os.cpu_count(), "load_avg": os.getloadavg()}, "steps": steps, "passes": passes, "quick": quick,
            "workload": work, "generation_s": g, "train_s": t, "runs": runs,
            "ratios": {"colocated_vs_sum": runs["colocated"]["step_s"] / (g + t),
                       "split_k0_vs_sum": runs["split_k0"]["step_s"] / (g + t),
                       "split_k1_vs_max": runs["split_k1"]["step_s"] / max(g, t)},
            "target": {"split_k1_vs_max": TARGET}}


def render(results: dict) -> str:
    r, ratios = results["runs"], results["ratios"]
    lines = [f"# rl-overlap ({results['date']}, commit {results['commit']}, CPU {results['machine']['cores']} cores, "
             f"load {results['machine']['load_avg'][0]:.1f})", "",
             f"Generation g = {results['generation_s']:.3f} s, training t = {results['train_s']:.3f} s per step "
             f"(balanced by colocated calibration runs: "
             f"{' '.join(a for a in results['workload'] if a.startswith(('optim.epochs', 'rollout.engine')))}); medians over "
             f"{r['colocated']['steps']} steps ({results['passes']} passes, the runs taking turns).", "",
             "| run | step s | vs | trainer idle s | engine idle s | lag mean / max |", "|---|---|---|---|---|---|"]
    refs = {"colocated": ("g + t", ratios["colocated_vs_sum"]), "split_k0": ("g + t", ratios["split_k0_vs_sum"]),
            "split_k1": ("max(g, t)", ratios["split_k1_vs_max"])}
    for name, row in r.items():
        ref, ratio = refs[name]
        lines.append(f"| {name} | {row['step_s']:.3f} | {ratio:.2f} × {ref} | {row['trainer_idle_s']:.3f} | "
                     f"{row['engine_idle_s']:.3f} | {row['lag_mean']:.0f} / {row['lag_max_any']:.0f} |")
    ok = ratios["split_k1_vs_max"] <= TARGET
    lines += ["", f"split, max_staleness 1: {ratios['split_k1_vs_max']:.2f} × max(g, t), target ≤ {TARGET}: "
              f"{'PASS' if ok else 'FAIL'}"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["runs"])
    g, t = results["generation_s"], results["train_s"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, [results["runs"][n]["step_s"] for n in names], color=["#888", "#c96", "#396"])
    for y, label, style in ((g + t, "g + t", "--"), (max(g, t), "max(g, t)", ":"),
                            (TARGET * max(g, t), f"{TARGET} × max(g, t)", "-.")):
        ax.axhline(y, linestyle=style, color="k", linewidth=1)
        ax.text(len(names) - 0.5, y, label, va="bottom", ha="right", fontsize=8)
    ax.set_ylabel("step time (s)")
    ax.set_title("rl-overlap: step time by placement (CPU processes)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main_run(steps: int, out: Path | None, quick: bool, passes: int = 2, calibrations: int = CALIBRATIONS) -> int:
    results = measure(steps, quick, passes, calibrations)
    write_results(results, "rl-overlap", render(results), out, plot=plot)
    return 0
