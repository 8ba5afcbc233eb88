"""The policy: load/save any Hugging Face causal LM and run it on packed, padding-free tokens.

`forward_hidden(model, batch)` runs the decoder over a `PackedBatch` as one row of N tokens
([1, N] input_ids, position_ids restarting at 0 per sequence, so RoPE sees each sequence from 0)
and returns the final hidden states [N, H] (after the final norm) — never logits. Attention is
kept inside each sequence by prolix's own attention implementation, registered with
transformers' `AttentionInterface` under the name "prolix_packed" and chosen per call:

    backend             where (auto)                       how
    "flash_attn"        CUDA, fp16/bf16, flash-attn        flash_attn_varlen_func(cu_seqlens)
    "torch_varlen"      CUDA, fp16/bf16, torch has it      torch.nn.attention.varlen.varlen_attn
    "sdpa_block_mask"   CUDA otherwise (e.g. fp32)         one SDPA call, [N, N] block-diagonal
                                                           causal bool mask (N² bytes)
    "sdpa_per_sequence" CPU                                one causal SDPA call per sequence

On CPU the per-sequence loop is the exact and cheap choice: the projections and MLP still run
once over all N rows, while attention costs Σ L_s² instead of the N² of a block-diagonal mask
(and never materialises that mask); CPU batches hold few sequences, so the Python loop is
negligible. A sequence's hidden states therefore do not depend on its neighbours, up to the
rounding of the row-blocked GEMMs.

Why a registered implementation rather than transformers' own packing support: transformers
5.x detects packing from position_ids and then builds a [N, N] mask for sdpa/eager, or derives
cu_seqlens from position_ids for flash_attention_2 (flash-attn only). Ours passes the packer's
`cu_seqlens` straight through (`cu_seq_lens_q` / `max_length_q`, the FlashAttentionKwargs names)
and skips mask construction during `forward_hidden`. Outside `forward_hidden` (generation, a
plain padded `model(...)` call) the same model behaves exactly as "sdpa": the mask function is
transformers' `sdpa_mask` and the attention function is its `sdpa_attention_forward`. The
choice travels in the layer kwargs, so activation-checkpoint recomputation repeats it.

One path from a packed batch to the kernels, for the trainer and for any caller:
`head_inputs(model, batch)` (decoder under optional autocast → hidden [N, H], LM-head weight
[V, H], one dtype), then `logprobs_from_hidden` / `grpo_loss_from_hidden` (`prolix.kernels`,
which stream over the vocabulary instead of holding [N, V] logits). `logprobs` and
`packed_grpo_loss` are the two composed; the trainer composes them through its sharding
(`parallel.sharding`), whose `forward` is `head_inputs` itself or, under FSDP, the root's forward.

Shapes: N packed rows, S sequences, H hidden, V vocabulary, h/h_kv query/key heads, D head dim.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import inspect
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import get_args

import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from prolix.kernels import GRPOLossConfig, fused_linear_grpo_loss, linear_logprobs, seq_ids
from prolix.kernels.lm_head import plain_lm_head_weight

from .config import AttnBackend
from .invariant import FIXED_BLOCKS, batch_invariant_ops, fixed_block_attention
from .packing import PackedBatch

__all__ = ["ATTN_IMPLEMENTATION", "ATTN_BACKENDS", "AttnBackend", "load_policy", "save_policy", "check_model_dir",
           "frozen_copy", "prepare_policy", "forward_hidden", "lm_head_weight", "head_inputs", "logprobs",
           "logprobs_from_hidden", "packed_grpo_loss", "grpo_loss_from_hidden", "resolve_attn_backend"]

ATTN_IMPLEMENTATION = "prolix_packed"
ATTN_BACKENDS = get_args(AttnBackend)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
_HALF = (torch.float16, torch.bfloat16)

# Set while `forward_hidden` builds the decoder's masks: cu_seqlens carry the structure, so the
# [N, N] mask transformers would build from the restarting position_ids is skipped.
_SKIP_MASK = contextvars.ContextVar("prolix_skip_mask", default=False)


# ----------------------------------------------------------------------------- attention


@functools.cache
def _flash_attn_varlen():
    """flash-attn's varlen function, or None when flash-attn is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError):          # not installed, or built against another torch/CUDA
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen():
    """torch.nn.attention.varlen.varlen_attn and its parameter names, or None (older torch)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def resolve_attn_backend(backend: str, device: torch.device, dtype: torch.dtype, dropout: float = 0.0) -> str:
    """The concrete attention backend for `backend` ("auto" or one of ATTN_BACKENDS) on this
    device/dtype; raises ValueError naming what is missing when an explicit choice cannot run."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend: expected one of {ATTN_BACKENDS}, got {backend!r}")
    cuda_half = device.type == "cuda" and dtype in _HALF
    if backend == "auto":
        if cuda_half and _flash_attn_varlen() is not None:
            return "flash_attn"
        if cuda_half and _torch_varlen() is not None and dropout == 0.0:
            return "torch_varlen"
        return "sdpa_block_mask" if device.type == "cuda" else "sdpa_per_sequence"
    if backend in ("flash_attn", "torch_varlen") and not cuda_half:
        raise ValueError(f"attn_backend={backend!r} needs CUDA fp16/bf16 tensors, got {device.type} {dtype}")
    if backend == "flash_attn" and _flash_attn_varlen() is None:
        raise ValueError("attn_backend='flash_attn' but flash-attn is not installed (pip install flash-attn)")
    if backend == "torch_varlen":
        if _torch_varlen() is None:
            raise ValueError(f"attn_backend='torch_varlen' needs torch.nn.attention.varlen.varlen_attn, "
                             f"which torch {torch.__version__} does not have")
        if dropout != 0.0:
            raise ValueError(f"attn_backend='torch_varlen' has no attention dropout, got dropout={dropout}")
    return backend


