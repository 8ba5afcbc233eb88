"""Evaluation: n samples per problem, scored, summarised as pass@k. One piece of code for the
trainer's periodic validation (`heldout_metrics`) and for `prolix eval` (`trainer/eval/`).

A source's problems are cut into chunks of `chunk` consecutive problems; each chunk is one engine
call whose sampling seed depends only on (seed, source name, chunk index) (`chunk_seed`). A
problem's samples therefore do not depend on which process evaluates its chunk, on which chunks
ran before (a resumed evaluation redoes only the missing chunks and gets what an uninterrupted
one gets) or on the other sources: on the same machine kind, thread count and library versions
they are bit-identical.

pass@k is the unbiased estimator (Chen et al. 2021) over a problem's n samples,
1 − C(n − c, k) / C(n, k) with c samples correct (reward ≥ the threshold), averaged over problems.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence

import torch

from .config import EvalConfig
from .metrics import pass_at_k
from .problem import Problem
from .rewards import pop_reward_errors
from .rollout.engines import Completion, SamplingConfig

__all__ = ["DEFAULT_CHUNK", "ProblemResult", "Scorer", "chunk_seed", "chunk_ranges", "evaluate_chunk",
           "evaluate_source", "summarize", "heldout_metrics"]

DEFAULT_CHUNK = 32           # problems per engine call: what a chunk's samples depend on
SEED_OFFSET = 7_777_777      # evaluation seeds stay clear of the rollouts' (run.seed, step, try) seeds

Scorer = Callable[[Sequence[Problem], Sequence[Sequence[Completion]]], torch.Tensor]
"""(problems, completions per problem) -> rewards [P, n] fp32: `RewardPool.score`."""


@dataclasses.dataclass(frozen=True)
class ProblemResult:
    """One problem's n samples: what `samples.jsonl` holds per line."""

    source: str
    index: int                 # position of the problem in its source
    prompt: str
    answer: str
    texts: tuple[str, ...]
    rewards: tuple[float, ...]
    lengths: tuple[int, ...]   # response tokens (EOS included)
    finished: tuple[bool, ...]  # EOS before max_tokens (False: truncated)

    def record(self) -> dict:
        samples = [{"text": t, "reward": r, "length": n, "finished": f}
                   for t, r, n, f in zip(self.texts, self.rewards, self.lengths, self.finished)]
        return {"source": self.source, "index": self.index, "prompt": self.prompt, "answer": self.answer,
                "samples": samples}

    @classmethod
    def from_record(cls, record: dict) -> ProblemResult:
        s = record["samples"]
        return cls(record["source"], record["index"], record["prompt"], record["answer"],
                   tuple(x["text"] for x in s), tuple(float(x["reward"]) for x in s),
                   tuple(int(x["length"]) for x in s), tuple(bool(x["finished"]) for x in s))


def chunk_seed(seed: int, source: str, chunk: int) -> int:
    """The sampling seed of chunk `chunk` of source `source` (crc32: the same in every process)."""
    return (seed * 1_000_003 + zlib.crc32(source.encode()) * 1_009 + chunk * 100_003 + SEED_OFFSET) % (2**31 - 1)


def chunk_ranges(count: int, chunk: int = DEFAULT_CHUNK) -> list[range]:
    """Problem indices of each chunk of a source of `count` problems, in order."""
    if chunk < 1:
        raise ValueError(f"chunk: expected >= 1 problems per chunk, got {chunk}")
    return [range(start, min(start + chunk, count)) for start in range(0, count, chunk)]


def evaluate_chunk(engine, source: str, problems: Sequence[Problem], indices: range, chunk: int,
                   prompt_ids: Callable[[Problem], list[int]], sampling: SamplingConfig, seed: int,
                   score: Scorer) -> list[ProblemResult]:
    """Sample and score one chunk (`problems[i]` for i in `indices`, chunk number `chunk`)."""
    todo = [problems[i] for i in indices]
    call = dataclasses.replace(sampling, seed=chunk_seed(seed, source, chunk))
    outs = engine.generate([prompt_ids(p) for p in todo], call)
    rewards = score(todo, outs).tolist()                                           # [P, n]
    return [ProblemResult(source, i, p.prompt, p.answer, tuple(c.text for c in cs), tuple(float(r) for r in rs),
                          tuple(len(c.response_ids) for c in cs), tuple(bool(c.finished) for c in cs))
            for i, p, cs, rs in zip(indices, todo, outs, rewards)]


def evaluate_source(engine, source: str, problems: Sequence[Problem], prompt_ids: Callable[[Problem], list[int]],
                    sampling: SamplingConfig, seed: int, score: Scorer, *, chunk: int = DEFAULT_CHUNK
                    ) -> list[ProblemResult]:
    """Every chunk of one source, in order."""
    return [r for c, indices in enumerate(chunk_ranges(len(problems), chunk))
            for r in evaluate_chunk(engine, source, problems, indices, c, prompt_ids, sampling, seed, score)]


def summarize(results: Sequence[ProblemResult], ks: Sequence[int], threshold: float) -> dict[str, float]:
    """pass@k for each k (a sample is correct when its reward is >= threshold), the mean reward,
    the mean response length, the truncated fraction, and the problem and sample counts."""
    rewards = [r for res in results for r in res.rewards]
    lengths = [n for res in results for n in res.lengths]
    samples = max(len(rewards), 1)
    out: dict[str, float] = {}
    for k in ks:
        per_problem = [pass_at_k(len(res.rewards), sum(r >= threshold for r in res.rewards), k) for res in results]
        out[f"pass@{k}"] = sum(per_problem) / max(len(per_problem), 1)
    out["mean_reward"] = sum(rewards) / samples
    out["response_len"] = sum(lengths) / samples
    out["truncated_frac"] = sum(not f for res in results for f in res.finished) / samples
    out["problems"], out["samples"] = len(results), len(rewards)
    return out


def heldout_metrics(engine, heldout: dict[str, list[Problem]], prompt_ids: Callable[[Problem], list[int]],
                    e: EvalConfig, *, seed: int, max_tokens: int, score: Scorer) -> dict[str, float]:
    """The trainer's validation: eval/<source>/pass@1 (the mean reward over e.n samples),
    accuracy (pass@1 of samples with reward >= e.correct_threshold), pass@k and response length
    per source; eval/score is the mean pass@1 over sources, eval/accuracy the mean accuracy.
    Reward failures of evaluation are dropped."""
    sampling = SamplingConfig(n=e.n, temperature=e.temperature, top_p=e.top_p, max_tokens=max_tokens)
    out: dict[str, float] = {}
    for name, problems in heldout.items():
        s = summarize(evaluate_source(engine, name, problems, prompt_ids, sampling, seed, score),
                      (1, e.k), e.correct_threshold)
        out[f"eval/{name}/pass@1"] = s["mean_reward"]
        out[f"eval/{name}/accuracy"] = s["pass@1"]
        out[f"eval/{name}/pass@{e.k}"] = s[f"pass@{e.k}"]
        out[f"eval/{name}/response_len"] = s["response_len"]
    pass1 = [v for k, v in out.items() if k.endswith("/pass@1")]
    acc = [v for k, v in out.items() if k.endswith("/accuracy")]
    out["eval/score"] = sum(pass1) / max(len(pass1), 1)
    out["eval/accuracy"] = sum(acc) / max(len(acc), 1)
    pop_reward_errors()
    return out
