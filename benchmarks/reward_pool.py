"""`prolix bench reward-pool`: scored responses per second of the reward pool, for math-verify and
for sandboxed code tests (and for "exact", whose rows are the pool's own cost), with 0 (in the
trainer process), 1 and 2 worker processes.

    prolix bench reward-pool                         # workers 0,1,2; 5 timed passes each
    prolix bench reward-pool --workers 0,2,4 --reps 5 --out /tmp/bench
    prolix bench reward-pool --quick                 # a few responses, one pass: the CI smoke run

The completions are a fixed synthetic set (seeded), right and wrong ones:
- math-verify: fractions, polynomials and integers as gold answers; per problem a tagged right
  answer in another form ("1/2" for \\frac{1}{2}), an untagged \\boxed{} one (math-verify then
  parses the whole text), a tagged wrong one and one without any answer.
- exact: string equality, microseconds per response: these rows measure the pool's own cost.
- code tests: three test cases per problem; per problem a correct program, one with the wrong
  output, one that raises, and a completion without code (scored 0 without a sandbox run). Each
  program runs in the sandbox once per test case (`prolix bench sandbox` times one such run).
For each worker count the pool is started and warmed (its first call, timed as `start_s`: the
workers' interpreter start and imports), the whole set is scored once and checked (every right
completion scores 1.0, every wrong one 0.0, and the scores equal the 0-worker ones exactly). Then
`reps` timed passes, the worker counts taking turns pass by pass (the load of a shared machine
drifts over seconds); responses/s is the set's size over the median pass. The load average
and the core count are written beside the numbers; this is a CPU benchmark, nothing here is a
GPU number. Writes `<out>/<time>-reward-pool-<commit>.json` and a markdown table.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from prolix.trainer.problem import Problem
from prolix.trainer.rewards import RewardPool, code_problem, pop_reward_errors, sandbox

from .result_files import write_results

SCHEMA = "prolix-bench-reward-pool/1"
THINK = "Let me work through this. First 3 + 4 = 7, then I double-check the algebra step by step. "
# (name, correct program, wrong-output program, stdin/stdout pairs)
CODE_TASKS = [
    ("add", "a, b = map(int, input().split())\nprint(a + b)\n", "a, b = map(int, input().split())\nprint(a - b)\n",
     [("1 2", "3"), ("20 22", "42"), ("-5 5", "0")]),
    ("reverse", "print(input()[::-1])\n", "print(input())\n", [("abc", "cba"), ("xy", "yx"), ("ab", "ba")]),
    ("sum", "print(sum(map(int, input().split())))\n", "print(sum(map(int, input().split())) + 1)\n",
     [("1 2 3", "6"), ("10", "10"), ("4 -4 9", "9")]),
]


def _fenced(code: str) -> str:
    return f"{THINK}\n```python\n{code}```\n"


def math_set(problems: int, seed: int = 0) -> tuple[list[Problem], list[list[str]], list[list[float | None]]]:
    """`problems` math-verify problems, four completions each, and the expected score of each
    completion (None: not checked, e.g. an answer-less text whose last number math-verify takes)."""
    rng = random.Random(seed)
    out_p, out_t, out_e = [], [], []
    for k in range(problems):
        if k % 3 == 0:
            a, b = rng.randint(1, 9), rng.randint(10, 19)
            gold, right, boxed, wrong = f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}", f"\\frac{{{2 * a}}}{{{2 * b}}}", f"{a + 1}/{b}"
        elif k % 3 == 1:
            c = rng.randint(2, 99)
            gold, right, boxed, wrong = f"x^2 + {c}", f"{c} + x^2", f"x^{{2}}+{c}", f"x^2 + {c + 1}"
        else:
            v = rng.randint(10, 999)
            gold, right, boxed, wrong = str(v), f"{v}.0", str(v), str(v + 1)
        out_p.append(Problem("Compute it.", gold, "math", "math_verify"))
        out_t.append([f"{THINK}<answer>{right}</answer>", f"{THINK}So the result is \\boxed{{{boxed}}}.",
                      f"{THINK}<answer>{wrong}</answer>", f"{THINK}I am not sure."])
        out_e.append([1.0, 1.0, 0.0, None])
    return out_p, out_t, out_e


def exact_set(problems: int) -> tuple[list[Problem], list[list[str]], list[list[float | None]]]:
    """`problems` "exact" problems, four ~1 kB completions each: a reward that costs microseconds,
    so its rows measure the pool's own cost (pickling, queues, result merging) per response."""
    out_p, out_t, out_e = [], [], []
    for k in range(problems):
        gold = f"city {k}"
        out_p.append(Problem("Name it.", gold, "exact", "exact"))
        out_t.append([f"{THINK * 10}<answer>{gold}</answer>", f"{THINK * 10}<answer>City {k}.</answer>",
                      f"{THINK * 10}<answer>city {k + 1}</answer>", THINK * 10])
        out_e.append([1.0, 1.0, 0.0, 0.0])
    return out_p, out_t, out_e


