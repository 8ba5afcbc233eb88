"""The sharded path of a checkpoint: torch.distributed.checkpoint (DCP) for the training state
of FSDP2 models, the consolidated Hugging Face export beside it, and loading either format.

    step_000040/dcp/                  model, optimizer (absent when empty), reference: sharded,
                                      re-shardable to any number of ranks (or none)
    step_000040/config.json, model.safetensors, tokenizer files, generation_config.json
                                      the consolidated policy (first rank), loadable by transformers/vLLM
    step_000040/rng.pt, trainer_state.json, manifest.json    as in the plain format (`store`)

A sharded checkpoint shares the plain one's folder, manifest and atomic publication
(`store.publish_checkpoint`); only the training state is written differently. `load_checkpoint`
reads both formats into plain or sharded models.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from . import store

__all__ = ["DCP_DIR", "GroupWriter", "is_distributed_checkpoint", "save_sharded", "load_checkpoint"]

DCP_DIR = "dcp"                        # the torch.distributed.checkpoint folder inside a checkpoint


class GroupWriter(Protocol):
    """The ranks that write a sharded checkpoint together (`parallel.comm.GroupComm`)."""

    group: Any
    """Their process group (None: the whole world)."""

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...


def is_distributed_checkpoint(ckpt: str | Path) -> bool:
    return (Path(ckpt) / DCP_DIR).is_dir()


def _model_state(model: torch.nn.Module, *, full: bool = False) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=full, cpu_offload=full))


def _export_hf(policy: torch.nn.Module, full: dict[str, torch.Tensor], out: Path) -> None:
    """config.json (+ generation_config.json) and safetensors of the gathered weights, as
    `save_pretrained` writes them: tied weights once, shards of at most 5 GB."""
    from huggingface_hub import save_torch_state_dict

    # own storage per tensor: the gathered ones may be views of one flat buffer, which
    # safetensors refuses to save (and a tied weight's other name is left out)
    tensors = {name: full.pop(name).clone() for name, _ in policy.named_parameters()}
    save_torch_state_dict(tensors, out, max_shard_size="5GB")
    policy.config.save_pretrained(out)          # names no attention implementation (see model.save_policy)
    if getattr(policy, "generation_config", None) is not None:
        policy.generation_config.save_pretrained(out)


def save_sharded(dp: GroupWriter, run_dir: str | Path, step: int, *, policy, tokenizer,
                    optimizer: torch.optim.Optimizer, reference: torch.nn.Module | None,
                    trainer_state: dict[str, Any], keep_last: int, tokenizer_source: str | Path | None = None) -> Path:
    """`store.save_checkpoint` for sharded models: the same folder and atomic publication (temp
    folder, fsync, rename, then `latest`), with the training state in DCP format (module
    docstring) and the first rank's RNG states. A collective: every rank calls it. The run directory must be on a filesystem every rank
    sees (DCP writes one file per rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    root = Path(run_dir) / store.CHECKPOINT_DIR
    final = root / store.step_dir_name(step)
    tmp = root / f".tmp-{final.name}-dcp"            # one name all ranks derive (their pids differ)
    if dp.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):            # a previous writer was killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dp.barrier()
    state: dict[str, Any] = {"model": _model_state(policy)}
    if optimizer.state:      # an empty state (just reset) is left out: reading it would initialise it
        state["optimizer"] = get_optimizer_state_dict(policy, optimizer)
    if reference is not None:
        state["reference"] = _model_state(reference)
    dcp.save(state, checkpoint_id=tmp / DCP_DIR, process_group=dp.group)
    full = _model_state(policy, full=True)           # collective; only rank 0 receives the tensors
    if dp.is_main:
        _export_hf(policy, full, tmp)
        store.save_tokenizer_files(tokenizer, tokenizer_source, tmp)
        # every rank's DCP files are complete by now: the manifest covers them too
        store.publish_checkpoint(tmp, final, step=step, trainer_state=trainer_state, keep_last=keep_last)
    del full
    dp.barrier()                                     # nobody resumes training before `latest` moved
    return final