def _causal_band(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[Lq, Lk] bool: key j visible from query i iff j <= i and (window < 0 or j >= i − window)."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window >= 0:
        allowed &= k_pos[None, :] >= q_pos[:, None] - window
    return allowed


def _sdpa_per_sequence(q, k, v, bounds: list[int], scaling, dropout, window) -> torch.Tensor:
    """q: (1, h, N, D), k/v: (1, h_kv, N, D) → (1, h, N, D), one causal SDPA per sequence."""
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        mask = None
        if 0 <= window < end - start - 1:                        # the window actually cuts
            pos = torch.arange(end - start, device=q.device)
            mask = _causal_band(pos, pos, window)
        outs.append(F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], attn_mask=mask,
            dropout_p=dropout, is_causal=mask is None, scale=scaling, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


def _sdpa_block_mask(q, k, v, cu: torch.Tensor, scaling, dropout, window) -> torch.Tensor:
    """q: (1, h, N, D), k/v: (1, h_kv, N, D) → (1, h, N, D), one SDPA call under a block-diagonal
    causal mask. K/V are repeated to h heads: SDPA's memory-efficient kernel takes masks but not GQA."""
    n = q.shape[2]
    seq = seq_ids(cu, n)
    pos = torch.arange(n, device=q.device)
    mask = _causal_band(pos, pos, window) & (seq[:, None] == seq[None, :])          # (N, N)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], dropout_p=dropout, scale=scaling)


def _torch_varlen_attention(q, k, v, cu, max_len, scaling, window) -> torch.Tensor:
    """q: (N, h, D), k/v: (N, h_kv, D) → (N, h, D) with torch's varlen flash attention; adapts to
    the installed signature (older releases take is_causal=True, newer window_size=(−1, 0))."""
    fn, params = _torch_varlen()
    kwargs = {"scale": scaling}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    if "window_size" in params:
        kwargs["window_size"] = (window, 0)                     # (−1, 0) = plain causal
    elif window >= 0 or "is_causal" not in params:
        raise ValueError("this torch's varlen_attn has no window_size; use attn_backend='sdpa_block_mask'")
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return fn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      sliding_window: int | None = None, *, prolix_attn_backend: str | None = None,
                      cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, **kwargs):
    """transformers attention function "prolix_packed".

    query: (1, h, N, D), key/value: (1, h_kv, N, D), as the model's attention module passes them.
    Returns (out, None) with out: (1, N, h, D), the layout every transformers attention returns.
    Without `prolix_attn_backend` (any call not made by `forward_hidden`) this is plain sdpa.
    """
    if prolix_attn_backend is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    if prolix_attn_backend == FIXED_BLOCKS:                 # batch-invariant mode (`invariant.attention`)
        return fixed_block_attention(query, key, value, scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
                                     sliding_window=sliding_window, cu_seqlens=cu_seq_lens_q,
                                     key_start=kwargs.get("prolix_key_start")), None
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"prolix packed attention does not support {unsupported!r} "
                             f"({type(module).__name__}); this model family is not supported")
    if query.shape[0] != 1 or cu_seq_lens_q is None or max_length_q is None:
        raise ValueError("prolix packed attention expects one packed row [1, N] with cu_seq_lens_q and "
                         f"max_length_q; got batch {query.shape[0]}")
    window = -1 if sliding_window is None else int(sliding_window) - 1   # keys i−window..i visible
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    backend = resolve_attn_backend(prolix_attn_backend, query.device, query.dtype, dropout)
    cu = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
    if backend in ("flash_attn", "torch_varlen"):
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))    # (N, h, D): contiguous views
        if backend == "flash_attn":
            out = _flash_attn_varlen()(q, k, v, cu, cu, max_length_q, max_length_q, dropout_p=dropout,
                                       softmax_scale=scaling, causal=True, window_size=(window, 0))
        else:
            out = _torch_varlen_attention(q, k, v, cu, max_length_q, scaling, window)
        return out.unsqueeze(0), None                                    # (1, N, h, D)
    if backend == "sdpa_block_mask":
        out = _sdpa_block_mask(query, key, value, cu, scaling, dropout, window)
    else:
        out = _sdpa_per_sequence(query, key, value, cu.tolist(), scaling, dropout, window)
    return out.transpose(1, 2), None                                     # (1, N, h, D)