def code_set(problems: int) -> tuple[list[Problem], list[list[str]], list[list[float | None]]]:
    """`problems` code-test problems (cycling through CODE_TASKS), four completions each, expected scores."""
    out_p, out_t, out_e = [], [], []
    for k in range(problems):
        name, right, wrong, cases = CODE_TASKS[k % len(CODE_TASKS)]
        tests = [{"input": i + "\n", "output": o + "\n"} for i, o in cases]
        out_p.append(code_problem(f"Solve {name}.", tests, task=name, timeout=5.0))
        out_t.append([_fenced(right), _fenced(wrong), _fenced("raise ValueError('no idea')\n"), f"{THINK}No code."])
        out_e.append([1.0, 0.0, 0.0, 0.0])
    return out_p, out_t, out_e


class _Text:
    """The one field of engines.Completion that rewards read."""

    def __init__(self, text: str):
        self.text = text


def _check(kind: str, workers: int, scores: list[list[float]], expected: list[list[float | None]],
           reference: list[list[float]] | None) -> None:
    bad = [(i, j, s, e) for i, (row, exp) in enumerate(zip(scores, expected)) for j, (s, e) in enumerate(zip(row, exp))
           if e is not None and s != e]
    if bad:
        raise RuntimeError(f"{kind}, workers={workers}: wrong scores (problem, completion, got, expected): {bad[:5]}")
    if reference is not None and scores != reference:
        raise RuntimeError(f"{kind}, workers={workers}: scores differ from the 0-worker ones")
    errors = pop_reward_errors()
    if errors:
        raise RuntimeError(f"{kind}, workers={workers}: reward errors {errors}")


def _start(workers: int, sets: dict) -> tuple[RewardPool, float]:
    """A started pool and the seconds its first call took: one response of each kind, so every
    worker process that takes it has started and imported the rewards' modules."""
    start = time.perf_counter()
    pool = RewardPool(workers)
    for problems, outs, _ in sets.values():
        pool.score(problems[:1], [[_Text(outs[0][0])]])
    return pool, time.perf_counter() - start


def _timed_pass(pool: RewardPool, problems: list[Problem], completions: list[list[_Text]]) -> float:
    start = time.perf_counter()
    pool.score(problems, completions)
    return time.perf_counter() - start


