"""Problem sources: reasoning-gym and file sources, held-out disjointness, validation, and the demo's
worked answers (`demo.worked_answer`)."""

import json
import random

import pytest

from prolix.trainer import rewards
from prolix.trainer.demo import worked_answer
from prolix.trainer.problem import Problem, ProblemSource
from prolix.trainer.tasks import FileSource, MixedSource, ReasoningGymSource, SourceConfig, make_source

# 1-digit, 2-term chain sums: 10 · 10 · 2 = 200 distinct questions, so a 64-question held-out set
# collides with a large share of training draws — the case where disjointness has to be enforced.
TINY_CHAIN_SUM = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)


def rg_source(name="chain_sum", **kw) -> ReasoningGymSource:
    return make_source(SourceConfig(kind="reasoning_gym", name=name, **kw))


# --------------------------------------------------------------------------- reasoning-gym

def test_reasoning_gym_sample_is_a_function_of_the_rng():
    src = rg_source()
    a = [p.prompt for p in src.sample(50, random.Random(7))]
    b = [p.prompt for p in src.sample(50, random.Random(7))]
    c = [p.prompt for p in src.sample(50, random.Random(8))]
    assert a == b
    assert a != c
    rng = random.Random(7)
    first, second = src.sample(50, rng), src.sample(50, rng)
    assert [p.prompt for p in first] != [p.prompt for p in second]  # fresh seeds per call


def test_reasoning_gym_heldout_is_fixed_distinct_and_disjoint_from_training():
    src, again = rg_source(heldout_size=32), rg_source(heldout_size=32)
    held = [p.prompt for p in src.heldout()]
    assert held == [p.prompt for p in again.heldout()]
    assert len(held) == len(set(held)) == 32
    assert held != [p.prompt for p in rg_source(heldout_size=32, seed=1).heldout()]
    train = {p.prompt for p in src.sample(1000, random.Random(0))}
    assert not train & set(held)


def test_heldout_disjoint_even_when_the_problem_space_is_tiny():
    src = rg_source(dataset_kwargs=TINY_CHAIN_SUM, heldout_size=64)
    held = {p.prompt for p in src.heldout()}
    assert len(held) == 64
    draws = src.sample(2000, random.Random(0))
    assert len(draws) == 2000
    assert not {p.prompt for p in draws} & held


def test_heldout_larger_than_the_problem_space_is_an_error():
    with pytest.raises(ValueError, match="distinct questions"):
        rg_source(dataset_kwargs=dict(min_terms=1, max_terms=1, min_digits=1, max_digits=1), heldout_size=64)


def test_reasoning_gym_problem_keeps_the_entry_for_its_scorer():
    p = rg_source(dataset_kwargs={"max_terms": 3}).sample(1, random.Random(0))[0]
    assert isinstance(rg_source(), ProblemSource)
    assert (p.task, p.reward) == ("chain_sum", "reasoning_gym")
    assert p.metadata["dataset"] == "chain_sum" and p.metadata["dataset_kwargs"] == {"max_terms": 3}
    assert p.metadata["entry"]["question"] == p.prompt and p.metadata["entry"]["answer"] == p.answer


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="reasoning-gym", name="chain_sum"), "did you mean 'reasoning_gym'"),
    (dict(kind="reasoning_gym", name="chain_sums"), "did you mean 'chain_sum'"),
    (dict(kind="reasoning_gym", name="chain_sum", dataset_kwargs={"max_term": 3}), "'max_term'.*'max_terms'"),
    (dict(kind="reasoning_gym", name="chain_sum", dataset_kwargs={"min_terms": 0}), "rejected"),
    (dict(kind="reasoning_gym", name="chain_sum", dataset_kwargs={"seed": 3}), "must not set 'seed'"),
    (dict(kind="reasoning_gym", name="chain_sum", reward="no_such_reward"), "unknown reward"),
    (dict(kind="reasoning_gym", name="chain_sum", weight=0), "weight"),
    (dict(kind="reasoning_gym", name="chain_sum", heldout_size=-1), "heldout_size"),
    (dict(kind="jsonl", path="/nonexistent/x.jsonl"), "no such file"),
    (dict(kind="parquet"), "needs path"),
])
def test_bad_source_config_is_rejected_with_a_named_cause(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SourceConfig(**kwargs)


# --------------------------------------------------------------------------- files

def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def write_parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return str(path)


def test_jsonl_source_validates_rows_and_splits_off_a_heldout_set(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "solution": 2 * i, "level": i % 3} for i in range(20)]
    path = write_jsonl(tmp_path / "sums.jsonl", rows)
    src = make_source(SourceConfig(kind="jsonl", path=path, prompt_field="question",
                                   answer_field="solution", heldout_size=5))
    assert isinstance(src, FileSource) and src.name == "sums"
    held = {p.prompt for p in src.heldout()}
    assert len(held) == 5
    train = src.sample(15, random.Random(0))  # exactly the training rows, each once
    assert len({p.prompt for p in train}) == 15 and not {p.prompt for p in train} & held
    p = train[0]
    assert p.reward == "math_verify" and p.task == "sums" and p.answer == str(p.metadata["solution"])
    assert len(src.sample(40, random.Random(0))) == 40  # more than the rows: passes repeat
    assert [q.prompt for q in src.heldout()] == [q.prompt for q in make_source(src.cfg).heldout()]


