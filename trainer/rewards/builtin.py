"""The built-in verifiable rewards: (problem, completion text) -> a float, registered by name.

Importing this module registers them in the registry (`registry.py`); the package's `__init__`
imports it, together with `code_tests.py`.

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
- "code_tests" (`code_tests.py`): sandboxed execution of the completion's program on the
  problem's test cases.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..problem import Problem
from .registry import extract_answer, normalize_answer, register_reward

__all__ = ["exact_reward", "reasoning_gym_reward", "reasoning_gym_binary_reward", "math_verify_reward"]


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
