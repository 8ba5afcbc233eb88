"""Rewards: the registry, the built-in rewards, the code reward, its sandbox and the reward pool.

    registry.py     `register_reward`, `get_reward`, `score` (a failing reward scores 0.0 and is
                    counted), the answer parsing the rewards share; the leaf the others import
    builtin.py      "exact", "reasoning_gym", "reasoning_gym_binary", "math_verify"
    code_tests.py   "code_tests": the completion's program run on the problem's test cases
    sandbox/        `run_python`: untrusted code in a throw-away sandbox, with a Python launcher
                    (`launcher.py`) and the native one (`prolix-sandbox`, built from csrc/sandbox/)
    pool.py         `RewardPool`: scores a batch on worker processes

Importing this package (or any module of it) registers every built-in reward, so a reward name
is known however the program started. The names below are the package's API: the trainer, the
benchmarks and the tests import them from here.
"""

from . import sandbox
from .builtin import exact_reward, math_verify_reward, reasoning_gym_binary_reward, reasoning_gym_reward
from .code_tests import TestCase, code_problem, code_tests_reward, extract_code, outputs_match, parse_tests
from .pool import CHUNKS_PER_WORKER, RewardPool
from .registry import (
    REWARDS,
    RewardFn,
    extract_answer,
    get_reward,
    load_callable,
    normalize_answer,
    pop_reward_errors,
    register_reward,
    reward_errors,
    score,
)
from .sandbox import MAX_PROCESSES, REASONS, SandboxError, SandboxResult, run_python

__all__ = [
    # the registry
    "RewardFn", "REWARDS", "register_reward", "load_callable", "get_reward", "extract_answer",
    "normalize_answer", "score", "reward_errors", "pop_reward_errors",
    # the built-in rewards
    "exact_reward", "reasoning_gym_reward", "reasoning_gym_binary_reward", "math_verify_reward",
    # the code reward and its sandbox
    "code_tests_reward", "TestCase", "parse_tests", "code_problem", "extract_code", "outputs_match",
    "sandbox", "run_python", "SandboxResult", "SandboxError", "REASONS", "MAX_PROCESSES",
    # the pool
    "RewardPool", "CHUNKS_PER_WORKER",
]
