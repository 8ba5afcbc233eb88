"""The fused GRPO loss on CPU against Liger's chunked-torch loss, forward + backward.

    python -m prolix.benchmarks.cpu_fused_grpo --threads 2 --repeats 3 --out /tmp/cpu-grpo

One packed micro-batch (benchmarks/cases.py `make_inputs`: fp32, N = 4096 tokens, H = 256,
V = 151936, the first 1/8 of each sequence a masked prompt), the benchmark's GRPO objective
(`providers.bench_config`: DAPO clip-higher, k3 KL, token-mean) and these providers:

    prolix          fused_linear_grpo_loss (three GEMMs, torch backend)
    prolix-4gemm    the same with algorithm="four_gemm" (linear_logprobs + grpo_loss autograd)
    liger           LigerFusedLinearGRPOLoss(compiled=False, loss_type="dapo"), as providers.py

Each provider runs in its own fresh process, so that one's allocations do not shape another's
memory: one warm-up call, then `--repeats` timed forward+backward calls (wall clock; the
median is reported with the min and max). Peak memory is the process's peak resident set
(VmHWM) during the warm-up and timed calls minus its resident set just before them: the kernel writes 5 to
/proc/self/clear_refs to reset VmHWM. torch's CPU allocator returns large blocks to the OS on
free (mmap), so RSS follows the tensors; tracemalloc would not see them at all. Gradients are
dropped before each call, so every peak includes the freshly allocated dH and dW.
CPU numbers say how the CPU backend compares with Liger's on the same machine; they are never
GPU performance. The machine may be shared: run it a few times and read the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROVIDER_NAMES = ("prolix", "prolix-4gemm", "liger")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _build(provider: str, inp, config):
    from prolix.kernels import fused_linear_grpo_loss

    from .cases import IGNORE_INDEX
    from .providers import Context, liger_grpo

    if provider == "liger":
        import torch

        return liger_grpo(inp, Context(torch.device("cpu"), config, quick=False))
    algorithm = "four_gemm" if provider == "prolix-4gemm" else "three_gemm"
    return lambda: fused_linear_grpo_loss(
        inp.hidden, inp.weight, inp.targets, inp.advantages, inp.mask, old_logp=inp.old_logp,
        ref_logp=inp.ref_logp, cu_seqlens=inp.cu_seqlens, config=config, ignore_index=IGNORE_INDEX,
        backend="torch", algorithm=algorithm)[0]


def child(args: argparse.Namespace) -> dict:
    """Time one provider in this process; returns its result row."""
    import torch

    from .cases import Shape, make_inputs
    from .providers import bench_config

    torch.set_num_threads(args.threads)
    shape = Shape("cpu-grpo", args.hidden, args.vocab, "the CPU case")
    inp = make_inputs(shape, args.tokens, torch.float32, torch.device("cpu"), seed=0)
    fwd = _build(args.child, inp, bench_config())

    def step() -> float:
        inp.hidden.grad = inp.weight.grad = None
        loss = fwd()
        loss.backward()
        return loss.item()

    base = _rss_kb("VmRSS")   # inputs built, nothing else yet
    Path("/proc/self/clear_refs").write_text("5")
    loss = step()   # warm-up (its peak counts too: the first call allocates what later ones reuse)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _rss_kb("VmHWM")
    return dict(provider=args.child, N=args.tokens, H=args.hidden, V=args.vocab, threads=args.threads,
                s_median=statistics.median(times), s_min=min(times), s_max=max(times),
                peak_gb=(peak - base) * 1024 / 1e9, loss=loss,
                grad_norms=[inp.hidden.grad.norm().item(), inp.weight.grad.norm().item()])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--providers", default=",".join(PROVIDER_NAMES))
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON results")
    p.add_argument("--child", choices=PROVIDER_NAMES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    providers = args.providers.split(",")
    bad = [x for x in providers if x not in PROVIDER_NAMES]
    if bad:
        p.error(f"--providers: unknown {bad}; known: {list(PROVIDER_NAMES)}")
    rows = []
    common = [f"--tokens={args.tokens}", f"--hidden={args.hidden}", f"--vocab={args.vocab}",
              f"--threads={args.threads}", f"--repeats={args.repeats}"]
    for name in providers:
        proc = subprocess.run([sys.executable, "-m", "prolix.benchmarks.cpu_fused_grpo", *common,
                               f"--child={name}"], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print("| provider | fwd+bwd s (median) | min | max | peak GB | loss |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['provider']} | {r['s_median']:.2f} | {r['s_min']:.2f} | {r['s_max']:.2f} | "
              f"{r['peak_gb']:.2f} | {r['loss']:.6f} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"cpu-fused-grpo-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(rows, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