def _packed_mask(*args, **kwargs):
    """Mask function of "prolix_packed": none inside `forward_hidden`, sdpa's everywhere else."""
    return None if _SKIP_MASK.get() else sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, _packed_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _packed_mask)


# ----------------------------------------------------------------------------- load / save


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _apply_liger(model: PreTrainedModel, liger: bool | None) -> bool:
    """Liger's RMSNorm / SwiGLU / RoPE Triton kernels on CUDA models; returns whether applied.

    liger=None applies them when possible, True requires them, False skips. Liger patches RoPE
    at module level, so it affects every model of that family in the process — CUDA only."""
    if liger is False:
        return False
    on_cuda = next(model.parameters()).device.type == "cuda"
    _apply_liger_kernel_to_instance = None
    if on_cuda or liger:        # importing Liger costs 1-3 s (it imports many model families)
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
        except ImportError:
            pass
    if not on_cuda or _apply_liger_kernel_to_instance is None:
        if liger:
            raise ValueError("liger=True needs a CUDA model and liger-kernel installed "
                             f"(model on {next(model.parameters()).device}, liger "
                             f"{'missing' if _apply_liger_kernel_to_instance is None else 'installed'})")
        return False
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
    return True


def prepare_policy(model: PreTrainedModel, *, gradient_checkpointing: bool = False,
                   liger: bool | None = None) -> PreTrainedModel:
    """Make a loaded model ready for packed training, in place; returns it.

    Switches attention to "prolix_packed" (plain sdpa outside `forward_hidden`), optionally
    enables activation checkpointing of every decoder layer (non-reentrant; active in train()
    mode) and applies Liger's kernels (see `_apply_liger`).
    """
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"{type(model).__name__} does not route attention through transformers' "
                             "AttentionInterface, so prolix cannot run it on packed sequences")
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:                                  # transformers >= 5.x
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _apply_liger(model, liger)
    return model