@pytest.mark.parametrize("bad_row, match", [
    ({"prompt": "q"}, "row 3: missing field 'answer'"),
    ({"prompt": "q", "answer": None}, "row 3: missing field 'answer'"),
    ({"answer": "1"}, "row 3: missing field 'prompt'"),
    ({"prompt": "   ", "answer": "1"}, "row 3: field 'prompt' must be a non-empty string"),
    ({"prompt": "q", "answer": ""}, "row 3: field 'answer' is empty"),
    ({"prompt": "q", "answer": [1, 2]}, "row 3: field 'answer' must be a string or number"),
    ("[1, 2]", "row 3: expected an object"),
    ("{not json", "row 3: invalid JSON"),
])
def test_jsonl_bad_row_is_named_by_row_and_field(tmp_path, bad_row, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": 2}, bad_row])
    with pytest.raises(ValueError, match=match):
        make_source(SourceConfig(kind="jsonl", path=path, heldout_size=0))


def test_jsonl_blank_lines_are_skipped_but_counted(tmp_path):
    path = write_jsonl(tmp_path / "gaps.jsonl", [{"prompt": "a", "answer": "1"}, "", {"prompt": "c"}])
    with pytest.raises(ValueError, match="row 3"):
        make_source(SourceConfig(kind="jsonl", path=path, heldout_size=0))


def test_parquet_source_and_its_bad_rows(tmp_path):
    good = write_parquet(tmp_path / "good.parquet", {"prompt": [f"q{i}" for i in range(10)], "answer": list(range(10))})
    src = make_source(SourceConfig(kind="parquet", path=good, heldout_size=2))
    assert len(src.heldout()) == 2 and len(src.sample(8, random.Random(1))) == 8
    no_col = write_parquet(tmp_path / "nocol.parquet", {"prompt": ["q"], "label": ["1"]})
    with pytest.raises(ValueError, match="missing field 'answer'.*columns"):
        make_source(SourceConfig(kind="parquet", path=no_col))
    null = write_parquet(tmp_path / "null.parquet", {"prompt": ["q0", None], "answer": ["1", "2"]})
    with pytest.raises(ValueError, match="row 2: missing field 'prompt'"):
        make_source(SourceConfig(kind="parquet", path=null, heldout_size=0))


def test_heldout_that_leaves_no_training_rows_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"prompt": "same", "answer": str(i)} for i in range(5)])
    with pytest.raises(ValueError, match="no training rows"):
        make_source(SourceConfig(kind="jsonl", path=path, heldout_size=1))


# --------------------------------------------------------------------------- mixing

def test_mixed_source_draws_in_proportion_to_weights(tmp_path):
    cfgs = [SourceConfig(kind="jsonl", path=write_jsonl(tmp_path / f"{name}.jsonl",
                         [{"prompt": f"{name}{i}", "answer": "1"} for i in range(50)]), weight=w, heldout_size=3)
            for name, w in (("a", 3.0), ("b", 1.0))]
    src = make_source(cfgs)
    assert isinstance(src, MixedSource)
    draws = src.sample(4000, random.Random(0))
    share_a = sum(p.task == "a" for p in draws) / len(draws)
    assert abs(share_a - 0.75) < 0.03  # binomial sd ≈ 0.007
    assert [p.prompt for p in draws] == [p.prompt for p in src.sample(4000, random.Random(0))]
    assert len(src.heldout()) == 6 and {p.task for p in src.heldout()} == {"a", "b"}


# --------------------------------------------------------------------------- worked answers

@pytest.mark.parametrize("name, kwargs", [
    ("chain_sum", {}),
    ("basic_arithmetic", {}),
    ("basic_arithmetic", {"whitespace": "no_space", "format_style": "natural"}),
    # Without parentheses reasoning-gym evaluates left to right, which equals Python's order only
    # for + and - (its "/" there even prints a different divisor than it uses).
    ("basic_arithmetic", {"allow_parentheses": False, "operators": ["+", "-"]}),
])
def test_worked_answer_scores_1_with_the_reasoning_gym_scorer(name, kwargs):
    src = rg_source(name, dataset_kwargs=kwargs, heldout_size=0)
    for p in src.sample(300, random.Random(0)):
        assert rewards.score(p, worked_answer(p)) == 1.0, (p.prompt, worked_answer(p))


def test_worked_answer_reduces_one_operation_per_line_in_evaluation_order():
    entry = {"question": "Calculate ( 56 + -33 ) - 84 * -(2 - 4).", "answer": "-145",
             "metadata": {"expression": "( 56 + -33 ) - 84 * -(2 - 4)"}}
    p = Problem(prompt=entry["question"], answer="-145", task="basic_arithmetic", reward="reasoning_gym",
                metadata={"dataset": "basic_arithmetic", "entry": entry})
    assert worked_answer(p) == "56 + -33 = 23\n2 - 4 = -2\n84 * 2 = 168\n23 - 168 = -145\n<answer>-145</answer>"


def test_worked_answer_refuses_an_expression_that_disagrees_with_the_gold():
    src = rg_source("basic_arithmetic", dataset_kwargs={"allow_parentheses": False, "operators": ["*", "/"]},
                    heldout_size=0)
    with pytest.raises(ValueError, match="!= gold"):
        for p in src.sample(50, random.Random(0)):
            worked_answer(p)


def test_worked_answer_refuses_tasks_it_cannot_solve():
    with pytest.raises(ValueError, match="worked_answer supports"):
        worked_answer(Problem(prompt="q", answer="1", task="other", reward="exact", metadata={}))
