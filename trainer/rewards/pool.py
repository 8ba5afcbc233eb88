"""A pool of worker processes that scores completions with the configured rewards.

    with RewardPool(workers=2) as pool:
        rewards = pool.score(problems, outs)      # [P, n] fp32, outs[i][j].text scored for problems[i]
    errors = pop_reward_errors()                  # failures counted in the workers are here too

What it is for. math-verify (sympy) and the sandboxed code tests are CPU-bound: scored one after
another in the trainer process they hold a step for seconds (a code completion with three tests
costs three sandboxed interpreter starts). The pool scores a batch on `workers` processes at
once. `RewardPool(0)` scores in this process, serially: exactly
`[[score(p, c.text) for c in cs] for p, cs in zip(problems, completions)]`, and it is cheap to
construct (no process). Any pool gives the same values in the same order as that loop: pairs are
sent in chunks (about `CHUNKS_PER_WORKER` per worker, so that a slow chunk, e.g. one with a
program that runs into its timeout, does not leave the other workers idle) and reassembled by
chunk index, whatever order they finish in.

Sizing. One worker per core that the trainer process does not need. A code test is one
sandboxed program, and a worker waits for it (a process start, then the program), so on a
machine with spare cores `workers` may exceed the cores left over by a little. On a GPU node the
trainer's own CPU work (the data loader, NCCL's threads, vLLM's scheduler) keeps a core or two;
`prolix bench reward-pool` measures responses/s for math-verify and for code tests with 0, 1
and 2 workers.

Start method: "spawn". The trainer process runs OpenMP/MKL threads, a gloo or NCCL process group
with its own threads and possibly vLLM; `fork` after threads were started copies their locks in
whatever state they were (a worker can deadlock on its first allocation or log call), and a
forked child cannot use the parent's CUDA context. "spawn" starts a fresh interpreter, which
imports this module (and so its package, `prolix.trainer.rewards`, which registers every built-in
reward; torch is not imported: it costs start-up time and memory in every worker and no reward
needs it) and the parent's main module as `__mp_main__` (as multiprocessing always does), with
the parent's `sys.path` and environment *as they are when the workers start*: when the pool is
made (in the background; the heavy imports of a reward, sympy for math-verify, happen in each
worker on its first use). "forkserver" would freeze them when its server first starts, once per
process, for every later pool. As with any "spawn" program, a script that makes a pool keeps its
top-level code under `if __name__ == "__main__":` (the workers import the script; `prolix train`
does so). Workers ignore SIGINT and SIGTERM: Ctrl-C and a scheduler's SIGTERM are the trainer's
(it finishes the step, `signals.GracefulStop`), yet a terminal, torchrun and Slurm send them to
every process of the group or job, and a worker that died of them would fail the very step the
trainer is finishing. The executor's own forced stop of the workers (after one died) sends
SIGUSR1 instead (`_WorkerProcess`). Workers exit on their own when the trainer process is gone
(a trainer killed with SIGKILL leaves no orphans behind).

Which rewards the workers know. Every call sends, with each chunk, the parent's `REWARDS` entry
for each reward name the batch uses, pickled by reference (module and name): a reward registered
with `register_reward` in the parent, before or after the pool was made, scores in the workers,
provided it is a module-level function of an importable module or of the main script (not a
lambda, not a function defined inside another: those raise ValueError naming the reward, before
anything is sent). A "pkg.module:function" reward is resolved in the parent first (an unknown
name or a failed import raises there, as `score` does) and then imported by each worker.
Module attributes changed at run time in the parent (e.g. `sandbox.PYTHON`) are not seen by the
workers; environment variables set before the pool is made are (`PROLIX_SANDBOX_LAUNCHER`).

Failures. A reward that raises or returns NaN is 0.0 and counted, exactly as `score` does: the
counts reach this process's `reward_errors` (so `pop_reward_errors()` here sees them) and the
warnings the workers log are re-emitted here through the same loggers, with the same
once-per-reward-and-exception rule (two workers hitting a new failure in the same call may each
warn once). A worker that dies (a segfault in a C extension, the OOM killer) breaks the pool:
`score` raises RuntimeError naming the pool and each worker's exit (signal or status), the
pool is closed, and the trainer stops with that error instead of waiting forever. A reward that
never returns holds its worker as it would hold the serial loop: the built-in ones bound their
own time (the sandbox's timeout, math-verify's).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Protocol

from ..problem import Problem
from .registry import REWARDS, RewardFn, get_reward, reward_errors, score, warned_failures

if TYPE_CHECKING:
    import torch

__all__ = ["RewardPool", "CHUNKS_PER_WORKER"]

CHUNKS_PER_WORKER = 4  # chunks per worker and call: balances slow chunks, keeps per-chunk overhead small
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # the trainer's to handle, never a worker's
PARENT_POLL_S = 1.0  # how often a worker checks that the trainer process is still there


class _WorkerProcess(multiprocessing.context.SpawnProcess):
    """A pool worker: `terminate` (what the executor calls on the others once a worker died)
    sends SIGUSR1, whose default action ends the process, since workers ignore SIGTERM."""

    def terminate(self) -> None:
        if self.exitcode is None:
            try:
                os.kill(self.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass


class _WorkerContext(multiprocessing.context.SpawnContext):
    """The "spawn" start method (see the module docstring) with `_WorkerProcess` workers."""

    Process = _WorkerProcess


class _HasText(Protocol):
    text: str  # engines.Completion; only the text is scored


@dataclasses.dataclass(frozen=True)
class _Sync:
    """The parent's state a worker adopts before scoring a chunk."""

    rewards: dict[str, RewardFn]  # REWARDS entries the chunk's problems name
    levels: dict[str, int]  # explicit logger levels ("" = root)
    warned: frozenset[tuple[str, str]]  # (reward, exception type) already warned about
    errors: dict[str, int]  # failure counts so far (the "N failures so far" of the warning)


