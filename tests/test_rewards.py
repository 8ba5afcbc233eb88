"""Reward fns: answer extraction, the built-in scorers, user callables, and failure isolation."""

import logging
import random
import sys
import textwrap

import pytest

from prolix.trainer import rewards
from prolix.trainer.problem import Problem
from prolix.trainer.rewards import extract_answer, load_callable, register_reward, score
from prolix.trainer.tasks import SourceConfig, make_source


def problem(answer, reward, **meta) -> Problem:
    return Problem(prompt="q", answer=answer, task="t", reward=reward, metadata=meta)


@pytest.mark.parametrize("text, expected", [
    ("<answer> 42 </answer>", "42"),
    ("<answer>1</answer> then <answer>\n2\n</answer> done", "2"),  # the last one counts
    ("<answer>a <answer>b</answer>", "b"),  # a stray opening tag does not swallow text
    ("<answer></answer>", ""),
    ("the answer is 42", None),
    ("<answer>42", None),
    ("42</answer>", None),
])
def test_extract_answer_takes_the_last_tagged_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.fixture(scope="module")
def chain_sum_problem() -> Problem:
    src = make_source(SourceConfig(kind="reasoning_gym", name="chain_sum", heldout_size=0))
    return src.sample(1, random.Random(3))[0]


def test_reasoning_gym_reward_uses_the_dataset_scorer(chain_sum_problem):
    p = chain_sum_problem
    assert score(p, f"thinking...\n<answer>{p.answer}</answer>") == 1.0
    assert score(p, f"<answer>{int(p.answer) + 1}</answer>") == 0.0
    assert score(p, f"the answer is {p.answer}") == 0.0  # no tag, no reward
    assert score(p, f"<answer>{p.answer}.00</answer>") == 1.0  # chain_sum's scorer accepts decimals


def test_reasoning_gym_binary_reward_drops_partial_credit(chain_sum_problem):
    p = chain_sum_problem
    padded = f"<answer>{p.answer} or maybe 7</answer>"  # chain_sum gives len(gold)/len(answer) here
    assert 0 < score(p, padded) < 1
    binary = Problem(p.prompt, p.answer, p.task, "reasoning_gym_binary", p.metadata)
    assert score(binary, padded) == 0.0 and score(binary, f"<answer>{p.answer}</answer>") == 1.0


@pytest.mark.parametrize("gold, text, expected", [
    ("\\frac{1}{2}", "<answer>0.5</answer>", 1.0),
    ("0.5", "<answer>\\frac{1}{2}</answer>", 1.0),
    ("1/2", "<answer>0.5</answer>", 1.0),
    ("x^2+1", "<answer>1 + x^2</answer>", 1.0),
    ("\\frac{1}{2}", "<answer>0.6</answer>", 0.0),
    ("\\frac{1}{2}", "so the result is \\boxed{\\frac{2}{4}}.", 1.0),  # no tag: last boxed
    ("7", "first 3, then finally 7", 1.0),  # no tag, no box: last number
    ("7", "seven", 0.0),
])
def test_math_verify_reward(gold, text, expected):
    assert score(problem(gold, "math_verify"), text) == expected


@pytest.mark.parametrize("text, expected", [
    ("<answer>  Paris. </answer>", 1.0),
    ("<answer>PARIS</answer>", 1.0),
    ("<answer>Lyon</answer>", 0.0),
    ("Paris", 0.0),
])
def test_exact_reward_compares_normalised_strings(text, expected):
    assert score(problem("paris", "exact"), text) == expected


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "prolix_user_rewards.py").write_text(textwrap.dedent("""
        def length_reward(problem, text):
            return min(len(text) / 10, 1.0)
        def boom(problem, text):
            raise RuntimeError("scorer bug")
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "prolix_user_rewards"
    sys.modules.pop("prolix_user_rewards", None)
    load_callable.cache_clear()


def test_user_callable_reward_is_loaded_by_path(user_module):
    assert score(problem("x", f"{user_module}:length_reward"), "12345") == 0.5
    assert SourceConfig(kind="reasoning_gym", name="chain_sum", reward=f"{user_module}:length_reward")


@pytest.mark.parametrize("spec, match", [
    ("no_colon_here", "pkg.module:function"),
    ("prolix_no_such_module_xyz:fn", "cannot import module"),
    ("{mod}:missing_fn", "has no attribute 'missing_fn'"),
    ("{mod}:NOT_CALLABLE", "not a callable"),
])
def test_load_callable_errors_name_the_problem(user_module, spec, match):
    with pytest.raises(ValueError, match=match):
        load_callable(spec.format(mod=user_module))


def test_raising_reward_scores_zero_is_counted_and_logged(user_module, caplog):
    rewards.pop_reward_errors()
    bad = problem("x", f"{user_module}:boom")
    with caplog.at_level(logging.WARNING, logger="prolix.trainer.rewards"):
        assert score(bad, "anything") == 0.0
        assert score(bad, "again") == 0.0
    assert rewards.pop_reward_errors() == {f"{user_module}:boom": 2}
    assert rewards.pop_reward_errors() == {}
    assert sum("scorer bug" in r.getMessage() for r in caplog.records) == 1  # warned once, then DEBUG


def test_non_finite_reward_scores_zero(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "test_nan", lambda p, t: float("nan"))
    rewards.pop_reward_errors()
    assert score(problem("x", "test_nan"), "t") == 0.0
    assert rewards.pop_reward_errors() == {"test_nan": 1}


def test_unparseable_gold_is_a_counted_failure_not_a_crash():
    rewards.pop_reward_errors()
    assert score(problem("   ", "math_verify"), "<answer>1</answer>") == 0.0  # math-verify parses nothing
    assert rewards.pop_reward_errors() == {"math_verify": 1}


def test_unknown_reward_name_raises():
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        score(problem("x", "nope"), "t")


def test_register_reward_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_reward("exact")(lambda p, t: 1.0)
