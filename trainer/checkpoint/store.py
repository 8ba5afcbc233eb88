"""The checkpoint folder: atomic publication, the manifest, RNG states and the plain format.

A checkpoint holds Hugging Face weights plus everything needed to resume exactly.

Layout of a run directory:

    RUN/config.yaml                     the resolved config
    RUN/metrics.jsonl                   one line per step (metrics.py)
    RUN/checkpoints/latest              text: the name of the newest complete checkpoint
    RUN/checkpoints/step_000040/
        config.json, model.safetensors, tokenizer files     the policy, loadable by transformers/vLLM
        reference.safetensors           the frozen reference (it changes at every reset)
        optimizer.pt                    AdamW state (empty right after a reset)
        rng.pt                          python / numpy / torch (and CUDA) RNG states
        trainer_state.json              step, prompt-sampler state, best eval, patience and
                                        skipped-step counters, resets
        manifest.json                   format version, step, and every other file's relative
                                        path, size and sha256 (written last)

A checkpoint is written into `checkpoints/.tmp-step_000040-<pid>`, its manifest last, every file
fsync'd, then the folder is renamed into place (atomic on POSIX) and only then `latest` is
replaced (write to a temp file, fsync, `os.replace`). A kill at any moment leaves the previous
checkpoint whole and `latest` pointing at it; leftover `.tmp-*` folders are swept on the next
save. `keep_last` complete checkpoints are kept (never the one `latest` names). A write that
fails (full disk, read-only or unwritable folder) removes its temporary folder and raises
`CheckpointWriteError` naming the path and the cause; the previous checkpoints and `latest`
are left as they were.

Loading verifies the manifest first (`verify_checkpoint`): a missing manifest or file, or a
size or checksum that differs, raises `CheckpointError` naming the checkpoint and the file.
Verifying re-reads every byte (policy, reference and AdamW state). `resolve_checkpoint(RUN)` (`--resume RUN`)
falls back from a checkpoint that fails to the newest one that verifies, with a warning.

The learning-rate schedule is a pure function of the step (`optimizer.learning_rate`), so it has no
state here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from ..model import TOKENIZER_FILES, save_policy

__all__ = [
    "CHECKPOINT_DIR",
    "CheckpointError",
    "CheckpointWriteError",
    "save_checkpoint",
    "load_plain",
    "latest_checkpoint",
    "resolve_checkpoint",
    "verify_checkpoint",
    "capture_rng",
    "restore_rng",
    "as_nested_tuples",
    # the pieces the sharded writer (sharded.save_sharded) reuses
    "step_dir_name",
    "save_tokenizer_files",
    "publish_checkpoint",
]

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
PREFIX = "step_"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint fails verification or cannot be used; the message names it and the file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (its cause, an OSError, is `__cause__`); the message
    names the path and the cause, and the previous checkpoints and `latest` are untouched."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every directory (bottom-up), so the rename publishes durable data."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


# ----------------------------------------------------------------------------- manifest


def _sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path, step: int) -> None:
    """folder/manifest.json: every other file below `folder` with its size and sha256."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    entries = [{"path": rel, "size": (folder / rel).stat().st_size, "sha256": _sha256(folder / rel)}
               for rel in files if rel != MANIFEST]
    (folder / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": entries}, indent=1))


def verify_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """Check every file of `ckpt` against its manifest.json; returns the manifest.

    Raises:
        CheckpointError naming the checkpoint and the file: no manifest (an unfinished copy, or
        a checkpoint written before manifests existed), an unreadable one, a listed file that
        is missing, or one whose size or sha256 differs from what the manifest recorded.
    """
    ckpt = Path(ckpt)
    if not (ckpt / MANIFEST).is_file():
        raise CheckpointError(f"checkpoint {ckpt}: no {MANIFEST} (incomplete, or written by a prolix without "
                              "checkpoint manifests); it cannot be verified")
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        entries = [(str(e["path"]), int(e["size"]), str(e["sha256"])) for e in manifest["files"]]
        version = manifest.get("format")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} is unreadable ({type(e).__name__}: {e})") from None
    if version != MANIFEST_FORMAT:
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} has format {version!r}; this prolix reads "
                              f"format {MANIFEST_FORMAT}")
    for rel, size, _ in entries:            # sizes first: a missing or truncated file fails without hashing
        if not (ckpt / rel).is_file():
            raise CheckpointError(f"checkpoint {ckpt}: {rel} is missing (listed in {MANIFEST})")
        actual = (ckpt / rel).stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint {ckpt}: {rel} has {actual} bytes, {MANIFEST} recorded {size}")
    for rel, _, expected in entries:
        if _sha256(ckpt / rel) != expected:
            raise CheckpointError(f"checkpoint {ckpt}: {rel} is corrupted (its sha256 differs from the one "
                                  f"{MANIFEST} recorded)")
    return manifest


