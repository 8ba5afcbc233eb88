"""`prolix bench bitwise-step`: what `algorithm.batch_invariant` costs a whole trainer step, on CPU.

    prolix bench bitwise-step                    # 2 passes of 2 runs of 6 steps, the first 2 not counted
    prolix bench bitwise-step --steps 4 --passes 1 --quick

The workload is the demo's task (chain_sum) on a randomly initialised demo-sized model (no warm
start: responses run to rollout.max_tokens, so each step generates the same number of tokens),
dynamic sampling off, no evaluation, one update per step, one thread (OMP_NUM_THREADS=1). The two
runs take turns, `--passes` times (a shared machine's load drifts: both see the same drift):

    default          the stock forward, the torch sampler, no old-log-prob forward (one update)
    batch_invariant  algorithm.batch_invariant=true: the invariant operator set and attention in
                     the sampler and the trainer; the old log-probs are the rollout's, recomputed
                     every algorithm.verify_on_policy_every (10) steps

Reports the medians of the step, generation and training times and their ratios (invariant /
default; target for the step: TARGET) with the machine's load average; never asserted anywhere.
Writes `<out>/<time>-bitwise-step-<commit>.json` and a markdown table (`result_files`).
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

from prolix.trainer.sinks import git_commit

from .cpu_demo_runs import random_demo_model, workload
from .result_files import write_results

WARMUP_STEPS = 2
TARGET = 1.5
VARIANTS = {"default": [], "batch_invariant": ["algorithm.batch_invariant=true"]}
TIMES = {"step_s": "perf/step_s", "generation_s": "perf/rollout_s", "train_s": "perf/train_s"}


def _steps(name: str, args: list[str], out: Path) -> list[dict]:
    """One `prolix train` run's metrics after the start-up steps."""
    cmd = [sys.executable, "-m", "prolix.trainer.cli", "train", *args, f"run.name={name}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: prolix train exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("step", 0) > WARMUP_STEPS and "perf/step_s" in r]


def measure(steps: int, quick: bool, passes: int) -> dict:
    """`passes` rounds of the two runs taking turns; medians over every pass's steps."""
    if steps <= WARMUP_STEPS:
        raise ValueError(f"--steps: expected > {WARMUP_STEPS} (the first {WARMUP_STEPS} are start-up), got {steps}")
    if passes < 1:
        raise ValueError(f"--passes: expected >= 1, got {passes}")
    rows: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="prolix-bitwise-step-") as tmp:
        folder = Path(tmp)
        work = workload(random_demo_model(folder), folder, steps, quick, prompts=16)
        for i in range(passes):
            for name, extra in VARIANTS.items():
                rows[name] += _steps(f"{name}_{i}", [*work, *extra], folder)
    runs = {name: {k: statistics.median(r[m] for r in rs) for k, m in TIMES.items()} | {"steps": len(rs)}
            for name, rs in rows.items()}
    base, inv = runs["default"], runs["batch_invariant"]
    return {"benchmark": "bitwise-step", "commit": git_commit(short=12), "date": datetime.date.today().isoformat(),
            "machine": {"cores": os.cpu_count(), "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
            "steps": steps, "passes": passes, "quick": quick, "workload": work, "runs": runs,
            "ratios": {k: inv[k] / base[k] for k in TIMES}, "target": {"step_s": TARGET}}


def render(results: dict) -> str:
    m, r = results["machine"], results["runs"]
    lines = [f"# bitwise-step ({results['date']}, commit {results['commit']}, CPU {m['cores']} cores, load "
             f"{m['load_avg_before'][0]:.1f} before / {m['load_avg_after'][0]:.1f} after, one thread)", "",
             f"Medians over {r['default']['steps']} steps per run ({results['passes']} passes, the runs taking "
             "turns); ratio = batch_invariant / default.", "",
             "| run | step s | generation s | training s |", "|---|---|---|---|"]
    for name, t in r.items():
        lines.append(f"| {name} | {t['step_s']:.3f} | {t['generation_s']:.3f} | {t['train_s']:.3f} |")
    q = results["ratios"]
    lines.append(f"| ratio | {q['step_s']:.2f}x (target <= {TARGET}x) | {q['generation_s']:.2f}x | {q['train_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main_run(steps: int, out: Path | None, quick: bool, passes: int = 2) -> int:
    results = measure(steps, quick, passes)
    write_results(results, "bitwise-step", render(results), out)
    return 0
