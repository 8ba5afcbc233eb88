"""Stopping a run gracefully, and closing it without hiding why it stopped.

    with GracefulStop() as stop:          # installs SIGINT and SIGTERM handlers (main thread)
        trainer.fit(stop=stop)            # raises RunStopped after checkpointing the step

The first SIGINT (Ctrl-C) or SIGTERM (what a cluster scheduler sends before it kills) only
records the signal: the loop finishes the step in progress, logs it, writes a checkpoint and
raises `RunStopped`; `prolix train` then exits with 128 + the signal number (130 / 143), and
`--resume RUN` continues exactly where it stopped. A second signal stops the process at once
(os._exit, same status), leaving the previous checkpoint as the one to resume from.

`close_run(log, engine, pool, failure=e)` closes a run that an exception is ending: the curves plot is
skipped when the failure is a write error (a full disk would fail it too), and errors while
closing are reported as a warning instead of replacing the one that stopped the run.

It imports nothing of prolix: the loop (`Trainer.fit` polls the request; under data
parallelism the ranks agree through `Communication.stop_signal`) and the entry point
(`train.py`) both use it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

__all__ = ["GracefulStop", "RunStopped", "StopRequest", "close_run"]


class StopRequest:
    """What the loop polls between steps: the number of the first signal received, or None."""

    signum: int | None = None


class RunStopped(Exception):
    """A signal stopped the run after `step` completed steps, checkpointed in `checkpoint`
    (None when it came before the first step)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint.name}" if checkpoint is not None else "no checkpoint (no step completed)"
        super().__init__(f"stopped by {name} after step {step}; {where}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class GracefulStop(StopRequest):
    """SIGINT / SIGTERM handlers for the duration of a `with` block (the previous handlers are
    restored after). Outside the main thread (where Python cannot install handlers) it does
    nothing and signals keep their usual effect."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, *, log=None) -> None:
        self._log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            self._log(f"prolix: {name} again: stopping now, without checkpointing the step in progress")
            os._exit(128 + signum)
        self.signum = signum
        self._log(f"prolix: {name} received: finishing the current step, then checkpointing and stopping "
                  f"(send it again to stop at once)")


def _is_write_error(error: BaseException) -> bool:
    return isinstance(error, OSError) or isinstance(error.__cause__, OSError)


def close_run(log, *resources, failure: BaseException | None = None) -> None:
    """Close the metrics logger (and plot the curves), then each resource (the engine, the
    reward pool: anything with `close()`). With `failure` (the exception ending the run)
    nothing raised here may replace it: the plot is skipped after a write error, and any error
    while closing becomes a warning on stderr."""
    if failure is None:
        log.close()
        for resource in resources:
            resource.close()
        return
    for close in (lambda: log.close(plot=not _is_write_error(failure)), *(r.close for r in resources)):
        try:
            close()
        except Exception as e:                  # the failure in flight is the one to report
            print(f"prolix: warning: while stopping: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
