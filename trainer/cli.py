"""The `prolix` command.

    prolix bench linear-logprobs --shape qwen-1.5b,llama-8b --tokens 4096,16384
    prolix bench grpo-loss --tokens 16384,65536
    prolix bench fused-grpo --baselines eager,liger --modes fwdbwd --profile
    prolix bench train --shape qwen-0.5b,qwen-1.5b  # the trainer's packed forward+backward step
    prolix bench all --quick --out /tmp/bench      # every kernel and the step, CPU-sized, any device
    prolix bench render RESULTS.json [--out DIR]    # re-draw the table and plot from a JSON
    prolix bench sandbox [--runs 50] [--out DIR]    # ms per run_python and runs/s, each sandbox launcher
    prolix bench rl-overlap [--steps 10] [--passes 2] [--out DIR]   # split placement vs the synchronous loop (CPU)
    prolix bench reward-pool [--workers 0,1,2] [--reps 5] [--quick] [--out DIR]   # scored responses/s
    prolix bench bitwise-step [--steps 6] [--passes 2] [--quick] [--out DIR]   # batch_invariant's step cost (CPU)
    prolix check-bitwise MODEL [--prompt TEXT ...] [--samples 4] [--max-tokens 32]   # alone vs packed, rollout vs trainer
    prolix train [--config X.yaml] [--resume DIR] [--nproc G] [key=value ...]   # see prolix.trainer.train
    torchrun --nproc-per-node=G -m prolix.trainer.cli train ...     # data parallel (trainer/parallel/)
    prolix eval TARGET [--data FILE[:REWARD]]... [--reasoning-gym TASK[:COUNT]]... --out DIR   # see prolix.trainer.eval

Everything heavy (torch, the kernels, the trainer, the benchmark suite) is imported inside the
handler, so `prolix --help` is instant and needs no trainer dependency.
"""

from __future__ import annotations

import argparse
import shlex
import sys

KERNEL_COMMANDS = {
    "linear-logprobs": ("linear-logprobs",),
    "grpo-loss": ("grpo-loss",),
    "fused-grpo": ("fused-grpo",),
    "train": ("train",),
    "all": ("linear-logprobs", "grpo-loss", "fused-grpo", "train"),
}
# Kept in step with prolix.benchmarks.cases / providers / train_step (not imported here: --help stays light).
SHAPE_NAMES = ("LM heads qwen-1.5b, qwen-7b, llama-8b (GPU), tiny, small (CPU smoke); "
               "models for train: qwen-0.5b, qwen-1.5b (GPU), tiny (CPU smoke)")
BASELINES = ("eager", "compile", "liger", "cce", "trl")


def _csv(kind: type):
    """An argparse `type` for a comma-separated list of `kind` (int, str): a value that does not
    parse is argparse's usage error (exit 2) naming the option's expected form and the text."""
    def parse(text: str) -> tuple:
        items = [x.strip() for x in text.split(",") if x.strip()]
        try:
            return tuple(kind(x) for x in items)
        except ValueError:
            bad = next(x for x in items if not _parses(kind, x))
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__}s, got {text!r} ({bad!r} is not an {kind.__name__})") from None
    parse.__name__ = f"comma-separated {kind.__name__}s"      # argparse names the type in its messages
    return parse


