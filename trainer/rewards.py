"""Verifiable rewards: (problem, completion text) -> a float, picked by name from a registry.

A reward fn is `RewardFn = Callable[[Problem, str], float]`; the built-in ones return values in
[0, 1]. `Problem.reward` names the fn that scores a problem, either a key of `REWARDS` or a user
callable written "pkg.module:function" (imported once, then cached). Adding a reward is one
decorated function:

    @register_reward("my_reward")
    def my_reward(problem, text): return float(text.strip() == problem.answer)

Built-in rewards
- "reasoning_gym": the content of the last `<answer>...</answer>` scored by the dataset's own
  `score_answer(answer, entry)`, on a dataset built with the *same* `dataset_kwargs` as the source
  (some scorers read their config, e.g. puzzle24's value range). These scorers may give partial
  credit: chain_sum gives len(gold)/len(answer) when the gold string occurs inside a longer answer.
- "reasoning_gym_binary": the same, thresholded: 1.0 only for a full score, else 0.0.
- "math_verify": math-verify's `parse` on the gold and on the extracted answer, then `verify`.
  Bare strings are parsed as LaTeX math (`$...$`) first, so "\\frac{1}{2}", "1/2" and "0.5" are
  equal. Without an `<answer>` tag the whole completion is parsed (math-verify then takes the
  last `\\boxed{}` or, failing that, the last number/expression in the text): math models are
  usually trained to box rather than tag. math-verify's timeouts use `signal.alarm`, which only
  works in the main thread, so off the main thread they are disabled.
- "exact": string equality of the extracted answer and the gold after `normalize_answer`
  (surrounding whitespace and one trailing period dropped, inner whitespace runs collapsed,
  case folded). No tag, no reward.

`score(problem, text)` never lets a reward fn crash a run: a fn that raises, or returns NaN/inf,
scores 0.0, is counted in `reward_errors` (by reward name) and logged (the first time per reward
and exception type; later ones at DEBUG). An unknown reward *name* is a config error and raises.
"""

from __future__ import annotations

import collections
import functools
import importlib
import logging
import math
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tasks import Problem

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
]

log = logging.getLogger(__name__)

RewardFn = Callable[["Problem", str], float]
REWARDS: dict[str, RewardFn] = {}

reward_errors: collections.Counter[str] = collections.Counter()  # reward name -> failures
_warned: set[tuple[str, str]] = set()
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
        level = logging.DEBUG if key in _warned else logging.WARNING
        _warned.add(key)
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


# --------------------------------------------------------------------------- built-in rewards

@register_reward("exact")
def exact_reward(problem: Problem, text: str) -> float:
    answer = extract_answer(text)
    if answer is None:
        return 0.0
    return float(normalize_answer(answer) == normalize_answer(problem.answer))


_RG_SCORERS: dict[tuple[str, str], Callable] = {}


def _rg_scorer(name: str, kwargs: dict) -> Callable:
    """`score_answer` of a dataset built like the source's; cached (some datasets are slow to build)."""
    key = (name, repr(sorted(kwargs.items())))  # kwargs may hold lists: key on their repr
    if key not in _RG_SCORERS:
        import reasoning_gym

        _RG_SCORERS[key] = reasoning_gym.create_dataset(name, seed=0, size=1, **kwargs).score_answer
    return _RG_SCORERS[key]


@register_reward("reasoning_gym")
def reasoning_gym_reward(problem: Problem, text: str) -> float:
    """The dataset's own scorer on the extracted answer; metadata from `tasks.ReasoningGymSource`."""
    answer = extract_answer(text)
    if answer is None:
        return 0.0
    meta = problem.metadata
    for key in ("dataset", "entry"):
        if key not in meta:
            raise ValueError(f"reasoning_gym reward needs problem.metadata[{key!r}] "
                             f"(set by a reasoning_gym source); got keys {sorted(meta)}")
    scorer = _rg_scorer(meta["dataset"], meta.get("dataset_kwargs", {}))
    return float(scorer(answer, meta["entry"]))


@register_reward("reasoning_gym_binary")
def reasoning_gym_binary_reward(problem: Problem, text: str) -> float:
    return float(reasoning_gym_reward(problem, text) >= 1.0)


def _math_parse(text: str, timeout: int | None, *, as_math: bool) -> list:
    from math_verify import parse

    if as_math and "$" not in text and "\\boxed" not in text:
        parsed = parse(f"${text}$", parsing_timeout=timeout)
        if parsed:
            return parsed
    return parse(text, parsing_timeout=timeout)


@register_reward("math_verify")
def math_verify_reward(problem: Problem, text: str) -> float:
    from math_verify import verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = _math_parse(problem.answer, timeout, as_math=True)
    if not gold:
        raise ValueError(f"math-verify cannot parse the gold answer {problem.answer!r}")
    answer = extract_answer(text)
    target = _math_parse(text if answer is None else answer, timeout, as_math=answer is not None)
    if not target:
        return 0.0
    return float(verify(gold, target, timeout_seconds=timeout))


# Registers "code_tests" (sandboxed execution of model-written programs); imported last because it
# uses register_reward from this module.
from . import code_reward  # noqa: E402,F401
