"""One engine process of `prolix eval`: load each checkpoint it is given, sample and score its
chunks (`evaluation.evaluate_chunk`), and hand every finished chunk on as soon as it is done.

With `--nproc 1` the command calls `run_plan` in its own process; with G > 1 it starts G spawned
processes (`worker_main`), each with one GPU (`CUDA_VISIBLE_DEVICES`) and its own engine, which
put their chunks on a queue that the command reads.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from ..evaluation import ProblemResult, chunk_ranges, evaluate_chunk
from ..model import load_policy
from ..problem import Problem
from ..rewards import RewardPool
from ..rollout.engines import SamplingConfig, make_engine
from ..tokenizer import format_prompt, load_tokenizer
from .options import Target

__all__ = ["Job", "WorkerPlan", "run_plan", "worker_main", "make_eval_engine"]

GPU_MEMORY_UTILIZATION = 0.85     # vLLM alone on its GPU (training shares it: 0.3 there)

Emit = Callable[[Target, str, int, list[ProblemResult]], None]
"""(checkpoint, source, chunk index, the chunk's results) of each finished chunk."""


@dataclasses.dataclass(frozen=True)
class Job:
    """The chunks of one checkpoint that a process scores: (source, chunk index) pairs."""

    target: Target
    chunks: tuple[tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """What one engine process does (picklable: it travels to a spawned process)."""

    jobs: tuple[Job, ...]
    sources: dict[str, list[Problem]]
    engine: str
    sampling: SamplingConfig          # seed None: each chunk gets its own (`evaluation.chunk_seed`)
    seed: int
    chunk: int
    system_prompt: str
    max_model_len: int
    reward_workers: int


def make_eval_engine(name: str, path: Path, tokenizer, *, max_model_len: int, seed: int):
    """The engine over the checkpoint at `path`: the torch sampler on the model loaded to the
    GPU (CPU without one), or vLLM reading the checkpoint's files itself."""
    if name == "vllm":
        on_gpu = torch.cuda.is_available()
        model = load_policy(path, dtype=torch.bfloat16 if on_gpu else torch.float32, device="cpu")
        options = {"gpu_memory_utilization": GPU_MEMORY_UTILIZATION} if on_gpu else {}
        return make_engine("vllm", model, tokenizer, max_model_len=max_model_len, seed=seed, model_path=str(path),
                           **options)
    return make_engine("torch", load_policy(path), tokenizer, max_model_len=max_model_len, seed=seed)


def run_plan(plan: WorkerPlan, emit: Emit) -> None:
    """Every job of the plan, checkpoint by checkpoint, one engine at a time."""
    with RewardPool(plan.reward_workers) as pool:
        for job in plan.jobs:
            if not job.chunks:
                continue
            tokenizer = load_tokenizer(job.target.path)
            engine = make_eval_engine(plan.engine, job.target.path, tokenizer, max_model_len=plan.max_model_len,
                                      seed=plan.seed)
            prompt_ids = lambda p, tok=tokenizer: format_prompt(tok, p.prompt, plan.system_prompt)
            try:
                for source, c in job.chunks:
                    problems = plan.sources[source]
                    indices = chunk_ranges(len(problems), plan.chunk)[c]
                    emit(job.target, source, c, evaluate_chunk(engine, source, problems, indices, c, prompt_ids,
                                                               plan.sampling, plan.seed, pool.score))
            finally:
                engine.close()


def worker_main(rank: int, device: str | None, plan: WorkerPlan, queue) -> None:
    """A spawned process: `run_plan` on GPU `device` (None: the CPU), each chunk put on `queue`
    as ("chunk", target, source, chunk, records), then ("done", rank) or ("error", rank, traceback)."""
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device          # before CUDA starts in this process
    try:
        run_plan(plan, lambda target, source, c, results: queue.put(
            ("chunk", target, source, c, [r.record() for r in results])))
    except BaseException:
        queue.put(("error", rank, traceback.format_exc()))
        raise
    queue.put(("done", rank, None))
