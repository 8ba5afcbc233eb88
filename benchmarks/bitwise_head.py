"""The LM head's batch-invariant mode: what it costs next to the default, and that its bits hold.

    python -m prolix.benchmarks.bitwise_head --shape small --tokens 2048 --threads 2 --out DIR
    python -m prolix.benchmarks.device_check --out DIR   # its "bitwise-head" section: the same on a GPU

Cost: the same inputs through `linear_logprobs` and `fused_linear_grpo_loss` (three-GEMM) with
`batch_invariant=False` and `True`, in the same process, interleaved call by call so that a
shared machine's load falls on both alike; per stage the median milliseconds of each mode and
their ratio (invariant / default):

    logprobs fwd      linear_logprobs under no_grad (what the old- and reference-log-prob passes run)
    logprobs fwdbwd   linear_logprobs + backward
    fused fwdbwd      fused_linear_grpo_loss + backward (the training step's head)

Bits: a pool of rows computed in one batch is the reference; batches of N rows drawn from it
(N sweeping 1, T − 1, T, T + 1, 3T + 5 and, on a GPU, one row tile past the SM count: more
tiles than a persistent grid has programs), shuffled, behind ignored rows, must give every row
the reference's bits in the batch-invariant mode; the default mode's differing rows are
counted beside it (it promises nothing). The fused loss's log-probs at two chunk sizes, and its
gradients run twice, are compared the same way. T is the row block (torch: `INVARIANT_ROWS`;
Triton: the GEMM tile's rows). CPU uses the torch backend; CUDA the Triton kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from . import cases as C
from . import harness

STAGES = ("logprobs fwd", "logprobs fwdbwd", "fused fwdbwd")
TARGETS = {"cuda": 1.10, "cpu": 1.25}   # the invariant mode's cost ceiling for the head, as a ratio


def row_block(device: torch.device, dtype: torch.dtype) -> int:
    from prolix.kernels import three_gemm
    from prolix.kernels._common import INVARIANT_ROWS, sm_version

    if device.type != "cuda":
        return INVARIANT_ROWS
    return three_gemm.gemm1_config(dtype, sm_version(device), True, batch_invariant=True).block_n


def sweep(device: torch.device, dtype: torch.dtype) -> list[int]:
    """The N of the bit check: both sides of a row block, and past the GPU's SM count in tiles."""
    T = row_block(device, dtype)
    ns = [1, T - 1, T, T + 1, 3 * T + 5]
    if device.type == "cuda":
        ns.append(torch.cuda.get_device_properties(device).multi_processor_count * T + 77)
    return ns


def _stage_fns(inp, invariant: bool):
    """The three stages of one mode on the case's inputs, each a zero-argument callable."""
    from prolix.kernels import fused_linear_grpo_loss, linear_logprobs

    from .providers import bench_config

    h, w, y = inp.hidden, inp.weight, inp.targets

    def fwd():
        with torch.no_grad():
            return linear_logprobs(h, w, y, ignore_index=C.IGNORE_INDEX, batch_invariant=invariant)

    def logprobs_fwdbwd():
        linear_logprobs(h, w, y, ignore_index=C.IGNORE_INDEX, batch_invariant=invariant).sum().backward()

    def fused_fwdbwd():
        loss, _ = fused_linear_grpo_loss(h, w, y, inp.advantages, inp.mask, old_logp=inp.old_logp,
                                         ref_logp=inp.ref_logp, cu_seqlens=inp.cu_seqlens, config=bench_config(),
                                         ignore_index=C.IGNORE_INDEX, batch_invariant=invariant)
        loss.backward()

    return dict(zip(STAGES, (fwd, logprobs_fwdbwd, fused_fwdbwd)))


def _interleaved_ms(fns: dict, leaves, device: torch.device, repeats: int) -> dict:
    """Median ms per mode: on CUDA triton's do_bench per mode; on CPU one call of each mode in
    turn per repeat (after one warm-up each), so both see the same machine load."""
    if device.type == "cuda":
        return {k: harness.time_fn(fn, device, grad_to_none=leaves)[0] for k, fn in fns.items()}
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            for t in leaves:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def measure_cost(shape: C.Shape, N: int, dtype: torch.dtype, device: torch.device, repeats: int) -> list[dict]:
    """One row per stage: default and invariant median ms and their ratio."""
    inp = C.make_inputs(shape, N, dtype, device, seed=0)
    default, invariant = _stage_fns(inp, False), _stage_fns(inp, True)
    rows = []
    for stage in STAGES:
        ms = _interleaved_ms({"default": default[stage], "invariant": invariant[stage]},
                             (inp.hidden, inp.weight), device, repeats)
        rows.append({"stage": stage, "shape": shape.name, "N": N, "dtype": harness.dtype_name(dtype),
                     "default_ms": ms["default"], "invariant_ms": ms["invariant"],
                     "ratio": ms["invariant"] / ms["default"]})
        harness.free_memory(device)
    return rows


