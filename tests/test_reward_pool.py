"""The reward pool scores exactly like the serial loop, whatever the number of workers, brings the
workers' failures home, knows the parent's rewards, and fails clearly (never hangs) when a worker dies.

The pools with processes are module-scoped: a worker's start (a fresh interpreter importing the
rewards, sympy on the first math-verify call) costs about a second, the rest is
milliseconds, so each worker count starts once."""

import logging
import multiprocessing
import os
import random
import signal
import threading

import pytest
import reward_pool_testing as user
import torch

from prolix.trainer import rewards
from prolix.trainer.problem import Problem
from prolix.trainer.rewards import (
    CHUNKS_PER_WORKER,
    RewardPool,
    code_problem,
    pop_reward_errors,
    register_reward,
    registry,
    score,
)
from prolix.trainer.tasks import SourceConfig, make_source

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
NO_DEADLOCK_S = 60  # a dead worker must give an error well before this


class Text:
    """The one field of engines.Completion that is scored."""

    def __init__(self, text: str):
        self.text = text


def texts(*items: str) -> list[Text]:
    return [Text(t) for t in items]


@pytest.fixture(scope="module")
def mixed_batch() -> tuple[list[Problem], list[list[Text]]]:
    """One problem of each kind of reward, three completions each: right, wrong, and a third case
    (partial credit, another form of the right answer, no code at all)."""
    chain = make_source(SourceConfig(kind="reasoning_gym", name="chain_sum", heldout_size=0)).sample(
        1, random.Random(3))[0]
    add = code_problem("Add two integers.", [{"input": "1 2\n", "output": "3\n"}, {"input": "-5 5", "output": "0"}],
                       timeout=2.0)
    problems = [Problem("q", "Paris", "capital", "exact"), chain, Problem("q", "\\frac{1}{2}", "half", "math_verify"),
                add]
    outs = [texts("<answer> paris. </answer>", "<answer>Lyon</answer>", "Paris"),
            texts(f"<answer>{chain.answer}</answer>", f"<answer>{int(chain.answer) + 1}</answer>",
                  f"<answer>{chain.answer} or maybe 7</answer>"),  # chain_sum's partial credit
            texts("<answer>0.5</answer>", "<answer>0.6</answer>", "so \\boxed{\\frac{2}{4}}"),
            texts(f"```python\n{ADD}```", "```python\nprint(3)\n```", "I cannot solve this.")]
    return problems, outs


@pytest.fixture(scope="module")
def pools():
    """RewardPool(1) and RewardPool(2), started once for the module."""
    made = {w: RewardPool(w) for w in (1, 2)}
    yield made
    for pool in made.values():
        pool.close()


@pytest.fixture(autouse=True)
def no_stale_errors():
    pop_reward_errors()
    yield
    pop_reward_errors()


@pytest.fixture
def registered():
    """register_reward(name)(fn) for the test's duration (at run time: the pools already started)."""
    names = []

    def register(name: str, fn) -> str:
        register_reward(name)(fn)
        names.append(name)
        return name

    yield register
    for name in names:
        rewards.REWARDS.pop(name, None)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_scores_equal_the_serial_loop_on_every_kind_of_reward(workers, mixed_batch, pools):
    problems, outs = mixed_batch
    serial = [[score(p, c.text) for c in cs] for p, cs in zip(problems, outs)]
    assert serial[0] == [1.0, 0.0, 0.0] and serial[3] == [1.0, 0.5, 0.0]  # the batch tests what it says
    assert 0 < serial[1][2] < 1 and serial[2] == [1.0, 0.0, 1.0]
    pool = RewardPool(0) if workers == 0 else pools[workers]
    scored = pool.score(problems, outs)
    assert scored.dtype == torch.float32 and tuple(scored.shape) == (4, 3)
    assert torch.equal(scored, torch.tensor(serial))  # exact: the loop's fp32 values in the same places
    assert pop_reward_errors() == {}


