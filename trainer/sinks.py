"""Metric sinks: where each step's record goes besides metrics.jsonl (TensorBoard, Weights & Biases).

A sink is any object with `log(step, record)` and `close()` (`MetricSink`); `MetricsLogger`
(metrics.py) hands every sink the record that metrics.jsonl gets, so the loop calls one
`log(step, metrics)`. Adding a sink is a class here with a `wanted(ctx)` test and an entry in
`OPTIONAL_SINKS`.

A sink that cannot start (not installed, not logged in, no network in W&B's online mode) or
that raises later costs one warning line; the run goes on with the others. metrics.jsonl is
not optional: the run's record, resume and the plot read it (`metrics.JsonlSink`).

Weights & Biases (`run.wandb=true`; `pip install "prolix[wandb]"`): one W&B run per prolix run
directory. Its id is kept in RUN/wandb.json, so `prolix train --resume RUN` continues the same
W&B run; the resolved config, the git commit of prolix's source and the run name go with it.
W&B's files go to RUN/wandb (or $WANDB_DIR). `WANDB_MODE=offline` writes the run there without
any network access, for `wandb sync RUN/wandb` later. Under torchrun only rank 0 has a
`MetricsLogger` (the other ranks a `metrics.SilentLogger`), so only rank 0 logs.

The sinks read the resolved `config.TrainConfig` by its shape (`SinkSettings`), so a sink can be
built and tested from any object with those fields.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Callable, Protocol

from .config import config_to_dict

__all__ = ["MetricSink", "SinkSettings", "WandbSettings", "SinkContext", "TensorBoardSink", "WandbSink",
           "OPTIONAL_SINKS", "open_sinks", "git_commit", "describe_error", "WANDB_STATE_FILE"]

WANDB_STATE_FILE = "wandb.json"


class MetricSink(Protocol):
    """Receives every step record: `record` holds "step" and JSON scalars (NaN/inf as None)."""

    name: str

    def log(self, step: int, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class WandbSettings(Protocol):
    """The fields of `config.RunConfig` the W&B sink reads (documented there)."""

    @property
    def wandb(self) -> bool: ...

    @property
    def wandb_project(self) -> str: ...

    @property
    def wandb_entity(self) -> str: ...

    @property
    def wandb_tags(self) -> list[str]: ...


class SinkSettings(Protocol):
    """What the sinks read of the resolved `config.TrainConfig`: `run`'s W&B fields, and the
    whole config (a dataclass tree) as the record W&B keeps of the run."""

    @property
    def run(self) -> WandbSettings: ...


@dataclasses.dataclass(frozen=True)
class SinkContext:
    """What a sink may need: the run directory, the resolved config (None when a
    `MetricsLogger` is built without one), the step a resumed run continues from, whether
    TensorBoard is asked for (`run.tensorboard`), and how to print a warning."""

    run_dir: Path
    config: SinkSettings | None
    start_step: int
    tensorboard: bool
    warn: Callable[[str], None] = print
    """Prints one line without breaking the progress bar (`MetricsLogger.write`)."""


class TensorBoardSink:
    """RUN/tensorboard event files: every numeric value of the record as a scalar."""

    name = "tensorboard"

    @staticmethod
    def wanted(ctx: SinkContext) -> bool:
        # Optional and on by default: without the package there is nothing to warn about.
        return ctx.tensorboard and importlib.util.find_spec("tensorboard") is not None

    def __init__(self, ctx: SinkContext) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(ctx.run_dir / "tensorboard"))

    def log(self, step: int, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """One Weights & Biases run per run directory; its id (and the last step it got) in
    RUN/wandb.json, so a resumed run continues it.

    W&B's history only moves forward: steps a killed run logged after its last checkpoint are
    already there, so when the resumed run reaches them again they are not sent (one warning
    says which); metrics.jsonl holds the re-run's values for those steps."""

    name = "wandb"

    @staticmethod
    def wanted(ctx: SinkContext) -> bool:
        return ctx.config is not None and ctx.config.run.wandb

    def __init__(self, ctx: SinkContext) -> None:
        import wandb  # ImportError when not installed: open_sinks warns and goes on

        run = ctx.config.run
        self._state_path = ctx.run_dir / WANDB_STATE_FILE
        # A fresh start (step 0) in a directory an earlier attempt left behind is a new W&B run,
        # as metrics.jsonl starts over too; a resume continues the one recorded there.
        resuming = ctx.start_step > 0 and self._state_path.is_file()
        state = json.loads(self._state_path.read_text()) if resuming else {}
        self._sent_up_to = state.get("last_step", -1)
        self._warn, self._warned = ctx.warn, False
        config = {**config_to_dict(ctx.config), "git_commit": git_commit(), "run_dir": str(ctx.run_dir)}
        self.run = wandb.init(
            project=run.wandb_project, entity=run.wandb_entity or None, name=ctx.run_dir.name,
            tags=list(run.wandb_tags) or None, config=config,
            id=state.get("id"), resume="allow" if state.get("id") else None,
            # W&B's own files beside the run's (unless the user points WANDB_DIR elsewhere).
            dir=None if os.environ.get("WANDB_DIR") else str(ctx.run_dir),
            # Console capture is left at W&B's default ("wrap": what the run prints, such as
            # skipped-update warnings and resets, reaches the W&B run's logs). The progress bar
            # on the terminal is the same with it as with console="off" (checked in a pty);
            # WANDB_CONSOLE=off turns it off.
        )
        self._save_state()

    def _save_state(self) -> None:
        tmp = self._state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"id": self.run.id, "last_step": self._sent_up_to}) + "\n")
        os.replace(tmp, self._state_path)          # a kill mid-write leaves the old file whole

    def log(self, step: int, record: dict[str, Any]) -> None:
        if step <= self._sent_up_to:
            if not self._warned:
                self._warn(f"warning: W&B run {self.run.id} already has steps up to {self._sent_up_to} from the "
                           f"interrupted run; this run's steps {step} to {self._sent_up_to} go to metrics.jsonl only")
                self._warned = True
            return
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)
        self._sent_up_to = step
        self._save_state()

    def close(self) -> None:
        self.run.finish()


# Sinks in the order they are opened; each decides from the context whether it is wanted.
OPTIONAL_SINKS: dict[str, type] = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


def open_sinks(ctx: SinkContext) -> list[MetricSink]:
    """The wanted sinks that could start; each one that could not is one warning line."""
    sinks = []
    for name, cls in OPTIONAL_SINKS.items():
        if not cls.wanted(ctx):
            continue
        try:
            sinks.append(cls(ctx))
        except Exception as e:            # whatever stops an optional sink: one line, and go on
            ctx.warn(f"warning: metrics sink {name!r} did not start ({describe_error(e)}); the run goes on without it")
    return sinks


def describe_error(error: BaseException) -> str:
    """'Type: message' on one line, at most ~300 characters (W&B's errors span several lines)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text if len(text) <= 300 else text[:297] + '...'}"


def git_commit(short: int | None = None) -> str:
    """The commit of the checkout prolix runs from ('+dirty' when tracked files differ from it;
    abbreviated to `short` hex digits when given); 'unknown' for an installed copy outside git."""
    here = Path(__file__).resolve().parent
    rev = ["git", "rev-parse"] + ([f"--short={short}"] if short else []) + ["HEAD"]
    try:
        head = subprocess.run(rev, cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=here,
                               capture_output=True, timeout=10).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")
