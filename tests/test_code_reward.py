"""The "code_tests" reward: fraction of test cases passed, code extraction, spec validation, and
hostile programs scoring 0 without disturbing the caller."""

import json
import os
import time

import pytest

from prolix.trainer import rewards
from prolix.trainer.problem import Problem
from prolix.trainer.rewards import code_problem, code_tests, extract_code, outputs_match, parse_tests, sandbox

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
SUM_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "20 22", "output": "42"},
             {"input": "-5 5\n", "output": "0\n"}]


def fenced(code: str) -> str:
    return f"Let me think.\n```python\n{code}```\nDone."


@pytest.fixture
def add_problem() -> Problem:
    return code_problem("Add two integers.", SUM_TESTS, timeout=2.0)


@pytest.fixture(autouse=True)
def no_stale_errors():
    rewards.pop_reward_errors()
    yield


def test_reward_is_the_fraction_of_tests_passed(add_problem):
    assert rewards.score(add_problem, fenced(ADD)) == 1.0
    wrong_on_negatives = "a, b = map(int, input().split())\nprint(abs(a) + abs(b))\n"  # passes 2 of 3
    assert rewards.score(add_problem, fenced(wrong_on_negatives)) == pytest.approx(2 / 3)
    assert rewards.score(add_problem, fenced("print(0)\n")) == pytest.approx(1 / 3)
    assert rewards.pop_reward_errors() == {}


@pytest.mark.parametrize("text, expected", [
    ("```python\nprint(1)\n```\nthen\n```python\nprint(2)\n```", "print(2)\n"),  # the last python block
    ("```py\nprint(1)\n```\n```text\nnot code\n```", "print(1)\n"),  # non-python blocks are skipped
    ("```Python3\nprint(3)\n```", "print(3)\n"),
    ("<answer>\nprint(4)\n</answer>", "print(4)"),  # no python block: the <answer> content
    ("<answer>```\nprint(5)\n```</answer>", "print(5)\n"),  # a fenced answer is unwrapped
    ("```python\nprint(6)\n```<answer>7</answer>", "print(6)\n"),  # a python block wins over <answer>
    ("```python\nprint(8)\n", None),  # an unclosed (truncated) block is not code
    ("no code at all", None),
    ("<answer>   </answer>", None),
])
def test_code_is_extracted_from_the_last_python_block_else_the_answer(text, expected):
    assert extract_code(text) == expected


def test_answer_tag_code_is_scored(add_problem):
    assert rewards.score(add_problem, f"<answer>\n{ADD}</answer>") == 1.0


def test_no_code_scores_zero_and_is_not_an_error(add_problem):
    assert rewards.score(add_problem, "I cannot solve this.") == 0.0
    assert rewards.pop_reward_errors() == {}


@pytest.mark.parametrize("actual, expected, same", [
    ("3\n", "3", True),
    ("3  \n\n\n", "3\n", True),  # trailing spaces and blank lines do not count
    ("1 2\n3\n", "1 2\r\n3", True),
    ("3 4", "3  4", False),  # inner whitespace does
    (" 3", "3", False),  # so does leading whitespace
    ("", "0", False),
    ("3\n4", "3", False),
])
def test_outputs_match_ignores_only_trailing_whitespace(actual, expected, same):
    assert outputs_match(actual, expected) is same


def test_tests_come_from_metadata_or_from_the_answer_in_either_shape():
    columns = {"inputs": ["1 2", "3 4"], "outputs": ["3", "7"]}
    rows = [{"input": "1 2", "output": "3"}, {"input": "3 4", "output": "7"}]

    problems = [
        Problem("p", "unused", "t", "code_tests", {"tests": rows}),
        Problem("p", "unused", "t", "code_tests", {"tests": json.dumps(columns)}),  # parquet: JSON text
        Problem("p", json.dumps(rows), "t", "code_tests", {}),  # no metadata: the answer is the spec
        Problem("p", json.dumps(columns), "t", "code_tests", {}),
    ]
    for p in problems:
        assert rewards.score(p, fenced(ADD)) == 1.0
    assert rewards.pop_reward_errors() == {}


