"""`prolix eval`: score a model, a run's latest checkpoint or every checkpoint of a run the way
ProRL reports, pass@k over n samples per problem.

    prolix eval /models/R1-Distill-Qwen-1.5B --data aime24.jsonl --data gpqa.jsonl:exact --out eval/base
    prolix eval runs/NAME --all-checkpoints --data aime24.jsonl --reasoning-gym chain_sum:64 --out eval/NAME
    prolix eval runs/NAME --n 4 --k 1,4 --out eval/NAME-heldout   # the run's own held-out sets
    prolix eval runs/NAME --data aime24.jsonl --nproc 8 --out eval/NAME   # 8 GPUs, one engine each

Each problem gets n samples (default 16, temperature 0.6, top-p 0.95: ProRL's evaluation) with
the system prompt and chat template of training; rewards are the trainer's (`rewards/`); pass@k
is the unbiased estimator. OUT gets summary.json, summary.md, samples.jsonl and, with
--all-checkpoints, pass_at_k.png; the same command resumes an interrupted evaluation.

Exit status: 0 on success; 2 on bad input, one line, before any model is loaded (a missing file
or field, an unknown reward, task or engine, k > n, a run directory without a checkpoint, an OUT
holding an evaluation with other options); 130 when interrupted (what was scored is kept); 1
when an engine process of --nproc failed.
"""

from __future__ import annotations

import sys

from .options import EvalInputError, build_parser, resolve
from .runner import EvalWorkerError, run

__all__ = ["main"]


def _fail(message: str, status: int = 2) -> int:
    print(f"prolix eval: error: {message}", file=sys.stderr, flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        spec = resolve(args)
        summary = run(spec)
    except EvalInputError as e:
        return _fail(str(e))
    except EvalWorkerError as e:
        return _fail(str(e), 1)
    except KeyboardInterrupt:
        return _fail(f"interrupted; the chunks scored so far are kept in {args.out}: run the same command to resume",
                     130)
    for ckpt in summary["checkpoints"]:
        for name, m in ckpt["sources"].items():
            scores = ", ".join(f"pass@{k} {m[f'pass@{k}']:.3f}" for k in summary["k"])
            step = "" if ckpt["step"] is None else f"step {ckpt['step']}: "
            print(f"{step}{name}: {scores} ({m['problems']} problems, mean length {m['response_len']:.0f})")
    print(f"wrote {spec.out}/summary.json, summary.md, samples.jsonl")
    return 0
