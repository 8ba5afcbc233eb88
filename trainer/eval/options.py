"""`prolix eval`'s command line, and every check that runs before a model is loaded.

`resolve(args)` turns the parsed options into an `EvalSpec`: the checkpoints to score (a model
directory, a run's latest checkpoint or all of them), each source's problems (JSONL / parquet
rows, reasoning-gym held-out problems, or a run's own held-out sets), the sampling, and the
context the engine needs. A missing file or field, an unknown reward, task or engine, k > n, a
run directory without a checkpoint or a prompt that does not fit the model raise
`EvalInputError`, which the command prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

from ..checkpoint import latest_checkpoint, list_checkpoints
from ..config import ConfigError, SourceConfig, load_config
from ..data import prepare_data
from ..evaluation import DEFAULT_CHUNK
from ..preflight import check_engine, check_model_path
from ..problem import Problem
from ..tasks import ReasoningGymSource, read_file_problems
from ..tokenizer import SYSTEM_PROMPT, format_prompt, load_tokenizer

__all__ = ["EvalInputError", "Target", "EvalSpec", "build_parser", "resolve", "DEFAULT_RG_COUNT", "MAX_TOKENS_CAP"]

DEFAULT_RG_COUNT = 64         # reasoning-gym problems per task without :COUNT
MAX_TOKENS_CAP = 32768        # --max-tokens default for a model directory: its context, at most this


class EvalInputError(ValueError):
    """Bad input to `prolix eval`: one line naming the option, the expected and the actual value."""


class OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors as one line (`prolix eval: error: ...`), exit status 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


@dataclasses.dataclass(frozen=True)
class Target:
    """One model to score: a Hugging Face directory and, for a checkpoint, its training step."""

    path: Path
    step: int | None = None


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Everything an evaluation needs, checked; `fingerprint()` is what its samples depend on."""

    target: Path
    targets: tuple[Target, ...]
    sources: dict[str, list[Problem]]
    described: dict[str, str]          # how each source was given (file and reward, task and count)
    n: int
    ks: tuple[int, ...]
    temperature: float
    top_p: float
    max_tokens: int
    max_model_len: int
    seed: int
    engine: str
    nproc: int
    chunk: int
    threshold: float
    system_prompt: str
    reward_workers: int
    out: Path
    all_checkpoints: bool

    def fingerprint(self) -> dict:
        """The options a sample depends on; a resumed evaluation must match them."""
        return {"target": str(self.target), "sources": self.described, "n": self.n,
                "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "seed": self.seed, "engine": self.engine, "chunk": self.chunk, "system_prompt": self.system_prompt}


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return tuple(sorted(set(values)))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="prolix eval", formatter_class=argparse.RawDescriptionHelpFormatter,
                      description="Score a model, a run's latest checkpoint or every checkpoint of a run: n samples\n"
                                  "per problem, pass@k (unbiased estimator), mean response length, truncated\n"
                                  "fraction. Writes OUT/summary.json, summary.md, samples.jsonl (and with\n"
                                  "--all-checkpoints pass_at_k.png); run the same command again to resume.",
                      epilog="examples:\n"
                             "  prolix eval /models/R1-Distill-Qwen-1.5B --data aime24.jsonl --out eval/base\n"
                             "  prolix eval runs/NAME --all-checkpoints --data aime24.jsonl --reasoning-gym "
                             "chain_sum:64 --out eval/NAME\n"
                             "  prolix eval runs/NAME --n 4 --k 1,4 --out eval/heldout   # the run's own held-out sets")
    p.add_argument("target", metavar="TARGET", help="a Hugging Face model directory, one checkpoint directory, or "
                   "a run directory (its latest checkpoint; every one with --all-checkpoints)")
    p.add_argument("--data", action="append", default=[], metavar="FILE[:REWARD]",
                   help="a JSONL or parquet file of problems (every row), scored by REWARD: math_verify (default), "
                        "exact, code_tests, reasoning_gym, a registered reward or pkg.module:function; repeatable")
    p.add_argument("--reasoning-gym", action="append", default=[], metavar="TASK[:COUNT]",
                   help=f"COUNT held-out problems (default {DEFAULT_RG_COUNT}) of a reasoning-gym task, the ones a "
                        "training source of that task keeps out of training; repeatable. Without --data or "
                        "--reasoning-gym a run is scored on its own held-out sets")
    p.add_argument("--prompt-field", default="prompt", help="the prompt column of --data files (default prompt)")
    p.add_argument("--answer-field", default="answer", help="the answer column of --data files (default answer)")
    p.add_argument("--n", type=int, default=16, help="samples per problem (default 16)")
    p.add_argument("--k", type=_ints, default=None, metavar="K[,K...]",
                   help="pass@k for each K, each <= n (default 1,N)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default 0.6, ProRL's)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95, ProRL's)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="response budget; a response reaching it is truncated (default: a run's eval budget, "
                        f"else the model's context left after the longest prompt, at most {MAX_TOKENS_CAP})")
    p.add_argument("--threshold", type=float, default=1.0,
                   help="a sample is correct (pass@k) when its reward is >= this (default 1.0)")
    p.add_argument("--engine", default=None, metavar="vllm|torch",
                   help="the rollout engine (default vllm where installed, else torch)")
    p.add_argument("--nproc", type=int, default=1, metavar="G",
                   help="split the problems over G processes, one GPU and engine each (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; a run's evaluation uses run.seed (default 0)")
    p.add_argument("--all-checkpoints", action="store_true", help="score every complete checkpoint of the run")
    p.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="system turn of every prompt (\"\" omits it; default: the run's data.system_prompt, "
                        "else the one the example configs use)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, metavar="P",
                   help=f"problems per engine call and per resume step (default {DEFAULT_CHUNK}); "
                        "the samples depend on it")
    p.add_argument("--reward-workers", type=int, default=0, metavar="W",
                   help="reward processes per engine process (default 0: score in the engine's process)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; an existing one is resumed)")
    return p