def check_model_dir(path: str | os.PathLike) -> Path:
    """The checkpoint directory, or FileNotFoundError naming the path and what is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"policy path {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"policy path {str(path)!r} is not a directory (expected a Hugging Face "
                                 "model directory with config.json and *.safetensors)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"policy path {str(path)!r} holds no config.json")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"policy path {str(path)!r} holds no weights (no *.safetensors file; "
                                f"found {sorted(p.name for p in path.iterdir())})")
    return path


def load_policy(path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                *, gradient_checkpointing: bool = False, liger: bool | None = None) -> PreTrainedModel:
    """Load a Hugging Face causal LM from a local directory of safetensors, ready for packing.

    Args:
        path: a directory written by `save_pretrained` (config.json + *.safetensors); never
            downloads.
        dtype: parameter dtype; default bf16 on CUDA, fp32 on CPU.
        device: default "cuda" when available, else "cpu".
        gradient_checkpointing, liger: see `prepare_policy`.

    Returns:
        The model (eval mode, as transformers returns it; call .train() to train).

    Raises:
        FileNotFoundError / NotADirectoryError naming `path` when it is missing, not a
        directory, or holds no config or no safetensors weights.
    """
    path = check_model_dir(path)
    device = torch.device(device) if device is not None else _default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # transformers renamed `torch_dtype` to `dtype` in 4.56; older versions would take `dtype`
    # as a config attribute and silently load fp32.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                 **{dtype_kw: dtype})
    model.to(device)
    return prepare_policy(model, gradient_checkpointing=gradient_checkpointing, liger=liger)


def frozen_copy(policy: torch.nn.Module, compute_dtype: torch.dtype | None) -> torch.nn.Module:
    """A copy of `policy` that only ever runs forward (the reference): stored in the compute
    dtype when there is one, in eval mode, without gradients."""
    ref = copy.deepcopy(policy)
    if compute_dtype is not None:
        ref.to(compute_dtype)
    return ref.eval().requires_grad_(False)


def save_policy(model: PreTrainedModel, path: str | os.PathLike, *, tokenizer=None,
                max_shard_size: str | int = "5GB") -> Path:
    """Save in Hugging Face format (config.json + safetensors) so transformers and vLLM load it.

    The tokenizer is saved from `tokenizer` when given, else its files are copied from the
    directory the model was loaded from (if that is a local directory holding them). The
    saved config names no attention implementation, so loaders use their defaults.
    Returns the directory.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
        return path
    source = Path(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")
    if str(source) and source.is_dir() and source.resolve() != path.resolve():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, path / name)
    return path


# ----------------------------------------------------------------------------- forward


def _check_batch(model: PreTrainedModel, batch: PackedBatch) -> None:
    if not isinstance(batch, PackedBatch):
        raise TypeError(f"batch: expected a PackedBatch, got {type(batch).__name__}")
    device = model.get_input_embeddings().weight.device
    if batch.input_ids.device != device or batch.cu_seqlens.device != device:
        raise ValueError(f"batch: on {batch.input_ids.device}, the model on {device}; call batch.to({str(device)!r})")


def forward_hidden(model: PreTrainedModel, batch: PackedBatch, *, attn_backend: str = "auto") -> torch.Tensor:
    """Final hidden states of every packed token, attention restricted to each sequence.

    Args:
        model: a transformers causal LM (or its base model); switched to "prolix_packed"
            attention on first use (see `prepare_policy`).
        batch: PackedBatch on the model's device.
        attn_backend: "auto" or one of ATTN_BACKENDS (module docstring).

    Returns:
        hidden: [N, H] in the model's dtype, after the final norm — what the LM head multiplies.
    """
    _check_batch(model, batch)
    if attn_backend not in ATTN_BACKENDS and attn_backend != FIXED_BLOCKS:
        raise ValueError(f"attn_backend: expected one of {ATTN_BACKENDS}, got {attn_backend!r}")
    prepare_policy(model, liger=False)
    token = _SKIP_MASK.set(True)
    try:
        out = model.base_model(
            input_ids=batch.input_ids[None],                    # (1, N)
            position_ids=batch.position_ids[None],              # (1, N), restarting per sequence
            use_cache=False,
            cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen,
            prolix_attn_backend=attn_backend,
        )
    finally:
        _SKIP_MASK.reset(token)
    return out.last_hidden_state[0]                             # (N, H)


def lm_head_weight(model: PreTrainedModel) -> torch.Tensor:
    """The [V, H] LM-head weight (the input embedding itself when embeddings are tied).

    Raises ValueError for heads `prolix.kernels` cannot express: no head, a bias, or logit
    scaling/soft-capping in the config (`prolix.kernels.lm_head.plain_lm_head_weight`, the one
    check the TRL integration shares)."""
    return plain_lm_head_weight(model)