# ----------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch CPU and CUDA), as torch.save-able data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(as_nested_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def as_nested_tuples(x: Any) -> Any:
    """random.setstate wants nested tuples; a JSON/weights-only round trip may give lists."""
    return tuple(as_nested_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------- save


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def _complete_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and (p / "trainer_state.json").is_file())


def save_tokenizer_files(tokenizer, source: str | Path | None, out: Path) -> None:
    """Copy the tokenizer files of the run's base model when it has them (byte-identical, so
    whatever transformers version loaded the base model loads the checkpoint), else save it."""
    copied = False
    if source and Path(source).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copy2(Path(source) / name, out / name)
                copied = True
    if not copied and tokenizer is not None:
        tokenizer.save_pretrained(out)


def save_checkpoint(run_dir: str | Path, step: int, **kwargs: Any) -> Path:
    """`_save_checkpoint` (its arguments and return), and on a write error (full disk, read-only
    or unwritable folder) CheckpointWriteError naming the path and the cause, after removing the
    partial `.tmp-*` folder: the previous checkpoints and `latest` are as they were."""
    root = Path(run_dir) / CHECKPOINT_DIR
    partial = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    try:
        return _save_checkpoint(run_dir, step, **kwargs)
    except Exception as failure:
        cause = _write_error(failure, root)
        _discard_partial(root, step_dir_name(step))
        if cause is None:
            raise
        latest = latest_checkpoint(run_dir)
        raise CheckpointWriteError(
            f"cannot write checkpoint {step_dir_name(step)}: {cause.filename or partial}: {cause.strerror} "
            f"({errno.errorcode.get(cause.errno, cause.errno)}); `latest` still names "
            f"{latest.name if latest is not None else 'no checkpoint'}") from cause


def _write_error(failure: Exception, root: Path) -> OSError | None:
    """The OSError behind a failed checkpoint write, or None when the failure was something else.
    Only Python's own writes raise OSError: safetensors reports an I/O error as a SafetensorError
    ("I/O error: No space left on device (os error 28)") and torch.save's zip writer as a
    RuntimeError ("[enforce fail at inline_container.cc] ... unexpected pos" or "file write
    failed"), with no errno; a full file system is then read from its free space."""
    if isinstance(failure, OSError):
        return failure
    text = str(failure)
    found = re.search(r"os error (\d+)", text)
    if found:
        code = int(found.group(1))
    elif "inline_container" in text or "PytorchStreamWriter" in text:
        try:
            code = errno.ENOSPC if shutil.disk_usage(root).free < 2**20 else errno.EIO
        except OSError:
            code = errno.EIO
    else:
        return None
    error = OSError(code, os.strerror(code))
    error.__cause__ = failure                     # the writer's own report stays in the chain
    return error


def _discard_partial(root: Path, name: str) -> None:
    """Undo a save of checkpoint `name` that failed: its temporary folder and `latest`'s
    temporary file go; a published checkpoint moved aside to be replaced comes back."""
    pid = os.getpid()
    trash, final = root / f".tmp-old-{name}-{pid}", root / name
    if trash.is_dir() and not final.exists():
        os.rename(trash, final)
    for partial in (root / f".tmp-{name}-{pid}", root / f".{LATEST}.tmp-{pid}"):
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