def measure_pools(workers: tuple[int, ...], sets: dict, reps: int) -> list[dict]:
    """Rows per (set, worker count): each pool started and its scores checked, then `reps` timed
    passes, the pools taking turns pass by pass so that the load of a shared machine, which
    drifts over seconds, weighs on every worker count alike."""
    completions = {kind: [[_Text(t) for t in row] for row in outs] for kind, (_, outs, _) in sets.items()}
    with contextlib.ExitStack() as stack:
        pools, start_s, reference = {}, {}, {}
        for w in workers:
            pools[w], start_s[w] = _start(w, sets)
            stack.callback(pools[w].close)
            for kind, (problems, _, expected) in sets.items():
                scores = pools[w].score(problems, completions[kind]).tolist()
                _check(kind, w, scores, expected, reference.get(kind))
                reference.setdefault(kind, scores)
        seconds = {(kind, w): [] for kind in sets for w in workers}
        for _ in range(reps):
            for kind, (problems, _, _) in sets.items():
                for w in workers:
                    seconds[kind, w].append(_timed_pass(pools[w], problems, completions[kind]))
    rows = []
    for (kind, w), times in seconds.items():
        responses, median = sum(len(row) for row in completions[kind]), statistics.median(times)
        rows.append({"kind": kind, "workers": w, "responses": responses, "reps": reps, "median_s": round(median, 4),
                     "min_s": round(min(times), 4), "max_s": round(max(times), 4),
                     "responses_per_s": round(responses / median, 2), "start_s": round(start_s[w], 3)})
    return rows


def _conditions() -> dict:
    native = os.access(sandbox.NATIVE_LAUNCHER, os.X_OK)
    return {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2), "kernel": platform.release(),
            "machine": platform.machine(), "python": sys.version.split()[0],
            "sandbox_launcher": os.environ.get(sandbox.LAUNCHER_ENV, "auto"), "native_launcher_built": native}


def measure(workers: tuple[int, ...], reps: int, quick: bool) -> dict:
    """Every number of the benchmark, with the conditions before and after."""
    from prolix.trainer.sinks import git_commit  # here: the workers of `python -m` import this module

    exact_problems, math_problems, code_problems = (4, 3, 1) if quick else (256, 24, 6)
    sets = {"exact": exact_set(exact_problems), "math_verify": math_set(math_problems),
            "code_tests": code_set(code_problems)}
    before = _conditions()
    rows = measure_pools(workers, sets, reps)
    for row in rows:
        base = next((r for r in rows if r["kind"] == row["kind"] and r["workers"] == 0), None)
        row["speedup_vs_0"] = round(row["responses_per_s"] / base["responses_per_s"], 2) if base else None
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": git_commit(short=12), "quick": quick, "workers": list(workers), "reps": reps,
            "rows": rows, "conditions": {"before": before, "after": _conditions()}}


def render(results: dict) -> str:
    """The markdown table of a results dict."""
    before, after = results["conditions"]["before"], results["conditions"]["after"]
    lines = [f"Reward pool, {results['reps']} timed passes per row (median); {before['cpus']} CPUs, load average "
             f"{before['loadavg_1m']} -> {after['loadavg_1m']}, sandbox launcher {before['sandbox_launcher']} "
             f"(native built: {before['native_launcher_built']}), Linux {before['kernel']} {before['machine']}, "
             f"commit {results['commit']}. CPU numbers.",
             "",
             "| reward | workers | responses | median s | responses/s | vs 0 workers | pool start s |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        speedup = "" if r["speedup_vs_0"] is None else f"{r['speedup_vs_0']}x"
        lines.append(f"| {r['kind']} | {r['workers']} | {r['responses']} | {r['median_s']} | {r['responses_per_s']} | "
                     f"{speedup} | {r['start_s']} |")
    return "\n".join(lines) + "\n"


def main_run(workers: tuple[int, ...], reps: int | None, quick: bool, out: Path | None) -> int:
    """Measure, write `<out>/<time>-reward-pool-<commit>.json` and `.md`, print the table."""
    reps = reps if reps is not None else (1 if quick else 5)
    if not workers or any(w < 0 for w in workers):
        raise ValueError(f"--workers must be a non-empty list of ints >= 0, got {','.join(map(str, workers))!r}")
    if reps < 1:
        raise ValueError(f"--reps must be >= 1, got {reps}")
    results = measure(tuple(workers), reps, quick)
    write_results(results, "reward-pool", render(results), out)
    return 0