def head_inputs(model: PreTrainedModel, batch: PackedBatch, *, attn_backend: str = "auto",
                compute_dtype: torch.dtype | None = None, batch_invariant: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the fused kernels take from the model: hidden [N, H] and the LM-head weight [V, H],
    in one dtype. With `compute_dtype` (bf16) the decoder runs under torch.autocast and both are
    cast to it (the cast is differentiable, so fp32 master weights get their gradient); without,
    both stay in the weight's dtype. This is the trainer's forward (under FSDP, the root's
    registered forward: `parallel.sharding.FSDP2.prepare`). `batch_invariant`: the decoder runs
    under `invariant.batch_invariant_ops` with the fixed-block attention (a row's bits do not
    depend on the batch; `attn_backend` is then unused)."""
    context = torch.autocast(batch.input_ids.device.type, dtype=compute_dtype) if compute_dtype else nullcontext()
    with context, (batch_invariant_ops() if batch_invariant else nullcontext()):
        hidden = forward_hidden(model, batch, attn_backend=FIXED_BLOCKS if batch_invariant else attn_backend)
    weight = lm_head_weight(model)
    dtype = compute_dtype or weight.dtype
    return hidden.to(dtype), weight.to(dtype)


def logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, batch: PackedBatch, *,
                         temperature: float = 1.0, return_entropy: bool = False, kernel_backend: str = "auto",
                         batch_invariant: bool = False):
    """log π(targets[n]) of every packed row from hidden [N, H] and the head weight [V, H]
    (`prolix.kernels.linear_logprobs`): [N] fp32, or (logp, entropy) both [N] fp32."""
    return linear_logprobs(hidden, weight, batch.targets, temperature=temperature, ignore_index=batch.ignore_index,
                           return_entropy=return_entropy, backend=kernel_backend, batch_invariant=batch_invariant)


def grpo_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, batch: PackedBatch, *,
                          config: GRPOLossConfig, normalizer: float | torch.Tensor | None = None,
                          kernel_backend: str = "auto", entropy_metric: bool = False, batch_invariant: bool = False,
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one packed micro-batch from hidden [N, H] and the head weight [V, H]
    (`prolix.kernels.fused_linear_grpo_loss`), with the batch's advantages, loss_mask,
    cu_seqlens and whichever of old_logp / ref_logp / rollout_logp it holds.
    Returns (loss 0-d fp32, metrics)."""
    return fused_linear_grpo_loss(
        hidden, weight, batch.targets, batch.advantages, batch.loss_mask, old_logp=batch.old_logp,
        ref_logp=batch.ref_logp, rollout_logp=batch.rollout_logp, cu_seqlens=batch.cu_seqlens, config=config,
        normalizer=normalizer, ignore_index=batch.ignore_index, entropy_metric=entropy_metric, backend=kernel_backend,
        batch_invariant=batch_invariant)


def logprobs(model: PreTrainedModel, batch: PackedBatch, *, temperature: float = 1.0,
             return_entropy: bool = False, attn_backend: str = "auto", kernel_backend: str = "auto",
             batch_invariant: bool = False):
    """log π(targets[n] | tokens of n's sequence up to n) for every packed row.

    Args:
        model, batch, attn_backend: as in `forward_hidden`.
        temperature: τ > 0, logits divided by it (the rollout's sampling temperature).
        return_entropy: also return the per-row entropy of softmax(z/τ).
        kernel_backend: passed to `prolix.kernels.linear_logprobs` as `backend`.
        batch_invariant: the batch-invariant decoder (`head_inputs`) and head: each row's bits
            do not depend on the rest of the batch.

    Returns:
        logp: [N] fp32 (0 on each sequence's last row, whose target is ignore_index), or
        (logp, entropy) both [N] fp32. Differentiable in the model's parameters.
    """
    hidden, weight = head_inputs(model, batch, attn_backend=attn_backend, batch_invariant=batch_invariant)
    return logprobs_from_hidden(hidden, weight, batch, temperature=temperature, return_entropy=return_entropy,
                                kernel_backend=kernel_backend, batch_invariant=batch_invariant)


def packed_grpo_loss(model: PreTrainedModel, batch: PackedBatch, *, config: GRPOLossConfig | None = None,
                     normalizer: float | torch.Tensor | None = None, attn_backend: str = "auto",
                     kernel_backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one packed micro-batch: forward_hidden → fused LM head + loss.

    `normalizer` is the global denominator of the whole mini-batch (see
    `prolix.kernels.fused_linear_grpo_loss`), so micro-batch losses add up to the batch loss.
    `config` defaults to `GRPOLossConfig()`. Returns (loss 0-d fp32, metrics).
    """
    hidden, weight = head_inputs(model, batch, attn_backend=attn_backend)
    return grpo_loss_from_hidden(hidden, weight, batch, config=config or GRPOLossConfig(), normalizer=normalizer,
                                 kernel_backend=kernel_backend)
