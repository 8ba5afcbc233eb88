"""Checkpoints in one place: the folder, its manifest and atomic publication, in two formats.

    store     the run's checkpoint folder (`latest`, rotation, manifest, RNG states) and the
              plain format that one process writes (safetensors + optimizer.pt)
    sharded   the format of FSDP2 runs (torch.distributed.checkpoint beside a consolidated
              Hugging Face export) and `load_checkpoint`, which reads either format into
              plain or sharded models
"""

from .sharded import is_distributed_checkpoint, load_checkpoint, save_sharded
from .store import (
    CHECKPOINT_DIR,
    CheckpointError,
    CheckpointWriteError,
    as_nested_tuples,
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
    thread_count_warning,
    verify_checkpoint,
)

__all__ = ["CHECKPOINT_DIR", "CheckpointError", "CheckpointWriteError", "as_nested_tuples", "capture_rng",
           "is_distributed_checkpoint", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "resolve_checkpoint", "restore_rng",
           "save_checkpoint", "save_sharded", "thread_count_warning", "verify_checkpoint"]
