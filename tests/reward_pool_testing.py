"""Reward fns the reward-pool tests register by name: module-level, so the pool's worker
processes can import them (a lambda or a nested function cannot be sent; see prolix.trainer.rewards.pool).
Kept apart from the test module so that a worker imports this small file, not pytest and torch.
Nothing is registered on import: each test registers what it uses, after its pool started, which
is what proves the parent's registrations reach running workers."""

import logging
import os
import signal
import time

from prolix.trainer.problem import Problem


def length_over_ten(problem: Problem, text: str) -> float:
    return min(len(text) / 10, 1.0)


def boom(problem: Problem, text: str) -> float:
    raise RuntimeError(f"scorer bug on {text!r}")


def die(problem: Problem, text: str) -> float:
    os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does to a worker
    return 0.0


def slow_first(problem: Problem, text: str) -> float:
    """The text's length; the pair "slow" takes a while, so the chunks finish out of order."""
    if text == "slow":
        time.sleep(0.5)
    return float(len(text))


def logs_a_traceback(problem: Problem, text: str) -> float:
    """Scores 1.0 after logging a caught exception with its traceback (the record must travel home)."""
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("reward_pool_testing").exception("recovered inside the reward for %r", text)
    return 1.0