def _parses(kind: type, text: str) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def _sweep_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--shape", type=_csv(str), default=None,
                   help=f"shapes, comma-separated: {SHAPE_NAMES}. "
                        "Default qwen-1.5b,llama-8b (train: qwen-0.5b,qwen-1.5b); tiny with --quick")
    p.add_argument("--tokens", type=_csv(int), default=None,
                   help="packed tokens N, comma-separated. Default 4096,16384; 128,512 with --quick")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="input dtype (default bf16)")
    p.add_argument("--baselines", type=_csv(str), default=BASELINES,
                   help=f"baselines to run next to prolix: {','.join(BASELINES)} (default all)")
    p.add_argument("--modes", type=_csv(str), default=("fwd", "bwd", "fwdbwd"),
                   help="fwd, bwd, fwdbwd (default all three)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes and few reps: the smoke run of CI, on any device")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/)")
    p.add_argument("--profile", action="store_true",
                   help="also write a torch.profiler trace (Chrome JSON) per case and a per-kernel table")
    p.add_argument("--check", choices=("fp64", "prolix", "none"), default="fp64",
                   help="check every provider before timing it against the streamed float64 reference "
                        "(default), against prolix in the same dtype, or not at all")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence in the packed batch (default min(N, 4096))")
    p.add_argument("--seed", type=int, default=0)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prolix", description="prolix: fused GRPO kernels and trainer")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = commands.add_parser("bench", help="benchmark the kernels against their baselines",
                                description="Benchmark prolix's kernels against the baselines of "
                                            "benchmarks/; writes JSON, a markdown table and a PNG.")
    what = bench.add_subparsers(dest="what", required=True, metavar="KERNEL")
    sweep = _sweep_options()
    helps = {"linear-logprobs": "fused LM head + log-prob gather", "grpo-loss": "GRPO loss on [N] log-probs",
             "fused-grpo": "fused linear log-prob + GRPO loss",
             "train": "the trainer's packed forward+backward step (a Qwen2 model, each LM head)",
             "all": "every kernel, the trainer step (and packing efficiency)"}
    for name, text in helps.items():
        what.add_parser(name, parents=[sweep], help=text, description=text)
    commands.add_parser("train", help="GRPO for prolonged RL (the ProRL recipe); no arguments: the demo",
                        add_help=False)   # its own parser (prolix.trainer.train) handles the rest
    commands.add_parser("eval", help="pass@k of a model or of a run's checkpoints on benchmark files and "
                                     "reasoning-gym tasks", add_help=False)   # prolix.trainer.eval.options
    box = what.add_parser("sandbox", help="the code reward's sandbox: ms per run_python and runs/s, each launcher")
    box.add_argument("--runs", type=int, default=50, help="runs per launcher and per concurrency (default 50)")
    box.add_argument("--out", default=None, help="results folder (default benchmarks/results/)")
    overlap = what.add_parser("rl-overlap", help="the split placement's step time against the synchronous loop "
                                                 "(CPU processes)")
    overlap.add_argument("--steps", type=int, default=10, help="steps per run, the first 2 not counted (default 10)")
    overlap.add_argument("--passes", type=int, default=2, help="rounds of the three runs, taking turns (default 2)")
    overlap.add_argument("--calibrations", type=int, default=3,
                         help="colocated runs at most that balance generation and training first (default 3)")
    overlap.add_argument("--quick", action="store_true", help="a smaller workload (fewer prompts, shorter responses)")
    overlap.add_argument("--out", default=None, help="results folder (default benchmarks/results/)")
    pool = what.add_parser("reward-pool", help="the reward pool: scored responses/s for math-verify and code tests",
                           description="Scored responses per second of RewardPool for math-verify and for "
                                       "sandboxed code tests, per number of worker processes (CPU numbers).")
    pool.add_argument("--workers", type=_csv(int), default=(0, 1, 2),
                      help="worker counts, comma-separated; 0 = in this process (default 0,1,2)")
    pool.add_argument("--reps", type=int, default=None, help="timed passes per row (default 5; 1 with --quick)")
    pool.add_argument("--quick", action="store_true", help="a few responses: the smoke run of CI")
    pool.add_argument("--out", default=None, help="results folder (default benchmarks/results/)")
    bitwise = what.add_parser("bitwise-step", help="a trainer step with algorithm.batch_invariant against without "
                                                    "(CPU, one thread)")
    bitwise.add_argument("--steps", type=int, default=6, help="steps per run, the first 2 not counted (default 6)")
    bitwise.add_argument("--passes", type=int, default=2, help="rounds of the two runs, taking turns (default 2)")
    bitwise.add_argument("--quick", action="store_true", help="a smaller workload (fewer prompts, shorter responses)")
    bitwise.add_argument("--out", default=None, help="results folder (default benchmarks/results/)")
    check = commands.add_parser("check-bitwise", help="how far your model's log-probs move with the batch, "
                                                      "with and without algorithm.batch_invariant")
    check.add_argument("model", help="a local Hugging Face model directory (weights and tokenizer)")
    check.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; default: three)")
    check.add_argument("--samples", type=int, default=4, help="responses per prompt (default 4)")
    check.add_argument("--max-tokens", type=int, default=32, help="tokens per response at most (default 32)")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    render = what.add_parser("render", help="re-render the .md and .png of a results JSON")
    render.add_argument("results", help="a results .json written by prolix bench")
    render.add_argument("--out", default=None, help="folder for the .md/.png (default: beside the JSON)")
    return parser


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    from pathlib import Path

    if args.what == "render":
        from prolix.benchmarks.render import render_file

        md, png = render_file(Path(args.results), Path(args.out) if args.out else None)
        print(f"wrote {md} and {png}")
        return 0
    if args.what == "sandbox":
        from prolix.benchmarks.sandbox import main_run

        try:
            return main_run(args.runs, Path(args.out) if args.out else None)
        except ValueError as e:
            print(f"prolix bench sandbox: {e}", file=sys.stderr)
            return 2
    if args.what == "rl-overlap":
        from prolix.benchmarks.rl_overlap import main_run as overlap_run

        try:
            return overlap_run(args.steps, Path(args.out) if args.out else None, args.quick, args.passes,
                               args.calibrations)
        except ValueError as e:
            print(f"prolix bench rl-overlap: {e}", file=sys.stderr)
            return 2
    if args.what == "bitwise-step":
        from prolix.benchmarks.bitwise_step import main_run as bitwise_run

        try:
            return bitwise_run(args.steps, Path(args.out) if args.out else None, args.quick, args.passes)
        except ValueError as e:
            print(f"prolix bench bitwise-step: {e}", file=sys.stderr)
            return 2
    if args.what == "reward-pool":
        from prolix.benchmarks.reward_pool import main_run as reward_pool_run

        try:
            return reward_pool_run(args.workers, args.reps, args.quick, Path(args.out) if args.out else None)
        except ValueError as e:
            print(f"prolix bench reward-pool: {e}", file=sys.stderr)
            return 2
    from prolix.benchmarks import cases, runner

    spec = runner.Spec(
        kernels=KERNEL_COMMANDS[args.what],
        shapes=args.shape or runner.default_shapes(KERNEL_COMMANDS[args.what], args.quick),
        tokens=args.tokens or (cases.QUICK_TOKENS if args.quick else cases.DEFAULT_TOKENS),
        dtype=args.dtype, baselines=args.baselines, modes=args.modes, quick=args.quick,
        out=Path(args.out) if args.out else runner.DEFAULT_OUT, profile=args.profile,
        check=args.check, seq_len=args.seq_len, seed=args.seed,
        command=shlex.join(["prolix", *argv]),
    )
    try:
        return runner.main_run(spec, with_packing=args.what == "all")
    except runner.SpecError as e:
        print(f"prolix bench: {e}", file=sys.stderr)
        return 2


def _check_bitwise(args: argparse.Namespace) -> int:
    from prolix.trainer.bitwise_check import DEFAULT_PROMPTS, check_bitwise, format_report
    from prolix.trainer.model import load_policy
    from prolix.trainer.tokenizer import format_prompt, load_tokenizer

    try:
        model = load_policy(args.model, device=args.device, liger=False)
    except (FileNotFoundError, NotADirectoryError) as e:
        print(f"prolix check-bitwise: {e}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.model)
    prompts = [format_prompt(tokenizer, p, None) for p in (args.prompt or DEFAULT_PROMPTS)]
    print(format_report(check_bitwise(model, tokenizer, prompts, samples=args.samples, max_tokens=args.max_tokens)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from prolix.trainer.train import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["eval"]:
        from prolix.trainer.eval.command import main as eval_main

        return eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return _bench(args, argv)
    if args.command == "check-bitwise":
        return _check_bitwise(args)
    return 2  # unreachable: argparse requires a known command


if __name__ == "__main__":
    sys.exit(main())