@dataclasses.dataclass(frozen=True)
class _ChunkResult:
    scores: list[float]
    errors: dict[str, int]  # failures counted while scoring this chunk
    warned: frozenset[tuple[str, str]]
    records: list[logging.LogRecord]  # what the worker logged, formatted, to re-emit in the parent


class RewardPool:
    """Scores (problem, completion) pairs on `workers` processes (0: in this process, serially)."""

    def __init__(self, workers: int):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"RewardPool: workers must be an int >= 0 (0 = score in this process), got {workers!r}")
        self.workers = workers
        self._closed = False
        self._picklable: dict[str, RewardFn] = {}  # reward name -> fn known to pickle
        self._executor: ProcessPoolExecutor | None = None
        if workers:
            self._executor = ProcessPoolExecutor(max_workers=workers,
                                                 mp_context=_WorkerContext(),
                                                 initializer=_init_worker, initargs=(os.getpid(),))
            # The executor starts a worker per submit while none is idle (in this thread: "spawn"):
            # `workers` no-ops start them all now, in the background, instead of one by one during
            # the first batch. They start with SIGINT and SIGTERM blocked (the mask survives the
            # exec), so neither can end one before `_init_worker` ignores them.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                for _ in range(workers):
                    self._executor.submit(_started)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def __repr__(self) -> str:
        return f"RewardPool(workers={self.workers})"

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (waiting for the chunk each is scoring); idempotent."""
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def score(self, problems: Sequence[Problem], completions: Sequence[Sequence[_HasText]]) -> torch.Tensor:
        """Rewards of `completions[i][j].text` for `problems[i]`.

        Returns: [P, n] fp32, the values and order of the serial loop (`torch.tensor` of the
        nested list, so ragged `n` raises as it does there). Raises ValueError for an unknown
        reward name (a config error), RuntimeError when the pool is closed or a worker died.
        """
        import torch  # here, not at the top: the workers import this module and need no torch

        if self._closed:
            raise RuntimeError(f"{self!r} is closed; make a new pool")
        if len(problems) != len(completions):
            raise ValueError(f"RewardPool.score: problems and completions must have the same length, "
                             f"got {len(problems)} and {len(completions)}")
        if self._executor is None:
            return torch.tensor([[score(p, c.text) for c in cs] for p, cs in zip(problems, completions)])
        pairs = [(p, c.text) for p, cs in zip(problems, completions) for c in cs]
        flat = self._score_pairs(pairs)
        rows, start = [], 0
        for cs in completions:
            rows.append(flat[start:start + len(cs)])
            start += len(cs)
        return torch.tensor(rows)

    def _score_pairs(self, pairs: list[tuple[Problem, str]]) -> list[float]:
        """Scores of `pairs` in order, computed by the workers chunk by chunk."""
        if not pairs:
            return []
        sync = _Sync(self._rewards_for({p.reward for p, _ in pairs}), _explicit_levels(),
                     frozenset(warned_failures), dict(reward_errors))
        size = math.ceil(len(pairs) / (self.workers * CHUNKS_PER_WORKER))
        # pid -> Process of every worker (all started with the pool), to say how they ended if one dies
        workers = dict(getattr(self._executor, "_processes", None) or {})
        futures: list[Future] = []
        scores: list[float] = []
        try:
            for i in range(0, len(pairs), size):  # a pool that broke while idle raises here
                futures.append(self._executor.submit(_score_chunk, pairs[i:i + size], sync))
            for future in futures:
                result = future.result()
                _merge(result)
                scores.extend(result.scores)
        except BrokenProcessPool as e:
            raise RuntimeError(self._describe_death(futures, workers)) from e
        finally:
            for future in futures:
                future.cancel()
        return scores

    def _rewards_for(self, names: set[str]) -> dict[str, RewardFn]:
        """The parent's reward fn for each registered name (checked to pickle); a "module:function"
        name is resolved here first, so an unknown name or a failed import raises in this process."""
        out = {}
        for name in sorted(names):
            fn = get_reward(name)  # unknown: ValueError, as the serial `score` raises
            if name not in REWARDS:
                continue  # "module:function": each worker imports it itself
            if self._picklable.get(name) is not fn:
                try:
                    pickle.dumps(fn)
                except (pickle.PicklingError, AttributeError, TypeError) as e:
                    raise ValueError(f"{self!r}: reward {name!r} ({fn!r}) cannot be sent to the worker processes: "
                                     "register a module-level function of an importable module or of the main "
                                     f"script, not a lambda or a nested function ({type(e).__name__}: {e})") from e
                self._picklable[name] = fn
            out[name] = fn
        return out

    def _describe_death(self, futures: list[Future], workers: dict) -> str:
        """The error of a broken pool: what each worker's exit was. Closes the pool first, which
        also waits for the executor to reap the workers, so their exit codes are known."""
        for future in futures:
            future.cancel()
        self.close()
        exits = []
        for pid, process in sorted(workers.items()):
            code = process.exitcode
            if code is not None and code < 0:
                exits.append(f"pid {pid} killed by {signal.Signals(-code).name}")
            elif code is not None:
                exits.append(f"pid {pid} exited with status {code}")
        seen = "; ".join(exits) or "no exit status recorded"
        return (f"{self!r}: a worker process died while scoring ({seen}; SIGKILL is what the OOM killer "
                "sends, SIGSEGV a crash in a C extension, SIGUSR1 the pool stopping the other workers after "
                "the failure). The pool is closed; the batch was not scored.")


def _explicit_levels() -> dict[str, int]:
    """The levels set on this process's loggers ("" = root): a worker logs what the parent would."""
    levels = {"": logging.getLogger().level}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def _merge(result: _ChunkResult) -> None:
    """Add a chunk's failure counts to this process's and re-emit its log records here."""
    reward_errors.update(result.errors)
    warned_failures.update(result.warned)
    for record in result.records:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