# ----------------------------------------------------------------------------- checks


def _check_numbers(args: argparse.Namespace) -> tuple[int, ...]:
    """The numeric options; returns the k values."""
    checks = [(args.n >= 1, "--n", f"expected >= 1 samples per problem, got {args.n}"),
              (args.temperature >= 0, "--temperature", f"expected >= 0 (0 = greedy), got {args.temperature}"),
              (0 < args.top_p <= 1, "--top-p", f"expected 0 < top_p <= 1, got {args.top_p}"),
              (args.max_tokens is None or args.max_tokens >= 1, "--max-tokens", f"expected >= 1, got {args.max_tokens}"),
              (args.nproc >= 1, "--nproc", f"expected >= 1 processes, got {args.nproc}"),
              (args.chunk >= 1, "--chunk", f"expected >= 1 problems per chunk, got {args.chunk}"),
              (args.reward_workers >= 0, "--reward-workers", f"expected >= 0, got {args.reward_workers}")]
    for ok, option, message in checks:
        if not ok:
            raise EvalInputError(f"{option}: {message}")
    ks = args.k or tuple(sorted({1, args.n}))
    if max(ks) > args.n:
        raise EvalInputError(f"--k: pass@{max(ks)} needs k <= n, got k={','.join(map(str, ks))} with --n {args.n}")
    return ks


def _engine(name: str | None) -> str:
    if name is None:
        return "vllm" if importlib.util.find_spec("vllm") is not None else "torch"
    if name not in ("vllm", "torch"):
        raise EvalInputError(f"--engine: expected vllm or torch, got {name!r}")
    try:
        check_engine(name)
    except ConfigError as e:
        raise EvalInputError(str(e).replace("rollout.engine", "--engine")) from None
    return name


def _step(ckpt: Path) -> int | None:
    state = ckpt / "trainer_state.json"
    return int(json.loads(state.read_text())["step"]) if state.is_file() else None


def _targets(args: argparse.Namespace):
    """(the target directory, the checkpoints to score, the run's config or None)."""
    path = Path(args.target).resolve()
    if not path.exists():
        raise EvalInputError(f"TARGET: {args.target!r} does not exist")
    run_dir = path if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file() and \
        not (path / "config.json").is_file() else None
    if run_dir is None:
        if args.all_checkpoints:
            raise EvalInputError(f"--all-checkpoints: {args.target!r} is not a run directory (no checkpoints/)")
        _check_model(path, "TARGET")
        run_cfg = _run_config(path.parent.parent) if (path / "trainer_state.json").is_file() else None
        return path, (Target(path, _step(path)),), run_cfg
    ckpts = list_checkpoints(run_dir) if args.all_checkpoints else [c for c in [latest_checkpoint(run_dir)] if c]
    if not ckpts:
        raise EvalInputError(f"TARGET: the run directory {args.target!r} holds no checkpoint "
                             "(expected checkpoints/step_NNNNNN/ with trainer_state.json)")
    for ckpt in ckpts:
        _check_model(ckpt, "TARGET")
    return run_dir, tuple(Target(c, _step(c)) for c in ckpts), _run_config(run_dir)


def _check_model(path: Path, option: str) -> None:
    try:
        check_model_path(str(path))
    except ConfigError as e:
        raise EvalInputError(str(e).replace("model.path", option)) from None


def _run_config(run_dir: Path):
    if not (run_dir / "config.yaml").is_file():
        return None
    try:
        return load_config(run_dir / "config.yaml")
    except ConfigError as e:
        raise EvalInputError(f"TARGET: {run_dir / 'config.yaml'}: {e}") from None