def test_results_keep_their_order_when_chunks_finish_out_of_order(pools, registered, monkeypatch):
    name = registered("test_pool_slow_first", user.slow_first)
    pool = pools[2]
    problem = Problem("q", "", "t", name)
    outs = [texts("slow", "a", "bb"), texts("ccc", "dddd", "eeeee"), texts(*("f" * k for k in range(6, 9))),
            texts(*("g" * k for k in range(9, 12)))]
    submits = []
    real_submit = pool._executor.submit
    monkeypatch.setattr(pool._executor, "submit", lambda *a: submits.append(a) or real_submit(*a))
    scored = pool.score([problem] * 4, outs)
    assert scored.tolist() == [[4.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0], [9.0, 10.0, 11.0]]
    assert 1 < len(submits) <= 2 * CHUNKS_PER_WORKER  # chunks, not one future per completion


def test_reward_errors_in_workers_reach_the_parent_counter_and_log(pools, registered, caplog):
    name = registered("test_pool_boom", user.boom)
    registry.warned_failures.discard((name, "RuntimeError"))
    problem = Problem("q", "", "t", name)
    with caplog.at_level(logging.WARNING, logger="prolix.trainer.rewards.registry"):
        scored = pools[2].score([problem, problem], [texts("a", "b", "c"), texts("d", "e", "f")])
    assert scored.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert pop_reward_errors() == {name: 6}
    warned = [r for r in caplog.records if "scorer bug" in r.getMessage()]
    assert 1 <= len(warned) <= 2  # once per worker at most, then DEBUG, as `score` does in one process
    assert all(r.levelno == logging.WARNING and r.name == "prolix.trainer.rewards.registry" for r in warned)
    with caplog.at_level(logging.WARNING, logger="prolix.trainer.rewards.registry"):
        caplog.clear()
        pools[2].score([problem], [texts("again")])
    assert pop_reward_errors() == {name: 1}
    assert not [r for r in caplog.records if "scorer bug" in r.getMessage()]  # the parent warned already


def test_a_record_logged_in_a_worker_arrives_with_its_traceback_text(pools, registered, caplog):
    problem = Problem("q", "", "t", registered("test_pool_logs", user.logs_a_traceback))
    with caplog.at_level(logging.ERROR, logger="reward_pool_testing"):
        assert pools[1].score([problem], [texts("xyz")]).tolist() == [[1.0]]
    (record,) = [r for r in caplog.records if r.name == "reward_pool_testing"]
    assert record.getMessage() == "recovered inside the reward for 'xyz'" and record.levelno == logging.ERROR
    assert "ZeroDivisionError" in record.exc_text and record.processName != multiprocessing.current_process().name


def test_a_reward_registered_in_the_parent_after_the_workers_started_is_used(pools, registered):
    pools[1].score([Problem("q", "Paris", "t", "exact")], [texts("<answer>Paris</answer>")])  # workers up
    name = registered("test_pool_length", user.length_over_ten)
    problem = Problem("q", "", "t", name)
    assert pools[1].score([problem], [texts("12345", "x" * 30)]).tolist() == [[0.5, 1.0]]
    spec = Problem("q", "", "t", "reward_pool_testing:length_over_ten")  # a "module:function" reward
    assert pools[1].score([spec], [texts("12")]).tolist() == [[pytest.approx(0.2)]]


def test_unsendable_or_unknown_rewards_raise_before_anything_is_sent(registered, monkeypatch):
    pool = RewardPool(1)
    monkeypatch.setattr(pool._executor, "submit", lambda *a: pytest.fail(f"sent {a}"))
    name = registered("test_pool_lambda", lambda problem, text: 1.0)
    with pytest.raises(ValueError, match="test_pool_lambda.*cannot be sent to the worker processes"):
        pool.score([Problem("q", "", "t", name)], [texts("a")])
    with pytest.raises(ValueError, match="unknown reward 'no_such_reward'"):
        pool.score([Problem("q", "", "t", "no_such_reward")], [texts("a")])
    with pytest.raises(ValueError, match="same length, got 1 and 2"):
        pool.score([Problem("q", "", "t", "exact")], [texts("a"), texts("b")])
    monkeypatch.undo()
    pool.close()