@pytest.mark.parametrize("tests, match", [
    ([], "non-empty list"),
    ("not json", "not valid JSON"),
    ([{"input": "1"}], r"tests\[0\]: expected an object with exactly 'input' and 'output'"),
    ([{"input": "1", "output": 3}], r"tests\[0\]\.output: must be a string, got int"),
    ({"inputs": ["1"], "outputs": []}, "equal length"),
    ({"inputs": ["1"]}, "exactly 'inputs' and 'outputs'"),
    (42, "non-empty list"),
])
def test_malformed_spec_is_refused_when_the_problem_is_built(tests, match):
    with pytest.raises(ValueError, match=match):
        code_problem("q", tests)


@pytest.mark.parametrize("kwargs, match", [({"timeout": 0}, "timeout"), ({"memory_mb": 8}, "memory_mb")])
def test_bad_limits_are_refused_when_the_problem_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        code_problem("q", SUM_TESTS, **kwargs)


def test_malformed_spec_in_a_dataset_row_scores_zero_and_is_counted():
    row = Problem("p", "42", "t", "code_tests", {"tests": [{"in": "1", "out": "1"}]})  # as a FileSource builds it
    assert rewards.score(row, fenced(ADD)) == 0.0
    assert rewards.score(Problem("p", "not a spec", "t", "code_tests", {}), fenced(ADD)) == 0.0
    assert rewards.pop_reward_errors() == {"code_tests": 2}
    with pytest.raises(ValueError, match=r"metadata\['tests'\]\[0\]"):
        parse_tests(row.metadata["tests"], "metadata['tests']")


def test_after_a_timeout_the_remaining_tests_are_not_run():
    p = code_problem("q", [{"input": str(k), "output": "x"} for k in range(5)], timeout=0.5)
    start = time.monotonic()
    assert rewards.score(p, fenced("while True:\n    pass\n")) == 0.0
    assert time.monotonic() - start < 1.5  # one timeout, not five


def test_a_sandbox_that_cannot_start_is_a_counted_error(add_problem, monkeypatch):
    monkeypatch.setattr(sandbox, "PYTHON", "/nonexistent/python3")
    assert rewards.score(add_problem, fenced(ADD)) == 0.0
    assert rewards.pop_reward_errors() == {"code_tests": 1}


def _process_cap_holds() -> bool:
    """Harmless check (sleeping children, bounded) that RLIMIT_NPROC binds before running a bomb."""
    code = ("import os, time\nn = 0\nfor _ in range(100):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
            "    n += 1\nprint(n)\n")
    r = sandbox.run_python(code, timeout=5)
    return r.ok and int(r.stdout) <= sandbox.MAX_PROCESSES


HOSTILE = {
    "infinite_loop": "while True:\n    pass\n",
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "memory_bomb": "x = []\nwhile True:\n    x.append(bytearray(64 << 20))\n",
    "write_outside": "open('/etc/prolix-pwned', 'w').write('x')\nprint(3)\n",
    "read_secrets": "print(open('/etc/shadow').read())\n",
    "socket": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\nprint(3)\n",
    "print_1gb": "import sys\nfor _ in range(1024):\n    sys.stdout.write('3\\n' * (1 << 19))\n",
    "syntax_error": "def f(:\n",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_scores_zero_and_the_caller_keeps_running(name):
    if name == "fork_bomb":
        assert _process_cap_holds(), "process cap not in force: refusing to run the bomb"
    p = code_problem("q", [{"input": "1 2", "output": "3"}], timeout=1.0, memory_mb=128)
    assert rewards.score(p, fenced(HOSTILE[name])) == 0.0
    assert rewards.pop_reward_errors() == {}  # a wrong answer, not a reward failure
    assert rewards.score(p, fenced(ADD)) == 1.0  # and the next completion is scored normally
    assert not os.path.exists("/etc/prolix-pwned")


def test_code_tests_is_registered():
    assert rewards.get_reward("code_tests") is code_tests.code_tests_reward