def _file_source(spec: str, args: argparse.Namespace) -> tuple[SourceConfig, list[Problem]]:
    path, reward = (spec, "") if Path(spec).is_file() else spec.partition(":")[::2]
    if not Path(path).is_file():
        raise ValueError(f"{path!r} is not a file (no such file)")
    kind = "parquet" if path.endswith(".parquet") else "jsonl"
    cfg = SourceConfig(kind=kind, path=path, reward=reward, prompt_field=args.prompt_field,
                       answer_field=args.answer_field, heldout_size=0)
    return cfg, read_file_problems(cfg)


def _rg_source(spec: str) -> tuple[SourceConfig, list[Problem]]:
    task, _, count = spec.partition(":")
    if count and (not count.isdigit() or int(count) < 1):
        raise ValueError(f"COUNT: expected a number >= 1, got {count!r}")
    cfg = SourceConfig(kind="reasoning_gym", name=task, heldout_size=int(count or DEFAULT_RG_COUNT))
    return cfg, ReasoningGymSource(cfg).heldout()


def _sources(args: argparse.Namespace, run_cfg) -> tuple[dict[str, list[Problem]], dict[str, str]]:
    """Each source's problems and a description of it, in the order given."""
    sources: dict[str, list[Problem]] = {}
    described: dict[str, str] = {}
    for option, specs, build in (("--data", args.data, lambda s: _file_source(s, args)),
                                 ("--reasoning-gym", args.reasoning_gym, _rg_source)):
        for spec in specs:
            try:
                cfg, problems = build(spec)
            except (ValueError, FileNotFoundError, RuntimeError) as e:
                raise EvalInputError(f"{option} {spec}: {e}") from None
            name = cfg.name if cfg.name not in sources else f"{cfg.name}_{len(sources)}"
            sources[name] = problems
            described[name] = f"{cfg.kind} {cfg.path or cfg.name} ({len(problems)} problems, reward {cfg.reward})"
    if sources:
        return sources, described
    if run_cfg is None:
        raise EvalInputError("--data / --reasoning-gym: no problems to score; give a file or a task "
                             "(a run directory without them is scored on its own held-out sets)")
    try:
        heldout = prepare_data(run_cfg).heldout
    except ConfigError as e:
        raise EvalInputError(f"TARGET: the run's data.sources: {e}") from None
    return heldout, {name: f"the run's held-out set ({len(ps)} problems)" for name, ps in heldout.items()}


def _context(args: argparse.Namespace, target: Target, sources: dict[str, list[Problem]], system_prompt: str,
             run_cfg) -> tuple[int, int]:
    """(max_tokens, max_model_len): the response budget and the engine's context, which the
    longest prompt plus the budget must fit within the model's (config.json)."""
    tokenizer = load_tokenizer(target.path)
    longest = max(len(format_prompt(tokenizer, p.prompt, system_prompt)) for ps in sources.values() for p in ps)
    config = json.loads((target.path / "config.json").read_text())
    context = config.get("max_position_embeddings") or longest + (args.max_tokens or MAX_TOKENS_CAP)
    max_tokens = args.max_tokens or (run_cfg.eval_max_tokens if run_cfg is not None else
                                     min(context - longest, MAX_TOKENS_CAP))
    if longest >= context:
        raise EvalInputError(f"the longest prompt ({longest} tokens, with the system prompt) leaves no room for a "
                             f"response in the model's context (max_position_embeddings={context}); shorten "
                             "--system-prompt or the prompts")
    if max_tokens < 1 or longest + max_tokens > context:
        raise EvalInputError(f"--max-tokens: the longest prompt ({longest} tokens) plus {max_tokens} response tokens "
                             f"exceed the model's context (max_position_embeddings={context}); lower --max-tokens")
    return max_tokens, longest + max_tokens


def resolve(args: argparse.Namespace) -> EvalSpec:
    """Every check of the command line, before any model is loaded; EvalInputError on bad input."""
    ks = _check_numbers(args)
    engine = _engine(args.engine)
    target, targets, run_cfg = _targets(args)
    sources, described = _sources(args, run_cfg)
    if not any(sources.values()):
        raise EvalInputError("--data / --reasoning-gym: the sources hold no problems")
    system_prompt = args.system_prompt if args.system_prompt is not None else \
        run_cfg.data.system_prompt if run_cfg is not None else SYSTEM_PROMPT
    max_tokens, max_model_len = _context(args, targets[0], sources, system_prompt, run_cfg)
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        raise EvalInputError(f"--out: {args.out!r} is a file, expected a folder")
    return EvalSpec(target=target, targets=targets, sources=sources, described=described, n=args.n, ks=ks,
                    temperature=args.temperature, top_p=args.top_p, max_tokens=max_tokens,
                    max_model_len=max_model_len, seed=args.seed, engine=engine, nproc=args.nproc, chunk=args.chunk,
                    threshold=args.threshold, system_prompt=system_prompt, reward_workers=args.reward_workers,
                    out=out, all_checkpoints=args.all_checkpoints)