def _save_checkpoint(run_dir: str | Path, step: int, *, policy, tokenizer, optimizer: torch.optim.Optimizer,
                     reference: torch.nn.Module | None, trainer_state: dict[str, Any], keep_last: int,
                     tokenizer_source: str | Path | None = None) -> Path:
    """Write the checkpoint of `step` atomically, point `latest` at it, rotate old ones.

    Args:
        run_dir: the run directory (checkpoints go to run_dir/checkpoints).
        step: the number of completed RL steps.
        policy, tokenizer: saved in Hugging Face format (`save_policy`); the tokenizer files are
            copied from `tokenizer_source` (the base model's directory) when it holds them.
        optimizer: its state_dict goes to optimizer.pt.
        reference: the frozen reference model, or None when the run keeps none (kl_coef = 0).
        trainer_state: JSON-serialisable loop state (step, sampler, eval/patience, resets).
        keep_last: complete checkpoints to keep, >= 1.

    Returns:
        The final checkpoint directory.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):                      # a previous writer was killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_policy(policy, tmp, tokenizer=None)
    for name in TOKENIZER_FILES:                             # save_policy may copy from the load path
        (tmp / name).unlink(missing_ok=True)
    save_tokenizer_files(tokenizer, tokenizer_source, tmp)
    if reference is not None:
        save_model(reference, str(tmp / "reference.safetensors"))   # handles tied embeddings
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    publish_checkpoint(tmp, final, step=step, trainer_state=trainer_state, keep_last=keep_last)
    return final


def publish_checkpoint(tmp: Path, final: Path, *, step: int, trainer_state: dict[str, Any], keep_last: int) -> None:
    """Finish a checkpoint written into `tmp` and make it `final`: RNG states, the trainer state,
    the manifest (last: it describes every other file), fsync, rename, `latest`, rotation."""
    root = final.parent
    torch.save(capture_rng(), tmp / "rng.pt")
    state = {**trainer_state, "step": step, "torch_threads": torch.get_num_threads()}   # see thread_count_warning
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    _write_manifest(tmp, step)
    _fsync_tree(tmp)
    if final.exists():                                       # re-saving a step (e.g. after a resume)
        trash = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_path(root)
    _write_atomic(root / LATEST, final.name + "\n")
    for old in _complete_checkpoints(root)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- load


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names (falling back to the newest complete one), or None."""
    root = Path(run_dir) / CHECKPOINT_DIR
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "trainer_state.json").is_file():
            return candidate
    complete = _complete_checkpoints(root) if root.is_dir() else []
    return complete[-1] if complete else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every complete checkpoint of a run, oldest first ([] when there is none)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    return _complete_checkpoints(root) if root.is_dir() else []


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run_dir, checkpoint_dir) for `--resume PATH`, the checkpoint verified (`verify_checkpoint`).

    PATH is one checkpoint directory (used as it is) or a run directory: the checkpoint `latest`
    names, or, when that one fails verification, the newest one that passes; a warning on
    stderr names each checkpoint passed over and what was wrong with it.

    Raises:
        FileNotFoundError naming PATH when it does not exist or holds no complete checkpoint;
        CheckpointError when the named checkpoint, or every checkpoint of the run, fails.
    """
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        verify_checkpoint(path)
        return path.parent.parent, path
    if not path.is_dir():
        raise FileNotFoundError(f"--resume: {str(path)!r} does not exist")
    newest = latest_checkpoint(path)
    if newest is None:
        raise FileNotFoundError(f"--resume: {str(path)!r} holds no complete checkpoint "
                                f"(expected {CHECKPOINT_DIR}/{PREFIX}NNNNNN/trainer_state.json)")
    candidates = [newest] + [c for c in reversed(_complete_checkpoints(newest.parent)) if c != newest]
    failures = []
    for ckpt in candidates:
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            failures.append(str(e))
            continue
        for failure in failures:
            print(f"prolix: warning: {failure}; resuming from {ckpt.name} instead", file=sys.stderr, flush=True)
        return path, ckpt
    raise CheckpointError(f"--resume: no checkpoint of {path} passes verification: " + "; ".join(failures))


def thread_count_warning(ckpt: str | Path) -> str | None:
    """One line when `ckpt` was written by a process that computed on another number of CPU
    threads than this one, else None. On CPU a matmul's reduction order follows the thread
    count, so a resumed run is bit-identical to an uninterrupted one only under the same count
    (and the same machine kind and library versions)."""
    saved = json.loads((Path(ckpt) / "trainer_state.json").read_text()).get("torch_threads")
    now = torch.get_num_threads()
    if saved is None or saved == now:
        return None
    return (f"prolix: warning: {Path(ckpt).name} was written computing on {saved} CPU threads, this process has "
            f"{now} (OMP_NUM_THREADS): the resumed run will not be bit-identical to an uninterrupted one")


def load_plain(ckpt: str | Path, *, optimizer: torch.optim.Optimizer | None,
                    reference: torch.nn.Module | None, restore_rng_state: bool = True,
                    verify: bool = True) -> dict[str, Any]:
    """Load optimizer / reference / RNG from a checkpoint (the policy itself is loaded by
    `model.load_policy(ckpt)`); returns the trainer state dict. With `verify` (the default)
    the manifest is checked first (`verify_checkpoint`; CheckpointError on a mismatch)."""
    ckpt = Path(ckpt)
    if verify:
        verify_checkpoint(ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    if reference is not None:
        if not (ckpt / "reference.safetensors").is_file():
            raise FileNotFoundError(f"{ckpt}: no reference.safetensors, but this run keeps a reference "
                                    "(algorithm.loss.kl_coef > 0); was it written with kl_coef = 0?")
        device = next(reference.parameters()).device
        missing, unexpected = load_model(reference, str(ckpt / "reference.safetensors"), strict=True,
                                         device=str(device))
        del missing, unexpected
    if restore_rng_state:
        restore_rng(torch.load(ckpt / "rng.pt", weights_only=True))
    return state