def _error_of_score(pool: RewardPool, problems: list[Problem], outs: list[list[Text]]) -> BaseException | None:
    """What `pool.score` raised, run in a thread that the test gives up on after NO_DEADLOCK_S."""
    outcome = {}

    def run():
        try:
            pool.score(problems, outs)
        except BaseException as e:  # noqa: BLE001 — handed to the test thread
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(NO_DEADLOCK_S)
    assert not thread.is_alive(), f"score() still waiting {NO_DEADLOCK_S} s after its worker was killed"
    return outcome.get("error")


@pytest.mark.parametrize("when", ["while scoring", "while idle"])
def test_a_killed_worker_is_a_clear_error_not_a_hang(when, registered):
    pool = RewardPool(1)
    if when == "while scoring":
        problem = Problem("q", "", "t", registered("test_pool_die", user.die))
    else:
        problem = Problem("q", "Paris", "t", "exact")
        pool.score([problem], [texts("<answer>Paris</answer>")])
        (worker,) = pool._executor._processes.values()
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(NO_DEADLOCK_S)
    error = _error_of_score(pool, [problem], [texts("a", "b")])
    assert isinstance(error, RuntimeError), error
    assert "RewardPool(workers=1): a worker process died" in str(error) and "killed by SIGKILL" in str(error)
    with pytest.raises(RuntimeError, match=r"RewardPool\(workers=1\) is closed"):
        pool.score([Problem("q", "Paris", "t", "exact")], [texts("x")])
    pool.close()


def test_sigterm_to_the_workers_leaves_them_scoring_and_a_failure_stops_the_others_with_sigusr1(registered):
    """What torchrun and Slurm do on a stop: SIGTERM to every process of the job, the pool's
    workers included; the trainer finishes its step, so the workers must still score it."""
    pool = RewardPool(2)
    problem = Problem("q", "Paris", "t", "exact")
    assert pool.score([problem], [texts("<answer>Paris</answer>")]).tolist() == [[1.0]]
    workers = list(pool._executor._processes.values())
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
    assert pool.score([problem] * 4, [texts("<answer>Paris</answer>", "x")] * 4).tolist() == [[1.0, 0.0]] * 4
    assert all(w.is_alive() for w in workers)
    os.kill(workers[0].pid, signal.SIGKILL)               # one dies: the executor stops the other
    workers[0].join(NO_DEADLOCK_S)
    error = _error_of_score(pool, [problem] * 4, [texts("a", "b")] * 4)
    assert isinstance(error, RuntimeError) and "killed by SIGKILL" in str(error), error
    assert workers[1].exitcode == -signal.SIGUSR1, workers[1].exitcode
    pool.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_close_is_idempotent_and_final(workers):
    with RewardPool(workers) as pool:
        assert pool.score([Problem("q", "Paris", "t", "exact")], [texts("<answer>Paris</answer>")]).tolist() == [[1.0]]
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError, match="is closed"):
        pool.score([], [])


def test_zero_workers_starts_no_process_and_bad_counts_are_refused():
    before = len(multiprocessing.active_children())
    pool = RewardPool(0)
    assert pool._executor is None and len(multiprocessing.active_children()) == before
    assert pool.score([], []).tolist() == []
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=f"workers must be an int >= 0.*got {bad!r}"):
            RewardPool(bad)


def test_the_trainer_scores_with_rollout_reward_workers(base_model, problems, tmp_path, one_thread):
    """`rollout.reward_workers=1`: the trainer's batch (its groups' rewards) equals the serial one."""
    from trainer_testing import make_trainer

    batches = {}
    for workers in (0, 1):
        (tmp_path / str(workers)).mkdir()
        trainer = make_trainer(base_model, problems, tmp_path / str(workers), **{"rollout.reward_workers": workers})
        try:
            assert trainer.rollouts.pool.workers == workers
            groups, _ = trainer.collect_groups(step=1)
            batches[workers] = [(g.problem.prompt, g.rewards.tolist()) for g in groups]
        finally:
            trainer.rollouts.pool.close()
            trainer.engine.close()
    assert batches[1] == batches[0] and batches[0]