# ----------------------------------------------------------------------------- bits


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _batch(n: int, n_pool: int, g: torch.Generator, device: torch.device):
    """Pool indices of a batch of n rows (random order) behind 0–6 ignored rows, with an ignored
    row after every third, and the ignored flags; n = 1 is one row alone."""
    rows = torch.randperm(n_pool, generator=g)[:n].tolist()
    lead = int(torch.randint(0, 7, (), generator=g)) if n > 1 else 0
    filler = torch.randint(0, n_pool, (lead + n // 3 + 1,), generator=g).tolist()
    order, ignored = filler[:lead], [True] * lead
    for k, r in enumerate(rows):
        order.append(r)
        ignored.append(False)
        if k % 3 == 2:
            order.append(filler[lead + k // 3])
            ignored.append(True)
    return torch.tensor(order, device=device), torch.tensor(ignored, device=device)


def check_bits(shape: C.Shape, dtype: torch.dtype, device: torch.device) -> dict:
    """Rows whose logp or entropy bits differ from the pool's, per N and mode; the fused loss's
    log-probs at two chunk sizes; gradients of two identical runs."""
    from prolix.kernels import linear_logprobs

    ns = sweep(device, dtype)
    n_pool = ns[-1] + 9
    inp = C.make_inputs(shape, n_pool, dtype, device, seed=1)
    h, w, y = inp.hidden.detach(), inp.weight.detach(), inp.safe_targets
    g = torch.Generator().manual_seed(2)
    out = {"N": ns, "row_block": row_block(device, dtype), "default": [], "invariant": []}
    with torch.no_grad():
        for mode, invariant in (("default", False), ("invariant", True)):
            ref = linear_logprobs(h, w, y, return_entropy=True, batch_invariant=invariant)
            for n in ns:
                order, ignored = _batch(n, n_pool, g, device)
                yb = torch.where(ignored, C.IGNORE_INDEX, y[order])
                got = linear_logprobs(h[order], w, yb, return_entropy=True, ignore_index=C.IGNORE_INDEX,
                                      batch_invariant=invariant)
                bad = torch.zeros_like(ignored)
                for a, b in zip(got, ref):
                    bad |= (_bits(a) != _bits(b[order])) & ~ignored
                out[mode].append(int(bad.sum()))
        # `ref` is the invariant mode's pool now
        out["fused_logp_mismatches"] = _fused_logp_mismatches(h, w, y, ref[0], device)
    out["gradient_mismatches"] = _gradient_mismatches(inp)
    out["ok"] = not any(out["invariant"]) and out["fused_logp_mismatches"] == 0 and out["gradient_mismatches"] == 0
    return out


def _fused_logp_mismatches(h, w, y, ref_logp, device) -> int:
    """Rows where the three-GEMM pass (chunks of 1000 rows, then of the default size) does not
    give linear_logprobs' bits."""
    from prolix.kernels import three_gemm

    backend = "triton" if device.type == "cuda" else "torch"
    rows = torch.arange(h.shape[0], device=device)
    bad = 0
    for chunk in (1000, None):
        logp, _, _, _ = three_gemm.three_gemm_logprob_grads(
            h, w, y, rows, None, inv_temp=1.0, with_entropy=True, need_dh=False, need_dw=False,
            backend=backend, chunk_rows=chunk, batch_invariant=True)
        bad += int((_bits(logp) != _bits(ref_logp)).sum())
    return bad


def _gradient_mismatches(inp) -> int:
    """Elements of the loss, dh and dW that differ between two identical invariant runs."""
    from prolix.kernels import fused_linear_grpo_loss

    from .providers import bench_config

    runs = []
    for _ in range(2):
        h, w = inp.hidden.detach().clone().requires_grad_(), inp.weight.detach().clone().requires_grad_()
        loss, _ = fused_linear_grpo_loss(h, w, inp.targets, inp.advantages, inp.mask, old_logp=inp.old_logp,
                                         ref_logp=inp.ref_logp, cu_seqlens=inp.cu_seqlens, config=bench_config(),
                                         ignore_index=C.IGNORE_INDEX, batch_invariant=True)
        runs.append([loss.detach().float().reshape(1), *(t.float() for t in torch.autograd.grad(loss, (h, w)))])
    return sum(int((_bits(a) != _bits(b)).sum()) for a, b in zip(*runs))


# ----------------------------------------------------------------------------- device check section


def run_section(ck, budget: float) -> dict:
    """The device check's "bitwise-head" section: the bit check and the cost at the first head
    shape of the run (qwen-1.5b, N = 16384 on a GPU; tiny, N = 512 with --quick); fills
    `ck.results["bitwise_head"]`."""
    shape = C.SHAPES[ck.plan.shapes[0]]
    N = ck.plan.fused_tokens[-1] if ck.quick else ck.plan.ll_tokens[0]
    end = time.monotonic() + budget
    rec = ck.results.setdefault("bitwise_head", {"shape": shape.name, "target_ratio": TARGETS[ck.device.type]})
    rec["bits"] = check_bits(shape, ck.dtype, ck.device)   # first: it also compiles the mode's kernels
    ck.save()
    if time.monotonic() < end:
        rec["cost"] = measure_cost(shape, N, ck.dtype, ck.device, repeats=3 if ck.quick else 10)
    else:
        rec["cost"] = []
        rec["cost_skipped"] = f"the bitwise-head section's {budget:.0f} s budget ran out in the bit check"
    ck.save()
    if not rec["bits"]["ok"]:
        return {"status": "error", "reason": f"bits differ in the batch-invariant mode: {rec['bits']}"[:500]}
    return {"status": "ok", "reason": None}


def markdown_lines(rec: dict | None) -> list[str]:
    """The device check report's "Batch-invariant head" part (nothing when the section did not run)."""
    if not rec or "bits" not in rec:
        return []
    b = rec["bits"]
    lines = ["## Batch-invariant head", "",
             f"Rows whose log-prob or entropy bits differ from their bits in one batch of the pool, per N "
             f"(row block T = {b['row_block']}): **{'all equal' if b['ok'] else 'DIFFERENT'}** in the mode.", "",
             "| N | batch_invariant=True | default |", "|---:|---:|---:|"]
    lines += [f"| {n} | {i} | {d} |" for n, i, d in zip(b["N"], b["invariant"], b["default"])]
    lines += ["", f"Fused loss log-probs vs `linear_logprobs`: {b['fused_logp_mismatches']} rows differ; "
              f"gradients of two identical runs: {b['gradient_mismatches']} elements differ.", ""]
    if rec.get("cost"):
        lines += [f"Cost (target ≤ {rec['target_ratio']}× for the head):", "",
                  "| stage | shape | N | default ms | invariant ms | ratio |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {c['stage']} | {c['shape']} | {c['N']} | {c['default_ms']:.3g} | {c['invariant_ms']:.3g} | "
                  f"{c['ratio']:.3f} |" for c in rec["cost"]]
    elif rec.get("cost_skipped"):
        lines.append(f"Cost: not measured ({rec['cost_skipped']}).")
    return lines + [""]


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="small", choices=sorted(C.SHAPES))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dtype", default="fp32", choices=sorted(harness.DTYPES))
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-bits", action="store_true", help="time only")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON")
    args = p.parse_args(argv)
    device, dtype, shape = harness.pick_device(), harness.DTYPES[args.dtype], C.SHAPES[args.shape]
    torch.set_num_threads(args.threads)
    created, stamp = harness.timestamp()
    result = {"created": created, "commit": harness.git_commit(), "device": harness.device_name(device),
              "threads": torch.get_num_threads(), "versions": harness.versions(),
              "command": "python -m prolix.benchmarks.bitwise_head " + " ".join(argv or sys.argv[1:]),
              "target_ratio": TARGETS[device.type], "load_average_before": os.getloadavg()}
    if not args.no_bits:
        result["bits"] = check_bits(shape, dtype, device)
        print(f"bits: {result['bits']}")
    result["cost"] = measure_cost(shape, args.tokens, dtype, device, args.repeats)
    result["load_average_after"] = os.getloadavg()   # a shared machine's load says how to read the times
    print("| stage | shape | N | default ms | batch_invariant ms | ratio |\n|---|---|---|---|---|---|")
    for r in result["cost"]:
        print(f"| {r['stage']} | {r['shape']} | {r['N']} | {r['default_ms']:.1f} | {r['invariant_ms']:.1f} | "
              f"{r['ratio']:.3f} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"bitwise-head-{stamp}-{harness.device_slug(device)}-{result['commit']}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    return 0 if result.get("bits", {}).get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
