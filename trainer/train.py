"""`prolix train`: GRPO for prolonged RL of reasoning models (the ProRL recipe).

    prolix train                                          # the embedded demo: no download, CPU, < 15 min
    prolix train --config examples/prorl_1p5b_stage1_8k.yaml
    prolix train --config examples/prorl_1p5b_stage1_8k.yaml optim.lr=1e-6 rollout.n=8
    prolix train --resume runs/prorl-1p5b-8k              # continue from its latest checkpoint
    prolix train --resume runs/prorl-1p5b-8k run.steps=3000    # ... and go further
    touch runs/prorl-1p5b-8k/RESET_REFERENCE              # reset the reference after this step
    prolix train --nproc 8 --config cfg.yaml              # 8 GPUs of this node: FSDP2 data parallelism
    torchrun --nproc-per-node=8 -m prolix.trainer.cli train --config cfg.yaml   # the same, or multi-node

The algorithm (`loop.Trainer`): each step samples `optim.prompts_per_step` prompts and `rollout.n`
responses each, scores them with verifiable rewards, normalises rewards within each group
(GRPO, or Dr.GRPO without the std), keeps only groups whose rewards differ (dynamic sampling,
refilled from fresh prompts), and takes `optim.prompts_per_step / optim.mini_batch_prompts`
AdamW steps on the clipped surrogate (ε_low/ε_high: clip-higher) with a k3 KL penalty to a
reference policy, aggregated as a token mean over each whole mini-batch. The reference is reset
to the current policy — with a fresh optimizer state in ProRL v1 — when validation stops
improving, on a schedule, or on demand.

Deviations from the ProRL paper: β is ours (the paper does not report it; default 1e-4); the
overlong penalty is off by default (ProRL added it in later runs; `algorithm.overlong`); the
reset trigger is automated (the paper's resets were decided by hand on validation curves).

Resume: `--resume RUN_DIR` (or a checkpoint folder) reloads the run's saved config.yaml (or
`--config`), applies the `key=value` overrides on top, and continues with the same data order
and RNG as an uninterrupted run. Every checkpoint carries a manifest of sha256 checksums; when
the newest one of RUN_DIR fails it, the run resumes from the newest one that passes (warning).

Stopping: Ctrl-C (SIGINT) or `kill PID` (SIGTERM, what a cluster scheduler sends) lets the step in
progress finish, writes a checkpoint and exits with 130 / 143; `--resume RUN` then continues as
if uninterrupted. A second signal stops at once, without checkpointing that step.

Exit status: 0 on success; 2 on an expected failure, in one line naming the key or path: a
configuration error, a missing model or file, no CUDA for run.device=cuda, vLLM not installed
for rollout.engine=vllm, no checkpoint to resume from that verifies, a run directory that cannot
be written or a disk that fills up (a failed checkpoint write leaves `latest` and the previous
checkpoints as they were); 3 when training diverged (optim.max_consecutive_skips steps in a row
without a finite update, weights that are not finite after an update, or non-finite logits while
sampling: the run stops without checkpointing, so `--resume` restarts from the last good state);
130 / 143 after SIGINT / SIGTERM. Unexpected errors keep their traceback.

Many GPUs: under torchrun every rank runs this entry point; rank 0 alone creates the run
directory, builds the demo model and prints, and the parallel run (`parallel/`) does the rest. A checkpoint
resumes on any number of ranks (or in a plain process).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prolix train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: the embedded demo)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="a run directory (its latest checkpoint) or one checkpoint directory")
    p.add_argument("--nproc", type=int, default=None, metavar="G",
                   help="train on G processes of this machine (one per GPU) with FSDP2: relaunches itself "
                        "under torchrun (torch.distributed.run --standalone); run torchrun yourself for several nodes")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. optim.lr=1e-6 rollout.n=8 data.sources.0.name=chain_sum")
    return p


def launch_command(args: argparse.Namespace) -> list[str]:
    """The torchrun command that runs these arguments on args.nproc local processes."""
    from .parallel.launch import torchrun_command

    train_args = (["--config", args.config] if args.config else []) + \
        (["--resume", args.resume] if args.resume else []) + list(args.overrides)
    return torchrun_command(args.nproc, train_args)


def _new_run_dir(cfg) -> Path:
    from .checkpoint import latest_checkpoint
    from .config import ConfigError

    name = cfg.run.name or time.strftime("prolix-%Y%m%d-%H%M%S")
    run_dir = (Path(cfg.run.out_dir) / name).resolve()
    if latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"run.name: {str(run_dir)!r} already holds checkpoints; continue it with "
                          f"--resume {run_dir} or choose another run.name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _new_run(cfg, data):
    """(run_dir, cfg) of a fresh run: its directory, and the demo's base model when model.path is empty."""
    from . import demo

    run_dir = _new_run_dir(cfg)
    if not cfg.model.path:
        path = demo.build_base_model(cfg, run_dir, data)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(path)))
    return run_dir, cfg


def _fail(message: str, status: int = 2) -> int:
    """Print the one-line error of an expected failure; returns the exit status."""
    print(f"prolix train: error: {message}", file=sys.stderr, flush=True)
    return status


