"""`prolix bench sandbox`: what one `run_python` costs with each launcher, and how many runs per second.

    prolix bench sandbox                    # 50 runs per launcher, concurrency 1 and 2
    prolix bench sandbox --runs 200 --out /tmp/bench

For each launcher (native `prolix-sandbox` where built, also without its cgroup, then the Python
one) it times `run_python` of a trivial program (`pass`), the launchers taking turns run by run:
median and p95 ms per call, as the trainer sees it (set-up, the program's interpreter start, the
sweep), and the CPU time the launcher and the program used. Then runs/s with 1 and 2 sandboxes at once
(threads, as a code reward scoring a batch does). A bare `python -I -S -B -c pass` start takes its
turn too: it is the floor no launcher can beat, and says how loaded the machine was.
The load average and core count are written beside the numbers; this is a CPU-side benchmark,
nothing here is a GPU number. Writes `<out>/<time>-sandbox-<commit>.json` and a markdown table.
"""

from __future__ import annotations

import concurrent.futures
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from prolix.trainer.rewards import sandbox
from prolix.trainer.sinks import git_commit

from .result_files import write_results

PROGRAM = "pass"


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(ms: list[float]) -> dict:
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 2), "p95_ms": round(_quantile(ms, 0.95), 2),
            "min_ms": round(min(ms), 2)}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped launchers and what they waited for
    return usage.ru_utime + usage.ru_stime


def _use(launcher: str, cgroup: bool) -> None:
    os.environ[sandbox.LAUNCHER_ENV], sandbox.CGROUPS = launcher, cgroup


def _sandboxed(launcher: str, cgroup: bool) -> Callable[[], None]:
    def run() -> None:
        _use(launcher, cgroup)
        r = sandbox.run_python(PROGRAM)
        if not r.ok:
            raise RuntimeError(f"run_python({PROGRAM!r}) with {launcher}: {r.reason}: {r.stderr[-500:]}")
    return run


def _bare() -> None:
    """The program in the interpreter the sandbox runs (its base interpreter), without a sandbox."""
    exe, _ = sandbox.interpreter()
    subprocess.run([exe, "-I", "-S", "-B", "-c", PROGRAM], check=True)


def time_interleaved(variants: dict[str, Callable[[], None]], runs: int) -> dict[str, dict]:
    """ms per call of each variant, taking turns (one call of each per round) so that the load of
    a shared machine, which drifts over seconds, weighs on every variant alike. Also the CPU time
    (user + system of the reaped children): it moves far less with the load than the wall clock."""
    ms = {name: [] for name in variants}
    cpu = dict.fromkeys(variants, 0.0)
    for fn in variants.values():
        fn()  # warm-up: page cache, slot files
    for _ in range(runs):
        for name, fn in variants.items():
            cpu_before, start = _children_cpu_s(), time.perf_counter()
            fn()
            ms[name].append((time.perf_counter() - start) * 1e3)
            cpu[name] += _children_cpu_s() - cpu_before
    return {name: {**_summary(ms[name]), "cpu_ms": round(cpu[name] / runs * 1e3, 2)} for name in variants}


def runs_per_second(runs: int, concurrency: int) -> float:
    """Throughput with `concurrency` sandboxes at once (threads, each its own uid and cgroup)."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: sandbox.run_python(PROGRAM), range(runs)))
    elapsed = time.perf_counter() - start
    bad = [r.reason for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} of {runs} runs failed: {sorted(set(bad))}")
    return round(runs / elapsed, 1)


def _conditions() -> dict:
    return {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2), "kernel": platform.release(),
            "machine": platform.machine(), "root": os.geteuid() == 0, "python": sys.version.split()[0]}


def measure(runs: int) -> dict:
    """Every number of the benchmark, with the conditions before and after."""
    # (row, launcher, cgroup): "native, no cgroup" shows what joining the run's cgroup costs.
    variants = [("native", "native", True), ("native, no cgroup", "native", False), ("python", "python", True)]
    if not os.access(sandbox.NATIVE_LAUNCHER, os.X_OK):
        variants = variants[2:]
    before = _conditions()
    saved = os.environ.get(sandbox.LAUNCHER_ENV), sandbox.CGROUPS
    try:
        latency = time_interleaved({**{row: _sandboxed(launcher, cgroup) for row, launcher, cgroup in variants},
                                    "bare": _bare}, runs)
        rows = []
        for row, launcher, cgroup in variants:
            _use(launcher, cgroup)
            isolation = list(sandbox.run_python(PROGRAM).isolation)
            rows.append({"launcher": row, **latency[row], "isolation": isolation,
                         "runs_per_s_1": runs_per_second(runs, 1), "runs_per_s_2": runs_per_second(runs, 2)})
    finally:
        sandbox.CGROUPS = saved[1]
        if saved[0] is None:
            os.environ.pop(sandbox.LAUNCHER_ENV, None)
        else:
            os.environ[sandbox.LAUNCHER_ENV] = saved[0]
    return {"schema": "prolix-bench-sandbox/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": git_commit(short=12), "program": PROGRAM, "runs": runs, "bare_python": latency["bare"], "launchers": rows,
            "conditions": {"before": before, "after": _conditions()}}


def render(results: dict) -> str:
    """The markdown table of a results dict."""
    before, after = results["conditions"]["before"], results["conditions"]["after"]
    lines = [f"run_python({results['program']!r}), {results['runs']} runs per launcher; "
             f"{before['cpus']} CPUs, load average {before['loadavg_1m']} -> {after['loadavg_1m']}, "
             f"root={before['root']}, Linux {before['kernel']} {before['machine']}, commit {results['commit']}",
             "",
             "| launcher | median ms | p95 ms | min ms | CPU ms | runs/s (1 at a time) | runs/s (2 at once) | isolation |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["launchers"]:
        lines.append(f"| {r['launcher']} | {r['median_ms']} | {r['p95_ms']} | {r['min_ms']} | {r['cpu_ms']} | "
                     f"{r['runs_per_s_1']} | "
                     f"{r['runs_per_s_2']} | {', '.join(r['isolation'])} |")
    b = results["bare_python"]
    lines.append(f"| bare `python -I -S -B -c pass` (floor) | {b['median_ms']} | {b['p95_ms']} | {b['min_ms']} | "
                 f"{b['cpu_ms']} | | | none |")
    return "\n".join(lines) + "\n"


def main_run(runs: int, out: Path | None) -> int:
    if runs < 2:
        raise ValueError(f"--runs must be >= 2, got {runs}")
    results = measure(runs)
    write_results(results, "sandbox", render(results), out)
    return 0