def load_checkpoint(ckpt: str | Path, *, policy: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None,
                    reference: torch.nn.Module | None, restore_rng_state: bool = True,
                    verify: bool = True, process_group: Any = None) -> dict[str, Any]:
    """Restore optimizer, reference, RNG (and the policy's exact training weights) from a
    checkpoint in either format, into sharded or plain models; returns the trainer state.

    - single-process format into plain models: `store.load_plain`;
    - DCP format (any number of ranks at save time) into plain or sharded models: DCP reshards;
    - single-process format into sharded models: optimizer.pt and reference.safetensors are
      loaded whole on every rank and sharded (`full_state_dict`).
    The policy's weights otherwise come from the checkpoint's Hugging Face files (`load_policy`).
    `process_group`: the ranks that load together (DCP; None: the whole world)."""
    ckpt = Path(ckpt)
    if verify:                                       # manifest.json: sizes and sha256 of every file
        store.verify_checkpoint(ckpt)
    sharded = _is_sharded(policy)
    if not is_distributed_checkpoint(ckpt):
        if not sharded:
            return store.load_plain(ckpt, optimizer=optimizer, reference=reference,
                                              restore_rng_state=restore_rng_state, verify=False)
        _load_single_into_sharded(ckpt, policy, optimizer, reference)
    else:
        _load_dcp(ckpt, policy, optimizer, reference, process_group)
    if restore_rng_state:
        store.restore_rng(torch.load(ckpt / "rng.pt", weights_only=True))
    return json.loads((ckpt / "trainer_state.json").read_text())


def _is_sharded(model: torch.nn.Module | None) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _load_dcp(ckpt: Path, policy, optimizer, reference, process_group=None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    saved = {key.split(".", 1)[0] for key in FileSystemReader(str(ckpt / DCP_DIR)).read_metadata().state_dict_metadata}
    if reference is not None and "reference" not in saved:
        raise FileNotFoundError(f"{ckpt}: no reference in {DCP_DIR}/, but this run keeps a reference "
                                "(algorithm.loss.kl_coef > 0); was it written with kl_coef = 0?")
    state: dict[str, Any] = {"model": _model_state(policy)}
    if "optimizer" in saved:
        state["optimizer"] = get_optimizer_state_dict(policy, optimizer)
    if reference is not None:
        state["reference"] = _model_state(reference)
    with warnings.catch_warnings():       # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, checkpoint_id=ckpt / DCP_DIR, no_dist=not dist.is_initialized(), process_group=process_group)
    set_model_state_dict(policy, state["model"])
    if "optimizer" in state:
        set_optimizer_state_dict(policy, optimizer, state["optimizer"])
    if reference is not None:
        set_model_state_dict(reference, state["reference"])


def _with_tied(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` plus the names a file stores once for tied weights (e.g. lm_head.weight)."""
    by_param: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    out = dict(state)
    for names in by_param.values():
        have = next((n for n in names if n in state), None)
        for n in names:
            if have is not None and n not in out:
                out[n] = state[have]
    return out


def _load_single_into_sharded(ckpt: Path, policy, optimizer, reference) -> None:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True)
    saved = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    if saved["state"]:
        # torch's optimizer state names parameters by position in `policy.parameters()`
        # (`Trainer._make_optimizer`); DCP's by their names
        names = [n for n, p in policy.named_parameters() if p.requires_grad]
        fqn = {"state": {names[i]: s for i, s in saved["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
        set_optimizer_state_dict(policy, optimizer, fqn, options=full)
    if reference is not None:
        path = ckpt / "reference.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{ckpt}: no reference.safetensors, but this run keeps a reference "
                                    "(algorithm.loss.kl_coef > 0); was it written with kl_coef = 0?")
        set_model_state_dict(reference, _with_tied(reference, load_file(str(path))), options=full)
