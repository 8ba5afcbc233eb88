"""How the models and a mini-batch's work are laid over the ranks: `WholeModel` (no sharding,
one process) or `FSDP2` (data parallelism over torchrun ranks).

FSDP2, per rank:

    update      the mini-batch split with `packing.balance` (tokens + attention cost), each
                rank packing its share into micro-batches; ranks with fewer micro-batches run
                zero-weight ones (a 2-token sequence, loss mask all 0) so that every rank makes
                the same FSDP forward/backward calls. The normaliser is the whole mini-batch's,
                gradients are *summed* across ranks, so the result is the single-process gradient
    sharding    `fully_shard` per decoder layer, then the root (embedding, final norm, LM head);
                fp32 on CPU, bf16 compute with fp32 reduction (MixedPrecisionPolicy) on GPU.
                The reference is sharded the same way and never gets a gradient
    LM head     the fused kernel reads the [V, H] weight directly, outside any module call, so
                the trainer's forward (`model.head_inputs`: hidden states + head weight) is
                registered as an FSDP forward method of the root (`prepare`), and `forward`
                calls the registered method it kept: the root's parameters, the tied embedding /
                LM head among them, are gathered for it and, as FSDP keeps the root unsharded
                between forward and backward, stay whole until the backward has reduce-scattered
                them
    weight sync full weights gathered tensor by tensor (DTensor.full_tensor) into the engine
    checkpoints torch.distributed.checkpoint plus the first rank's consolidated Hugging Face
                export (`checkpoint.save_sharded`)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..packing import attention_crossover, balance, plan_microbatches
from .comm import GroupComm
from .protocols import Forward

__all__ = ["WholeModel", "FSDP2", "decoder_layers", "full_parameters"]

# The name FSDP's `register_fsdp_forward_method` needs for the root's packed forward; only
# `FSDP2.prepare` uses it, and keeps the registered method it returns (`forward`).
_FORWARD_METHOD = "prolix_forward"


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's repeated blocks (Qwen2/Llama/Mistral `model.layers`, GPT-style `h`)."""
    base = getattr(model, "base_model", model)
    for name in ("layers", "h"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return layers
    raise ValueError(f"{type(model).__name__}: no decoder layers found (expected base_model.layers or "
                     "base_model.h) to shard with FSDP")


def full_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of every parameter, tied weights once, gathered one tensor at a
    time from the FSDP shards (a collective: every rank must exhaust the iterator)."""
    from torch.distributed.tensor import DTensor

    state = model.state_dict()          # FSDP2 reshards first, so every entry is the sharded DTensor
    for name, _ in model.named_parameters():
        tensor = state[name]
        yield name, (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()


@dataclasses.dataclass
class WholeModel:
    """No sharding: the models are whole on this process's device, the batch is all its own."""

    device: torch.device
    group: Any = None
    """The process group a sharded checkpoint is loaded with (None: no other rank loads)."""
    _forward: Forward | None = dataclasses.field(default=None, repr=False)

    @property
    def load_device(self) -> torch.device:
        return self.device

    def prepare(self, policy, reference, forward: Forward, *, compute_dtype: torch.dtype | None = None) -> None:
        """Nothing to shard (`forward` applies `compute_dtype` itself)."""
        self._forward = forward

    def forward(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self._forward(model, batch)

    def whole_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model itself: it is whole already."""
        return model

    def full_parameters(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        return ((n, p.detach()) for n, p in model.named_parameters())

    def plan(self, lengths: list[int], max_tokens: int) -> list[list[int]]:
        return plan_microbatches(lengths, max_tokens)

    def sync_engine(self, engine, model: torch.nn.Module) -> None:
        engine.sync_weights(model)

    def save_checkpoint(self, run_dir: str | Path, step: int, **kwargs: Any) -> Path:
        return checkpoint.save_checkpoint(run_dir, step, **kwargs)

    def load_checkpoint(self, ckpt: str | Path, **kwargs: Any) -> dict[str, Any]:
        """Either format (plain or sharded, saved on any number of ranks) into plain models."""
        return checkpoint.load_checkpoint(ckpt, process_group=self.group, **kwargs)


@dataclasses.dataclass
class FSDP2:
    """FSDP2 over the ranks of `comm` (see the module docstring)."""

    comm: GroupComm
    crossover: float | None = None
    """The policy's `packing.attention_crossover` (set by `prepare`), for `balance`'s cost."""
    _forwards: weakref.WeakKeyDictionary = dataclasses.field(default_factory=weakref.WeakKeyDictionary, repr=False)
    """model -> its registered FSDP forward (`prepare`)."""

    @property
    def device(self) -> torch.device:
        return self.comm.device

    @property
    def load_device(self) -> torch.device:
        """The policy is read into host memory; `fully_shard` moves it to the GPU layer by layer,
        keeping only this rank's shard, so a whole policy (plus its reference) never has to fit
        on one GPU before sharding."""
        return torch.device("cpu")

    def prepare(self, policy: torch.nn.Module, reference: torch.nn.Module | None, forward: Forward, *,
                compute_dtype: torch.dtype | None = None) -> None:
        """Shard the policy and the reference (bf16 compute with `compute_dtype`)."""
        for model in filter(None, (policy, reference)):
            self._shard(model, forward, compute_dtype=compute_dtype)

    def forward(self, model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [N, H], head weight [V, H]) of a sharded model: its root's registered FSDP
        forward, the root's parameters gathered for it."""
        return self._forwards[model](batch)

    def whole_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """A whole copy of a model not yet sharded, on this rank's device (a colocated engine
        keeps whole weights)."""
        return copy.deepcopy(model).to(self.device)

    def full_parameters(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        return full_parameters(model)

    def _shard(self, model: torch.nn.Module, forward: Forward, *, compute_dtype: torch.dtype | None) -> None:
        """FSDP2 in place: each decoder layer, then the root. `forward(model, batch)` becomes the
        root's registered FSDP forward method, which `self.forward(model, batch)` calls.

        Gradients are summed over ranks (not averaged): the loss is already normalised by the
        whole mini-batch, so the sum is the single-process gradient."""
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        group = self.comm.group
        mesh = init_device_mesh(self.device.type, (self.comm.world_size,)) if group is None \
            else DeviceMesh.from_group(group, self.device.type)
        # compute in bf16 on GPU, reduce gradients in fp32; on CPU everything stays fp32
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype \
            else MixedPrecisionPolicy()
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)     # plain SUM: gloo has no PREMUL_SUM
        setattr(model, _FORWARD_METHOD, functools.partial(forward, model))
        register_fsdp_forward_method(model, _FORWARD_METHOD)
        self._forwards[model] = getattr(model, _FORWARD_METHOD)           # the hooked method, kept
        # The forward method returns views (hidden states of the one packed row, the weight);
        # the trainer never modifies them in place, which is what FSDP warns about.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        if self.crossover is None:
            c = model.config
            self.crossover = attention_crossover(
                c.hidden_size, c.intermediate_size, c.num_attention_heads,
                getattr(c, "num_key_value_heads", None) or c.num_attention_heads, getattr(c, "head_dim", None))

    def plan(self, lengths: list[int], max_tokens: int) -> list[list[int]]:
        """This rank's micro-batches of a mini-batch, as indices into `lengths`: its `balance`
        share packed first-fit-decreasing, then padded with empty entries (zero-weight
        micro-batches, see `packing.zero_weight_batch`) to the largest count of any rank, which
        every rank derives from the same plan without communicating."""
        kwargs = {"attention_crossover": self.crossover} if self.crossover else {}
        shares = balance(lengths, self.comm.world_size, **kwargs)
        plans = [[[share[j] for j in mb] for mb in plan_microbatches([lengths[i] for i in share], max_tokens)]
                 for share in shares]
        count = max(len(p) for p in plans)
        mine = plans[self.comm.rank]
        return mine + [[] for _ in range(count - len(mine))]

    def sync_engine(self, engine, model: torch.nn.Module) -> None:
        """A colocated engine ← the sharded policy's weights, gathered tensor by tensor."""
        engine.load_weights(full_parameters(model))

    def save_checkpoint(self, run_dir: str | Path, step: int, **kwargs: Any) -> Path:
        return checkpoint.save_sharded(self.comm, run_dir, step, **kwargs)

    def load_checkpoint(self, ckpt: str | Path, **kwargs: Any) -> dict[str, Any]:
        return checkpoint.load_checkpoint(ckpt, process_group=self.comm.group, **kwargs)