def _start(args: argparse.Namespace):
    """(trainer, parallelism, run directory, resumed checkpoint or None), or the exit status of
    an expected failure met before training: preflight checks (`preflight.check_run`) run
    right after the config is read, before any model is built."""
    from .checkpoint import CheckpointError, resolve_checkpoint, thread_count_warning
    from .config import ConfigError, load_config, save_config
    from .data import prepare_data
    from .loop import Trainer
    from .metrics import MetricsFileError
    from .parallel import RolloutRank, init_parallelism, init_split
    from .preflight import check_run, os_error_line

    try:
        ckpt = None
        if args.resume:
            run_dir, ckpt = resolve_checkpoint(args.resume)
            run_dir = run_dir.resolve()
            cfg = load_config(args.config or run_dir / "config.yaml", args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
        check_run(cfg, run_dir if ckpt is not None else None)     # device, engine, model.path, disk
        data = prepare_data(cfg)                          # unknown task, bad file: before anything heavy
        # one process, this rank of a torchrun world, or (split placement) a trainer or rollout rank
        parallel = init_split(cfg) if cfg.rollout.placement == "split" else init_parallelism(cfg.run.device)
        if ckpt is None:
            run_dir, cfg = parallel.world.run_on_first(lambda: _new_run(cfg, data))    # rank 0 decides, all follow
        if parallel.world.is_main:
            save_config(cfg, run_dir / "config.yaml")
        if isinstance(parallel, RolloutRank):
            return _RolloutStart(cfg, data, parallel)
        trainer = Trainer(cfg, run_dir, data=data, resume_from=ckpt, resume_verified=True,  # resolve_checkpoint
                          parallel=parallel)
        warning = thread_count_warning(ckpt) if ckpt is not None and trainer.device.type == "cpu" else None
        if warning and parallel.world.is_main:
            print(warning, file=sys.stderr, flush=True)
    except (ConfigError, FileNotFoundError, CheckpointError, MetricsFileError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted (SIGINT) before training started; nothing was saved", 130)
    except OSError as e:
        if os_error_line(e) is None:
            raise
        return _fail(os_error_line(e))
    return trainer, parallel, run_dir, ckpt


@dataclasses.dataclass
class _RolloutStart:
    """What a rollout rank of the split placement needs to serve (`split.run_rollout_rank`)."""

    cfg: Any
    data: Any
    rank: Any


def _serve(start: _RolloutStart) -> int:
    """A rollout rank's run: 0 when the trainer said stop, 1 (one line) when a peer was lost."""
    from .parallel.rollout_rank import run_rollout_rank
    from .parallel.split import PlacementError

    try:
        run_rollout_rank(start.cfg, start.data.train, start.rank)
    except PlacementError as e:
        return _fail(str(e), 1)
    finally:
        start.rank.close()
    return 0


def _fit(trainer, parallel, run_dir: Path):
    """trainer.fit() under SIGINT/SIGTERM handlers: its result, or the exit status of a run
    that diverged (3), was stopped by a signal (130 / 143) or could not write (2). Only the
    main process prints."""
    from .checkpoint import CheckpointError
    from .guards import TrainingDivergedError
    from .parallel.split import PlacementError
    from .preflight import os_error_line
    from .signals import GracefulStop, RunStopped

    quiet = not parallel.world.is_main
    try:
        with GracefulStop() as stop:
            return trainer.fit(stop=stop)
    except TrainingDivergedError as e:
        return 3 if quiet else _fail(str(e), 3)
    except RunStopped as e:
        if not quiet:
            again = f"; continue with --resume {run_dir}" if e.checkpoint is not None else ""
            print(f"prolix train: {e}{again}", file=sys.stderr, flush=True)
        return e.exit_status
    except PlacementError as e:                           # split placement: a rollout rank is gone
        return _fail(str(e), 1)
    except CheckpointError as e:                          # a write error while saving (full disk, ...)
        return 2 if quiet else _fail(str(e))
    except OSError as e:
        if os_error_line(e) is None:
            raise
        return 2 if quiet else _fail(os_error_line(e))
    finally:
        parallel.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from .parallel.launch import launched

    if args.nproc is not None:
        if launched():
            print("prolix train: error: --nproc: this process is already one of a torchrun world; "
                  "give the process count to torchrun only", file=sys.stderr)
            return 2
        if args.nproc > 1:
            return subprocess.call(launch_command(args))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()                     # per-checkpoint "Writing model shards" bars
    started = _start(args)
    if isinstance(started, int):
        return started
    if isinstance(started, _RolloutStart):
        return _serve(started)
    trainer, parallel, run_dir, ckpt = started
    if ckpt is not None and parallel.world.is_main:
        print(f"resuming {run_dir} from {ckpt.name} (step {trainer.state.step})", flush=True)
    result = _fit(trainer, parallel, run_dir)
    if isinstance(result, int):
        return result
    if not parallel.world.is_main:
        return 0
    print(f"run directory: {result.run_dir}")
    first, last = result.first_eval, result.last_eval
    if first and last:
        print(f"held-out accuracy: {first['eval/accuracy']:.2f} -> {last['eval/accuracy']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
