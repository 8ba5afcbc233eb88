"""Problem sources: reasoning-gym generators and JSONL/parquet files, mixed by weight.

A `Problem` (`problem.py`) is one question with its ground truth and the name of the reward fn that
scores it (`rewards.REWARDS`). A `ProblemSource` gives training problems (`sample(n, rng)`, a pure function
of the caller's `random.Random`, so a resumed run that restores its rng draws the same problems)
and a fixed held-out set (`heldout()`), disjoint from training by question text.

reasoning-gym (procedural, offline). An item of a reasoning-gym dataset is a pure function of
`(seed, index)`; most datasets seed `random.Random(seed + index)` per item.
- Training: every `sample` call builds a fresh dataset with `seed = rng.randrange(2**31)` and takes
  its first n items. ProRL trains for thousands of steps; a fixed pool would be repeated many
  times, while fresh seeds make the data effectively infinite (no epochs, no "seen" bookkeeping, no
  source state to checkpoint). The dataset is rebuilt per call rather than indexed at random in
  one huge virtual dataset because some generators precompute or bound-check their `size`
  (acre, list_functions, word_ladder).
- Held-out: built once from `seed = cfg.seed + 2**32`, outside the training seed range
  [0, 2**31 + n), so for `Random(seed + index)` generators no rng stream is shared. Small problem
  spaces still repeat questions (1-digit chain_sum has a few hundred), so disjointness is enforced
  by question text: held-out questions are deduplicated, and a training draw whose question is
  held out is rejected and redrawn. `Problem.metadata` keeps the entry for the dataset's own
  `score_answer(answer, entry)`: {"dataset", "dataset_kwargs", "entry"}.

Files. JSONL (one JSON object per line) or parquet, with `prompt_field` and `answer_field`
columns; every row is validated when the source is built (errors name the file, the 1-based row
— the line number for JSONL — and the field). The held-out rows are the first `heldout_size`
distinct prompts of a `Random(cfg.seed)` shuffle; training is every row whose prompt is not held
out, drawn without replacement within a call. `metadata` is the whole row (for user rewards).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from typing import Any

from .config.sources import SOURCE_KINDS, SourceConfig, create_rg_dataset
from .problem import Problem, ProblemSource

__all__ = [
    "Problem",
    "ProblemSource",
    "SourceConfig",
    "SOURCE_KINDS",
    "ReasoningGymSource",
    "FileSource",
    "MixedSource",
    "make_source",
    "read_file_problems",
]

TRAIN_SEED_SPACE = 2**31
HELDOUT_SEED_OFFSET = 2**32
MAX_DRAW_ROUNDS = 100  # sample(): fresh datasets tried before giving up on a tiny problem space


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")


# --------------------------------------------------------------------------- reasoning-gym

class ReasoningGymSource:
    """A reasoning-gym dataset: fresh seeds per training draw, a fixed deduplicated held-out set."""

    def __init__(self, cfg: SourceConfig):
        if cfg.kind != "reasoning_gym":
            raise ValueError(f"ReasoningGymSource needs kind='reasoning_gym', got {cfg.kind!r}")
        self.cfg = cfg
        self.name = cfg.name
        self._heldout = self._build_heldout()
        self._heldout_questions = frozenset(p.prompt for p in self._heldout)

    def _problem(self, entry: dict) -> Problem:
        answer = entry.get("answer")
        return Problem(prompt=entry["question"], answer="" if answer is None else str(answer),
                       task=self.name, reward=self.cfg.reward,
                       metadata={"dataset": self.name, "dataset_kwargs": dict(self.cfg.dataset_kwargs),
                                 "entry": entry})

    def _build_heldout(self) -> list[Problem]:
        want = self.cfg.heldout_size
        if want == 0:
            return []
        scan = 4 * want + 16  # room for duplicate questions in small problem spaces
        ds = create_rg_dataset(self.name, self.cfg.dataset_kwargs, seed=self.cfg.seed + HELDOUT_SEED_OFFSET, size=scan)
        seen: dict[str, Problem] = {}
        for i in range(scan):
            entry = ds[i]
            seen.setdefault(entry["question"], self._problem(entry))
            if len(seen) == want:
                return list(seen.values())
        raise ValueError(f"reasoning-gym {self.name!r} gave only {len(seen)} distinct questions in {scan} "
                         f"draws; lower heldout_size={want} or widen dataset_kwargs")

    def sample(self, n: int, rng: random.Random) -> list[Problem]:
        _check_n(n)
        out: list[Problem] = []
        for _ in range(MAX_DRAW_ROUNDS):
            if len(out) >= n:
                return out
            ds = create_rg_dataset(self.name, self.cfg.dataset_kwargs, seed=rng.randrange(TRAIN_SEED_SPACE), size=n)
            for i in range(n):
                entry = ds[i]
                if entry["question"] not in self._heldout_questions:
                    out.append(self._problem(entry))
                    if len(out) == n:
                        break
        if len(out) >= n:
            return out
        raise RuntimeError(f"reasoning-gym {self.name!r}: almost every question is held out "
                           f"(heldout_size={self.cfg.heldout_size}); lower it or widen dataset_kwargs")

    def heldout(self) -> list[Problem]:
        return list(self._heldout)


# --------------------------------------------------------------------------- files

def _read_rows(cfg: SourceConfig) -> list[Any]:
    if cfg.kind == "jsonl":
        rows: list[Any] = []
        with open(cfg.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    rows.append(None)  # keeps row numbers equal to line numbers; skipped later
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{cfg.path}: row {lineno}: invalid JSON ({e})") from e
        return rows
    import pyarrow.parquet as pq

    table = pq.read_table(cfg.path)
    for field in (cfg.prompt_field, cfg.answer_field):
        if field not in table.column_names:
            raise ValueError(f"{cfg.path}: row 1: missing field {field!r} (columns: {table.column_names})")
    return table.to_pylist()


def _row_problem(cfg: SourceConfig, row: Any, rownum: int) -> Problem:
    where = f"{cfg.path}: row {rownum}"
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with {cfg.prompt_field!r} and {cfg.answer_field!r}, "
                         f"got {type(row).__name__}")
    for field in (cfg.prompt_field, cfg.answer_field):
        if row.get(field) is None:
            raise ValueError(f"{where}: missing field {field!r} (fields: {sorted(row)})")
    prompt, answer = row[cfg.prompt_field], row[cfg.answer_field]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: field {cfg.prompt_field!r} must be a non-empty string, got {prompt!r}")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"{where}: field {cfg.answer_field!r} must be a string or number, "
                         f"got {type(answer).__name__}")
    if not str(answer).strip():
        raise ValueError(f"{where}: field {cfg.answer_field!r} is empty")
    return Problem(prompt=prompt, answer=str(answer), task=cfg.name, reward=cfg.reward, metadata=dict(row))


def read_file_problems(cfg: SourceConfig) -> list[Problem]:
    """Every row of a JSONL or parquet source as a Problem, in file order, each one validated
    (ValueError naming the file, the row and the field); what `prolix eval --data` scores."""
    if cfg.kind not in ("jsonl", "parquet"):
        raise ValueError(f"a file source needs kind='jsonl' or 'parquet', got {cfg.kind!r}")
    problems = [_row_problem(cfg, row, i) for i, row in enumerate(_read_rows(cfg), 1) if row is not None]
    if not problems:
        raise ValueError(f"{cfg.path}: no rows")
    return problems


class FileSource:
    """Problems from a JSONL or parquet file, validated row by row, with a seeded held-out split."""

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.name = cfg.name
        problems = read_file_problems(cfg)
        order = list(range(len(problems)))
        random.Random(cfg.seed).shuffle(order)
        held: dict[str, Problem] = {}
        for i in order:
            if len(held) == cfg.heldout_size:
                break
            held.setdefault(problems[i].prompt, problems[i])
        self._heldout = list(held.values())
        self._train = [p for p in problems if p.prompt not in held]
        if not self._train:
            raise ValueError(f"{cfg.path}: heldout_size={cfg.heldout_size} leaves no training rows "
                             f"({len(problems)} rows, {len({p.prompt for p in problems})} distinct prompts)")

    def sample(self, n: int, rng: random.Random) -> list[Problem]:
        _check_n(n)
        out: list[Problem] = []
        while len(out) < n:  # without replacement within each pass over the training rows
            out += rng.sample(self._train, min(n - len(out), len(self._train)))
        return out

    def heldout(self) -> list[Problem]:
        return list(self._heldout)


# --------------------------------------------------------------------------- mixing

class MixedSource:
    """Several sources; each training draw picks a source with probability ∝ its weight."""

    def __init__(self, sources: Sequence[ProblemSource], weights: Sequence[float], name: str = "mixed"):
        if not sources or len(sources) != len(weights):
            raise ValueError(f"need one weight per source and at least one source, got "
                             f"{len(sources)} sources and {len(weights)} weights")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"weights must be finite and > 0, got {list(weights)}")
        self.sources, self.weights, self.name = list(sources), [float(w) for w in weights], name

    def sample(self, n: int, rng: random.Random) -> list[Problem]:
        _check_n(n)
        picks = rng.choices(range(len(self.sources)), weights=self.weights, k=n)
        drawn = [iter(src.sample(picks.count(k), rng)) if k in picks else iter(())
                 for k, src in enumerate(self.sources)]
        return [next(drawn[k]) for k in picks]  # keep the random interleaving of the picks

    def heldout(self) -> list[Problem]:
        return [p for src in self.sources for p in src.heldout()]


def make_source(cfg: SourceConfig | Sequence[SourceConfig]) -> ProblemSource:
    """Build the source of one config, or a `MixedSource` (weights from the configs) of several."""
    if isinstance(cfg, SourceConfig):
        return ReasoningGymSource(cfg) if cfg.kind == "reasoning_gym" else FileSource(cfg)
    cfgs = list(cfg)
    if not cfgs or not all(isinstance(c, SourceConfig) for c in cfgs):
        raise TypeError(f"make_source takes a SourceConfig or a non-empty list of them, got {cfg!r}")
    if len(cfgs) == 1:
        return make_source(cfgs[0])
    return MixedSource([make_source(c) for c in cfgs], [c.weight for c in cfgs])