# ----------------------------------------------------------------------------- in the workers

class _Capture(logging.Handler):
    """Holds a worker's log records, made picklable, until the chunk's result carries them home."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None  # args may not pickle; the text does
        if record.exc_info:  # a traceback does not pickle: its text does
            if record.exc_text is None:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        self.records.append(record)


_capture = _Capture()


def _init_worker(parent_pid: int) -> None:
    """Runs once in each worker: ignore Ctrl-C and SIGTERM, send every log record home, exit with
    the parent."""
    for signum in _STOP_SIGNALS:  # the trainer handles both and finishes its step
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked since the worker started
    root = logging.getLogger()
    root.handlers[:] = [_capture]
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="reward-pool-parent", daemon=True).start()


def _started() -> None:
    """The task that makes the executor start a worker (the initializer does the work)."""


def _exit_with_parent(parent_pid: int) -> None:
    # A worker blocked on the call queue holds its write end too, so it never sees EOF: poll instead.
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _score_chunk(pairs: list[tuple[Problem, str]], sync: _Sync) -> _ChunkResult:
    """`score` of each pair, with the parent's rewards, logger levels and failure state adopted."""
    REWARDS.update(sync.rewards)  # the parent's registrations (and its overwrites) win
    for name, level in sync.levels.items():
        logging.getLogger(name or None).setLevel(level)
    warned_failures.update(sync.warned)
    reward_errors.clear()
    reward_errors.update(sync.errors)
    scores = [score(problem, text) for problem, text in pairs]
    errors = {name: count - sync.errors.get(name, 0) for name, count in reward_errors.items()
              if count > sync.errors.get(name, 0)}
    records, _capture.records = _capture.records, []  # with whatever was logged since the last chunk
    return _ChunkResult(scores, errors, frozenset(warned_failures), records)
