"""Running an evaluation: what is left to do, who does it, and the files that record it.

OUT/eval.json holds the options the samples depend on (`EvalSpec.fingerprint`); OUT/samples.jsonl
one line per scored problem, appended chunk by chunk as engines finish them. Started again with
the same options, an evaluation keeps every complete chunk of samples.jsonl (a line cut short by
a kill, or a chunk only partly written, is dropped) and scores only the rest: since a chunk's
samples depend on its seed alone (`evaluation.chunk_seed`), the summary is the one an
uninterrupted run writes. At the end samples.jsonl is rewritten in a fixed order (checkpoint,
source, problem), whatever order the processes finished in.

With `--nproc G` the pending chunks are dealt round-robin to G spawned processes (`worker.py`),
one GPU and engine each; each finished chunk comes back on a queue, is written here, and moves
the one progress bar (problems, rate, time left). The summary is computed once, from all of them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import sys

import torch
from tqdm.auto import tqdm

from ..evaluation import ProblemResult, chunk_ranges
from ..rollout.engines import SamplingConfig
from .options import EvalInputError, EvalSpec, Target
from .report import write_reports
from .worker import Job, WorkerPlan, run_plan, worker_main

__all__ = ["OPTIONS_FILE", "SAMPLES_FILE", "EvalWorkerError", "SampleStore", "check_resumable", "run"]

OPTIONS_FILE, SAMPLES_FILE = "eval.json", "samples.jsonl"
POLL_S = 1.0                       # how often the command checks that its processes are alive

ChunkKey = tuple[int | None, str, int]      # (checkpoint step, source, chunk index)


class EvalWorkerError(RuntimeError):
    """An engine process of `--nproc G` failed; names it and ends with its traceback."""


def check_resumable(spec: EvalSpec) -> None:
    """An existing OUT must hold an evaluation with the same options (EvalInputError otherwise)."""
    path = spec.out / OPTIONS_FILE
    if not path.is_file():
        return
    saved, now = json.loads(path.read_text()), spec.fingerprint()
    for key, value in now.items():
        if saved.get(key) != value:
            raise EvalInputError(f"--out: {spec.out} holds an evaluation with other options ({key}: {saved.get(key)!r} "
                                 f"there, {value!r} now); repeat its options to resume it, or choose another --out")


class SampleStore:
    """samples.jsonl: the complete chunks of an earlier start, then one append per new chunk."""

    def __init__(self, spec: EvalSpec):
        self.spec, self.path = spec, spec.out / SAMPLES_FILE
        self.steps = {t.step for t in spec.targets}
        self.done: dict[ChunkKey, list[ProblemResult]] = {}
        if self.path.is_file():
            self.done = self._complete_chunks(self.path.read_text(encoding="utf-8").splitlines())
        self._rewrite()
        self._file = open(self.path, "a", encoding="utf-8")

    def _expected(self, source: str, c: int) -> range | None:
        ranges = chunk_ranges(len(self.spec.sources[source]), self.spec.chunk)
        return ranges[c] if 0 <= c < len(ranges) else None

    def _complete_chunks(self, lines: list[str]) -> dict[ChunkKey, list[ProblemResult]]:
        found: dict[ChunkKey, dict[int, ProblemResult]] = {}
        for line in lines:
            try:
                record = json.loads(line)
                key = (record["step"], record["source"], record["chunk"])
                result = ProblemResult.from_record(record)
            except (ValueError, KeyError, TypeError):
                continue                    # a line cut short by a kill
            if key[0] in self.steps and key[1] in self.spec.sources:
                found.setdefault(key, {})[result.index] = result
        return {key: [byindex[i] for i in self._expected(key[1], key[2])] for key, byindex in found.items()
                if self._expected(key[1], key[2]) is not None and set(byindex) == set(self._expected(key[1], key[2]))}

    def _rewrite(self) -> None:
        """samples.jsonl as the complete chunks, in the fixed order (atomically)."""
        order = {(t.step, s): i for i, (t, s) in enumerate((t, s) for t in self.spec.targets for s in self.spec.sources)}
        keys = sorted(self.done, key=lambda k: (order[k[:2]], k[2]))
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(self._lines(k, self.done[k]) for k in keys), encoding="utf-8")
        tmp.replace(self.path)

    @staticmethod
    def _lines(key: ChunkKey, results: list[ProblemResult]) -> str:
        return "".join(json.dumps({"step": key[0], "chunk": key[2], **r.record()}, ensure_ascii=False) + "\n"
                       for r in results)

    def add(self, target: Target, source: str, c: int, results: list[ProblemResult]) -> None:
        key = (target.step, source, c)
        self._file.write(self._lines(key, results))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done[key] = results

    def pending(self) -> list[tuple[Target, str, int]]:
        return [(t, s, c) for t in self.spec.targets for s, ps in self.spec.sources.items()
                for c in range(len(chunk_ranges(len(ps), self.spec.chunk))) if (t.step, s, c) not in self.done]

    def results(self) -> dict[tuple[int | None, str], list[ProblemResult]]:
        out: dict[tuple[int | None, str], list[ProblemResult]] = {}
        for key in sorted(self.done, key=lambda k: k[2]):
            out.setdefault(key[:2], []).extend(self.done[key])
        return out

    def close(self, *, final: bool) -> None:
        self._file.close()
        if final:
            self._rewrite()


def _plans(spec: EvalSpec, pending: list[tuple[Target, str, int]]) -> list[WorkerPlan]:
    """The pending chunks dealt round-robin to spec.nproc processes, grouped per checkpoint."""
    sampling = SamplingConfig(n=spec.n, temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens)
    plans = []
    for rank in range(spec.nproc):
        mine = pending[rank::spec.nproc]
        jobs = tuple(Job(t, tuple((s, c) for u, s, c in mine if u == t)) for t in spec.targets)
        plans.append(WorkerPlan(jobs=jobs, sources=spec.sources, engine=spec.engine, sampling=sampling, seed=spec.seed,
                                chunk=spec.chunk, system_prompt=spec.system_prompt, max_model_len=spec.max_model_len,
                                reward_workers=spec.reward_workers))
    return plans


def _devices(nproc: int) -> list[str | None]:
    """The GPU each process gets (None: CPU processes)."""
    if not torch.cuda.is_available():
        return [None] * nproc
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()] or \
        [str(i) for i in range(torch.cuda.device_count())]
    if nproc > len(visible):
        raise EvalInputError(f"--nproc: {nproc} processes need a GPU each, but {len(visible)} are visible")
    return visible[:nproc]


def _run_processes(plans: list[WorkerPlan], devices: list[str | None], emit) -> None:
    """One spawned process per plan with work; every chunk they put on the queue goes to `emit`."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = {rank: ctx.Process(target=worker_main, args=(rank, devices[rank], plan, q), name=f"prolix-eval-{rank}")
             for rank, plan in enumerate(plans) if any(job.chunks for job in plan.jobs)}
    for p in procs.values():
        p.start()
    running = set(procs)
    try:
        while running:
            try:
                item = q.get(timeout=POLL_S)
            except queue.Empty:
                dead = [r for r in running if not procs[r].is_alive() and procs[r].exitcode != 0]
                if dead:
                    raise EvalWorkerError(f"engine process {dead[0]} exited with status {procs[dead[0]].exitcode}") \
                        from None
                continue
            if item[0] == "chunk":
                emit(*item[1:])
            elif item[0] == "done":
                running.discard(item[1])
            else:
                raise EvalWorkerError(f"engine process {item[1]} failed:\n{item[2].rstrip()}")
    finally:
        for p in procs.values():
            if p.is_alive():
                p.terminate()
            p.join()


