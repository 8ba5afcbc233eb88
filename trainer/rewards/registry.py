"""The reward registry: reward fns by name, and `score`, which never lets one crash a run.

A reward fn is `RewardFn = Callable[[Problem, str], float]`; the built-in ones return values in
[0, 1]. `Problem.reward` names the fn that scores a problem, either a key of `REWARDS` or a user
callable written "pkg.module:function" (imported once, then cached). Adding a reward is one
decorated function:

    @register_reward("my_reward")
    def my_reward(problem, text): return float(text.strip() == problem.answer)

The package's `__init__` imports the built-in rewards (`builtin.py`, `code_tests.py`), so importing
any module of `prolix.trainer.rewards` registers them, however the program started. This module
is the leaf the reward modules import: it imports no reward.

`score(problem, text)` never lets a reward fn crash a run: a fn that raises, or returns NaN/inf,
scores 0.0, is counted in `reward_errors` (by reward name) and logged (the first time per reward
and exception type, remembered in `warned_failures`; later ones at DEBUG). An unknown reward
*name* is a config error and raises. `extract_answer` / `normalize_answer` are the answer parsing
the rewards share.
"""

from __future__ import annotations

import collections
import functools
import importlib
import logging
import math
import re
from collections.abc import Callable

from ..problem import Problem

__all__ = [
    "RewardFn",
    "REWARDS",
    "register_reward",
    "load_callable",
    "get_reward",
    "extract_answer",
    "normalize_answer",
    "score",
    "reward_errors",
    "pop_reward_errors",
    "warned_failures",
]

log = logging.getLogger(__name__)

RewardFn = Callable[["Problem", str], float]
REWARDS: dict[str, RewardFn] = {}

reward_errors: collections.Counter[str] = collections.Counter()  # reward name -> failures
warned_failures: set[tuple[str, str]] = set()  # (reward, exception type) logged at WARNING
_CALLABLE_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def register_reward(name: str, *, overwrite: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator: add `fn` to `REWARDS` under `name` (a duplicate name raises unless `overwrite`)."""
    if not name or ":" in name:
        raise ValueError(f"reward name must be non-empty and contain no ':', got {name!r}")

    def decorator(fn: RewardFn) -> RewardFn:
        if name in REWARDS and not overwrite and REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered ({REWARDS[name]!r})")
        REWARDS[name] = fn
        return fn

    return decorator


@functools.cache
def load_callable(spec: str) -> Callable:
    """Import "pkg.module:attr[.attr]" and return the callable it names (cached per spec)."""
    if not isinstance(spec, str) or not _CALLABLE_RE.match(spec):
        raise ValueError(f"a callable must be written 'pkg.module:function', got {spec!r}")
    module_name, attr_path = spec.split(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} for {spec!r}: {e}") from e
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            public = sorted(n for n in dir(obj) if not n.startswith("_"))
            raise ValueError(f"{getattr(obj, '__name__', obj)!r} has no attribute {attr!r} (needed by {spec!r}); "
                             f"it has: {', '.join(public[:30]) or 'nothing public'}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ValueError(f"{spec!r} names a {type(obj).__name__}, not a callable")
    return obj


def get_reward(name: str) -> RewardFn:
    """The reward fn called `name`: a `REWARDS` key or a "pkg.module:function" user callable."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        return load_callable(name)
    raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)} "
                     "(or give a user callable as 'pkg.module:function')")


def score(problem: Problem, text: str) -> float:
    """Reward of completion `text` for `problem` via `problem.reward`; a failing fn gives 0.0."""
    fn = get_reward(problem.reward)  # unknown name: a config error, raised
    try:
        value = float(fn(problem, text))
        if not math.isfinite(value):
            raise ValueError(f"reward fn returned {value}")
        return value
    except Exception as e:  # noqa: BLE001 — one bad completion or scorer must not end a long run
        reward_errors[problem.reward] += 1
        key = (problem.reward, type(e).__name__)
        level = logging.DEBUG if key in warned_failures else logging.WARNING
        warned_failures.add(key)
        log.log(level, "reward %r raised on a %r problem, scored 0.0 (%d failures so far): %s: %s",
                problem.reward, problem.task, reward_errors[problem.reward], type(e).__name__, e)
        return 0.0


def pop_reward_errors() -> dict[str, int]:
    """Failure counts since the last call (for per-step logging), then reset them."""
    counts = dict(reward_errors)
    reward_errors.clear()
    return counts


# --------------------------------------------------------------------------- answer extraction

def extract_answer(text: str) -> str | None:
    """Content of the last `<answer>...</answer>`, whitespace-stripped; None if there is none.

    "Last" is anchored on the last closing tag and the nearest opening tag before it, so a stray
    earlier `<answer>` cannot swallow text ("<answer>a <answer>b</answer>" -> "b").
    """
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>"):end].strip()


def normalize_answer(answer: str) -> str:
    """Whitespace runs collapsed, ends stripped, one trailing '.' dropped, case folded."""
    answer = " ".join(answer.split())
    if answer.endswith("."):
        answer = answer[:-1].rstrip()
    return answer.casefold()
