"""The "code_tests" reward: run the completion's Python program on each test case, in a sandbox.

The score is the fraction of test cases whose stdout matches, as in ProRL's code tasks.

Test spec. `problem.metadata["tests"]`, or, when that key is absent, `problem.answer` parsed as
JSON, in one of two shapes (either may also be given as a JSON string, as parquet columns
often hold them):
    [{"input": "1 2\\n", "output": "3\\n"}, ...]              # one object per test case
    {"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}      # APPS / TACO / DeepCoder columns
`input` is the program's stdin, `output` its expected stdout; both strings, at least one test.
Optional `metadata["timeout"]` (seconds per test, default 5) and `metadata["memory_mb"]`
(default 512) override the sandbox limits. A JSONL row like
    {"prompt": "...", "answer": "<reference solution>", "tests": [...]}
with `reward="code_tests"` works as is (`FileSource` keeps the whole row as metadata).

Malformed specs. `code_problem(...)` validates when the problem is built and raises ValueError
naming the problem and the field: use it when building datasets in code. A malformed spec that
reaches the reward (a bad dataset row) raises there too, which `registry.score` turns into 0.0
counted in `reward_errors["code_tests"]`: it shows up in the run's metrics instead of passing as
a wrong answer, and one bad row cannot end a run.

Code. The last ```python (or ```py / ```python3) fenced block in the completion; else the content
of the last <answer>...</answer> (unwrapped if it is itself a fenced block). No code: 0.0, the
model's failure rather than an error.

Matching. Actual and expected stdout are compared line by line after stripping trailing
whitespace from each line and dropping trailing empty lines (what most judges do): "3 \\n\\n"
matches "3", "3 4" does not match "3  4".

Cost. Tests run one after another. After the first timeout the remaining tests count as failed
without running: a program that loops on one input almost always loops on the next, and this
bounds a completion's cost at one timeout. Anything the program does (crash, timeout, memory,
fork bomb, output flood) fails that test; only a sandbox that cannot start (`SandboxError`) is
an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from ..problem import Problem
from . import sandbox
from .registry import extract_answer, register_reward

__all__ = ["TestCase", "parse_tests", "code_problem", "extract_code", "outputs_match", "code_tests_reward"]

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_MB = 512

_PY_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_ANY_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class TestCase:
    __test__ = False  # not a pytest class
    input: str  # the program's stdin
    output: str  # its expected stdout


def parse_tests(spec: Any, where: str = "tests") -> list[TestCase]:
    """Test cases from a spec in either documented shape (or its JSON text); ValueError otherwise."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
    if isinstance(spec, dict):
        if set(spec) != {"inputs", "outputs"}:
            raise ValueError(f"{where}: an object must have exactly 'inputs' and 'outputs', got keys {sorted(spec)}")
        ins, outs = spec["inputs"], spec["outputs"]
        if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs):
            raise ValueError(f"{where}: 'inputs' and 'outputs' must be lists of equal length, got "
                             f"{type(ins).__name__} and {type(outs).__name__}")
        spec = [{"input": i, "output": o} for i, o in zip(ins, outs)]
    if not isinstance(spec, list) or not spec:
        raise ValueError(f"{where}: expected a non-empty list of {{'input', 'output'}} objects, got {spec!r:.200}")
    cases = []
    for k, case in enumerate(spec):
        if not isinstance(case, dict) or set(case) != {"input", "output"}:
            raise ValueError(f"{where}[{k}]: expected an object with exactly 'input' and 'output', got {case!r:.200}")
        for field in ("input", "output"):
            if not isinstance(case[field], str):
                raise ValueError(f"{where}[{k}].{field}: must be a string, got {type(case[field]).__name__}")
        cases.append(TestCase(case["input"], case["output"]))
    return cases


def _limits(meta: dict, where: str) -> tuple[float, int]:
    timeout, memory_mb = meta.get("timeout", DEFAULT_TIMEOUT_S), meta.get("memory_mb", DEFAULT_MEMORY_MB)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (math.isfinite(timeout)
                                                                                   and 0 < timeout <= 600):
        raise ValueError(f"{where}: metadata['timeout'] must be seconds in (0, 600], got {timeout!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 32:
        raise ValueError(f"{where}: metadata['memory_mb'] must be an int >= 32, got {memory_mb!r}")
    return float(timeout), memory_mb


def _problem_tests(problem: Problem) -> tuple[list[TestCase], float, int]:
    where = f"code_tests problem (task {problem.task!r})"
    meta = problem.metadata
    if "tests" in meta:
        tests = parse_tests(meta["tests"], f"{where}: metadata['tests']")
    else:
        tests = parse_tests(problem.answer, f"{where}: answer (no metadata['tests'])")
    return (tests, *_limits(meta, where))


def code_problem(prompt: str, tests: Any, *, task: str = "code", timeout: float = DEFAULT_TIMEOUT_S,
                 memory_mb: int = DEFAULT_MEMORY_MB, **metadata: Any) -> Problem:
    """A `Problem` scored by "code_tests", its spec validated now (ValueError naming what is wrong)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r:.200}")
    cases = parse_tests(tests)
    canonical = [{"input": c.input, "output": c.output} for c in cases]
    meta = {**metadata, "tests": canonical, "timeout": timeout, "memory_mb": memory_mb}
    _limits(meta, f"code_problem(task={task!r})")
    return Problem(prompt=prompt, answer=json.dumps(canonical), task=task, reward="code_tests", metadata=meta)


def extract_code(text: str) -> str | None:
    """The last ```python block; else the last <answer> content (unfenced); None when neither."""
    blocks = _PY_FENCE.findall(text)
    if blocks:
        return blocks[-1]
    answer = extract_answer(text)
    if answer is None:
        return None
    inner = _ANY_FENCE.findall(answer + "\n")
    code = inner[-1] if inner else answer
    return code if code.strip() else None


def outputs_match(actual: str, expected: str) -> bool:
    """Equal line by line, ignoring trailing whitespace on each line and trailing empty lines."""
    def lines(s: str) -> list[str]:
        out = [line.rstrip() for line in s.splitlines()]
        while out and not out[-1]:
            out.pop()
        return out

    return lines(actual) == lines(expected)


@register_reward("code_tests")
def code_tests_reward(problem: Problem, text: str) -> float:
    """Fraction of the problem's test cases the completion's program passes (0.0 without code)."""
    tests, timeout, memory_mb = _problem_tests(problem)  # malformed spec: raises, counted by score()
    code = extract_code(text)
    if code is None:
        return 0.0
    passed = 0
    for case in tests:
        result = sandbox.run_python(code, stdin=case.input, timeout=timeout, memory_mb=memory_mb)
        if result.ok and outputs_match(result.stdout, case.output):
            passed += 1
        elif result.reason == "timeout":
            break  # the remaining tests count as failed: one timeout per completion at most
    return passed / len(tests)