def run(spec: EvalSpec, *, progress: bool = True) -> dict:
    """Score what is left, write the reports; returns the summary."""
    check_resumable(spec)
    devices = _devices(spec.nproc) if spec.nproc > 1 else [None]
    spec.out.mkdir(parents=True, exist_ok=True)
    (spec.out / OPTIONS_FILE).write_text(json.dumps(spec.fingerprint(), indent=1) + "\n")
    store = SampleStore(spec)
    pending = store.pending()
    total = len(spec.targets) * sum(len(ps) for ps in spec.sources.values())          # problems to score in all
    left = sum(len(chunk_ranges(len(spec.sources[s]), spec.chunk)[c]) for _, s, c in pending)
    finished = False
    bar = tqdm(total=total, initial=total - left, desc="prolix eval", unit="problem", dynamic_ncols=True,
               file=sys.stderr, disable=not progress)

    def emit(target: Target, source: str, c: int, results) -> None:
        results = [r if isinstance(r, ProblemResult) else ProblemResult.from_record(r) for r in results]
        store.add(target, source, c, results)
        bar.update(len(results))

    try:
        plans = _plans(spec, pending)
        if spec.nproc == 1:
            run_plan(plans[0], emit)
        elif pending:
            _run_processes(plans, devices, emit)
        finished = True
    finally:
        bar.close()
        store.close(final=finished)
    return write_reports(spec, store.results())
