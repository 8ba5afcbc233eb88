"""The kernels' GPU measurements in one run: `python -m prolix.benchmarks.device_check --out DIR`.

Every number the targets of `device_report.py` read, in one process that fits a short GPU lease (≤ 8 min
on one H100/H200 by default), writing `DIR/device-check-<date>-<device>-<commit>.json` after
every section (nothing measured is lost if the run is cut short) and, from that JSON alone,
a `.md` report with a PASS/FAIL line per target and a `.png` plot (`device_report.py`):

| section         | what                                                                           |
|-----------------|--------------------------------------------------------------------------------|
| tests           | `pytest -m gpu` on the test files that have GPU tests, then the kernel test    |
|                 | files (the Triton kernels compiled for the GPU, against the fp64 references)   |
| gemm            | one cuBLAS bf16 GEMM [N, H]×[H, V] per shape and N: the unit of every ratio   |
| linear-logprobs | qwen-1.5b and llama-8b, N = 16384, fwd / bwd / fwdbwd, prolix and baselines    |
| fused-grpo      | the same at N = 16384 and 65536 (`fused_linear_grpo_loss`, whatever it runs)   |
| bitwise-head    | the batch-invariant mode: bits across N, order, neighbours, chunks; its cost   |
|                 | as a ratio to the default mode (`bitwise_head.py`)                             |
| configs         | `linear_logprobs` under each `PROLIX_LLP_CONFIG` ("v2" default, "v2-narrow",   |
|                 | "v1"): no-grad forward, backward, fwd+bwd                                      |
| breakdown       | `breakdown.stages` at qwen-1.5b, N = 16384                                     |
| train           | `prolix bench train` at qwen-1.5b, N = 16384                                  |

Baselines (eager, torch.compile, Liger's two forms, CCE, TRL's chunked head) run when
installed and are `skipped` with the reason otherwise; an out-of-memory baseline is an `OOM`
row. Each section has a time budget (seconds, `SECTIONS`); a section or kernel point that
would start after its budget is spent is recorded as skipped with that reason, and the
torch.compile baseline (whose compilation is the slowest thing here) is dropped first.

`--quick` runs every section at CPU-sized shapes in seconds (the CPU test in
tests/test_benchmarks.py); its numbers are a smoke, never performance.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import bitwise_head, harness
from . import cases as C
from .providers import BASELINES, PROVIDERS, Context, bench_config, no_donated_buffers

SCHEMA = "prolix-device-check/1"
REPO = Path(__file__).resolve().parent.parent
FULL_BUDGET_S = 485.0   # about 8 minutes of sections on an H100/H200


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    budget_s: float   # full run; --quick gets QUICK_BUDGET_S each
    cuda_only: str = ""  # non-empty: the reason it is skipped without CUDA


QUICK_BUDGET_S = 60.0
SECTIONS = (
    Section("tests", 90.0),
    Section("gemm", 15.0),
    Section("linear-logprobs", 80.0),
    Section("fused-grpo", 110.0),
    Section("bitwise-head", 35.0),
    Section("configs", 45.0),
    Section("breakdown", 30.0, "breakdown.stages times cuBLAS and the Triton kernels on a GPU"),
    Section("train", 70.0),
)
# Where the compile baseline is dropped: less than this left in a kernel section.
COMPILE_RESERVE_S = 45.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """The shapes and token counts of a run (full: the reference shapes; quick: CPU-sized)."""

    shapes: tuple[str, ...]
    ll_tokens: tuple[int, ...]
    fused_tokens: tuple[int, ...]
    train_shape: str
    train_tokens: int
    baselines: tuple[str, ...]

    @classmethod
    def make(cls, quick: bool) -> "Plan":
        if quick:
            return cls(("tiny",), (128,), (128, 512), "tiny", 256, ("eager",))
        return cls(("qwen-1.5b", "llama-8b"), (16384,), (16384, 65536), "qwen-1.5b", 16384, BASELINES)


class Check:
    """The run's state: the results dict (saved after every step), the clock and the budgets."""

    def __init__(self, out: Path, quick: bool, budget_s: float, command: str):
        self.quick, self.out = quick, out
        self.device = harness.pick_device()
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.plan = Plan.make(quick)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        created, stamp = harness.timestamp()
        commit = harness.git_commit()
        self.stem = out / f"device-check-{stamp}-{harness.device_slug(self.device)}-{commit}"
        self.results = {
            "schema": SCHEMA, "created": created, "command": command, "commit": commit,
            "device": {"name": harness.device_name(self.device), "type": self.device.type},
            "versions": harness.versions(), "quick": quick, "budget_s": budget_s,
            "dtype": harness.dtype_name(self.dtype), "plan": dataclasses.asdict(self.plan),
            "ceilings": None, "sections": {},
            "tests": [], "gemm": [], "cases": [], "configs": [], "breakdown": [], "targets": [],
            "elapsed_s": 0.0,
        }

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> Path:
        """Write the JSON (atomically: a run cut short leaves the last complete one) and the .md."""
        from .device_report import evaluate_targets, write_markdown

        # Evaluated at every save, so a run cut short still reads off what it measured.
        self.results["targets"] = evaluate_targets(self.results)
        self.results["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.stem.with_suffix(".json")
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        tmp.replace(path)
        write_markdown(self.results, self.stem.with_suffix(".md"))
        return path


# ----------------------------------------------------------------------------- sections


def run_tests(ck: Check, budget: float) -> dict:
    """pytest -m gpu on the files that have GPU tests, then the kernel test files (all tests:
    on a GPU they compile the Triton kernels; on CPU they run under the interpreter, so --quick
    leaves them to the CPU suite)."""
    tests = REPO / "tests"
    if not tests.is_dir():
        return {"status": "skipped", "reason": f"no tests folder at {tests}"}
    gpu_files = sorted(str(p) for p in tests.glob("test_*.py")
                       if re.search(r"requires_cuda|mark\.gpu", p.read_text(encoding="utf-8")))
    if ck.quick:
        gpu_files = [str(tests / "test_linear_logprobs.py")]
    runs = [("gpu-marked", ["-m", "gpu", *gpu_files])]
    kernel_files = sorted({str(p) for pat in ("test_linear_logprobs.py", "test_grpo_loss.py", "test_fused*.py")
                           for p in tests.glob(pat)})
    if not ck.quick:
        runs.append(("kernel files", ["-m", "not gpu", *kernel_files]))
    end = time.monotonic() + budget
    for name, args in runs:
        ck.results["tests"].append(_pytest(name, args, end - time.monotonic()))
        ck.save()
    failed = [r["name"] for r in ck.results["tests"] if r["status"] != "ok"]
    return {"status": "ok" if not failed else "error", "reason": f"not passing: {failed}" if failed else None}


def _pytest(name: str, args: list[str], timeout: float) -> dict:
    """One pytest run in a subprocess: its summary line, exit code and the end of its output."""
    if timeout < 5:
        return {"name": name, "status": "skipped", "reason": "the tests section's time budget ran out",
                "summary": None, "returncode": None, "tail": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"name": name, "status": "timeout", "reason": f"stopped after {timeout:.0f} s (section budget)",
                "summary": None, "returncode": None, "tail": out[-3000:], "command": " ".join(cmd[1:])}
    out = proc.stdout + proc.stderr
    summary = next((ln.strip("= ") for ln in reversed(out.splitlines())
                    if re.search(r"\b(passed|failed|skipped|deselected|error|no tests ran)\b", ln)), None)
    # 0: all passed; 5: nothing selected (no GPU test in these files), which is not a failure.
    status = "ok" if proc.returncode in (0, 5) else "error"
    return {"name": name, "status": status, "reason": None if status == "ok" else f"pytest exit {proc.returncode}",
            "summary": summary, "returncode": proc.returncode, "tail": out[-3000:],
            "command": " ".join(cmd[1:])}


def run_gemm(ck: Check, budget: float) -> dict:
    """cuBLAS h @ Wᵀ ([N, H] × [H, V] → [N, V] in the bench dtype) per shape and N of the run."""
    points = sorted({(s, n) for s in ck.plan.shapes for n in (*ck.plan.ll_tokens, *ck.plan.fused_tokens)})
    for shape_name, N in points:
        shape = C.SHAPES[shape_name]
        row = {"shape": shape_name, "N": N, "H": shape.H, "V": shape.V, "status": "ok", "reason": None}
        try:
            ms, p20, p80 = _time_gemm(N, shape.H, shape.V, ck)
            row.update(ms=ms, ms_p20=p20, ms_p80=p80, tflops=2 * N * shape.H * shape.V / ms / 1e9)
        except Exception as e:  # noqa: BLE001 - OOM or not, a row with the reason
            row.update(status="OOM" if harness.is_oom(e) else "error", reason=f"{type(e).__name__}: {e}"[:300])
        harness.free_memory(ck.device)
        ck.results["gemm"].append(row)
    return {"status": "ok", "reason": None}


def _time_gemm(N: int, H: int, V: int, ck: Check) -> tuple[float, float, float]:
    """(median, p20, p80) ms of torch.mm(h, Wᵀ) on fresh random inputs (never zeros)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(N, H, generator=g).to(ck.device, ck.dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(ck.device, ck.dtype)
    return harness.time_fn(lambda: torch.mm(h, w.T), ck.device, quick=ck.quick)


def gemm_ms(ck: Check, shape: str, N: int) -> float | None:
    return next((g["ms"] for g in ck.results["gemm"] if g["shape"] == shape and g["N"] == N
                 and g["status"] == "ok"), None)


def run_kernel(ck: Check, kernel: str, budget: float) -> dict:
    """The runner's sweep for one kernel, point by point, saving after each; the compile baseline
    goes first when the budget runs short, then whole points."""
    from . import runner

    tokens = ck.plan.ll_tokens if kernel == "linear-logprobs" else ck.plan.fused_tokens
    end, ctx = time.monotonic() + budget, Context(device=ck.device, config=bench_config(), quick=ck.quick)
    with no_donated_buffers():
        for shape_name in ck.plan.shapes:
            for N in tokens:
                left = end - time.monotonic()
                point = runner.Point(kernel, C.SHAPES[shape_name], N, ck.dtype, ck.device, ctx)
                if left <= 0:
                    rows = [point.row(p, m, "skipped", f"device_check: the {kernel} section's {budget:.0f} s "
                                      "budget ran out before this point") for p in PROVIDERS[kernel] for m in C.MODES]
                else:
                    rows = runner.bench_point(point, _spec(ck, kernel, left), ck.results["ceilings"], ck.stem)
                    _explain_dropped(rows, ck.plan.baselines, f"device_check: {left:.0f} s were left in the "
                                     f"section, under the {COMPILE_RESERVE_S:.0f} s its compilation needs")
                for r in rows:
                    _add_gemm_ratio(ck, r)
                ck.results["cases"] += rows
                ck.save()
    return {"status": "ok", "reason": None}


def _spec(ck: Check, kernel: str, left: float):
    from .runner import Spec

    baselines = ck.plan.baselines
    if left < COMPILE_RESERVE_S:
        baselines = tuple(b for b in baselines if b != "compile")
    return Spec(kernels=(kernel,), shapes=ck.plan.shapes, tokens=(), dtype=harness.dtype_name(ck.dtype),
                baselines=baselines, quick=ck.quick, out=ck.out, command=ck.results["command"])


def _explain_dropped(rows: list[dict], planned: tuple[str, ...], why_planned: str) -> None:
    """Rows of a baseline left out of this point say why: the plan (--quick) or `why_planned`
    (a planned baseline dropped: the budget)."""
    for r in rows:
        if r["status"] == "skipped" and (r["reason"] or "").startswith("not requested"):
            provider = next(p for p in PROVIDERS[r["kernel"]] if p.name == r["provider"])
            r["reason"] = (why_planned if provider.baseline in planned
                           else "device_check --quick: only the eager baseline runs")


def _add_gemm_ratio(ck: Check, row: dict) -> None:
    g = gemm_ms(ck, row["shape"], row["N"])
    ok = row["status"] == "ok" and row["ms"]
    row["gemm_ms"] = g
    row["gemm_ratio"] = row["ms"] / g if ok and g else None
    row["extra_gb"] = (row["peak_gb"] - (row["grads_gb"] or 0.0)) if ok and row["peak_gb"] is not None else None


@contextlib.contextmanager
def config_variant(variant: str):
    """PROLIX_LLP_CONFIG=variant for the duration (the kernels read it at every call)."""
    from prolix.kernels.linear_logprob import CONFIG_ENV

    before = os.environ.get(CONFIG_ENV)
    os.environ[CONFIG_ENV] = variant
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CONFIG_ENV, None)
        else:
            os.environ[CONFIG_ENV] = before


def run_configs(ck: Check, budget: float) -> dict:
    """`linear_logprobs` stage by stage under each configuration set, same inputs, N = 16384 (the
    first linear-logprobs N): no-grad forward (what the trainer's old/ref passes run), forward
    with entropy, backward alone, forward+backward; and each variant's logp against v2's."""
    from prolix.kernels import linear_logprob as llp

    if ck.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return {"status": "skipped", "reason": "the Triton backend needs CUDA (or TRITON_INTERPRET=1)"}
    end, N = time.monotonic() + budget, ck.plan.ll_tokens[0]
    for shape_name in ck.plan.shapes:
        shape = C.SHAPES[shape_name]
        inp = C.make_inputs(shape, N, ck.dtype, ck.device)
        h, w, y = inp.hidden.detach(), inp.weight.detach(), inp.targets
        logp = {}
        for variant in llp.CONFIG_VARIANTS:
            if time.monotonic() > end:
                ck.results["configs"].append({"variant": variant, "shape": shape_name, "N": N, "status": "skipped",
                                              "reason": f"the configs section's {budget:.0f} s budget ran out"})
                continue
            try:
                with config_variant(variant):
                    logp[variant], rows = _time_variant(ck, h, w, y, inp, variant, shape_name, N)
            except Exception as e:  # noqa: BLE001 - a variant that fails to compile or run is a result
                rows = [{"variant": variant, "shape": shape_name, "N": N, "status": "OOM" if harness.is_oom(e)
                         else "error", "reason": f"{type(e).__name__}: {e}"[:300]}]
                harness.free_memory(ck.device)
            ck.results["configs"] += rows
        for r in ck.results["configs"]:  # same inputs: the variants must agree to fp32 rounding
            if r["shape"] == shape_name and r["variant"] != "v2" and {"v2", r["variant"]} <= logp.keys():
                r["max_abs_diff_vs_v2"] = (logp[r["variant"]] - logp["v2"]).abs().max().item()
        del inp, h, w, y, logp
        harness.free_memory(ck.device)
        ck.save()
    return {"status": "ok", "reason": None}


def _time_variant(ck: Check, h, w, y, inp, variant: str, shape: str, N: int):
    from prolix.kernels import linear_logprob as llp
    from prolix.kernels import linear_logprobs

    backend = "triton"
    with torch.no_grad():
        logp = linear_logprobs(h, w, y, ignore_index=C.IGNORE_INDEX, backend=backend)
        _, lse, _ = llp.triton_forward(h, w, y, 1.0, False)
    g = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(ck.device)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    stages = {
        "no-grad forward": lambda: linear_logprobs(h, w, y, ignore_index=C.IGNORE_INDEX, backend=backend),
        "forward + entropy": lambda: llp.triton_forward(h, w, y, 1.0, True),
        "backward (dz + dW + dh)": lambda: llp.triton_backward(h, w, y, lse, g, None, None, 1.0, True, True),
        "forward + backward": lambda: linear_logprobs(hh, ww, y, ignore_index=C.IGNORE_INDEX,
                                                      backend=backend).backward(g),
    }
    if ck.quick:  # the interpreter runs a tile in seconds: the smoke times the no-grad forward only
        stages = {"no-grad forward": stages["no-grad forward"]}
    rows = []
    for stage, fn in stages.items():
        row = {"variant": variant, "shape": shape, "N": N, "stage": stage, "status": "ok", "reason": None}
        try:
            with torch.no_grad() if stage != "forward + backward" else contextlib.nullcontext():
                if ck.device.type == "cuda":
                    row["ms"], row["ms_p20"], row["ms_p80"] = harness.time_fn(fn, ck.device, grad_to_none=(hh, ww),
                                                                              quick=ck.quick)
                else:  # the interpreter: one call proves the variant runs; its time means nothing
                    t0 = time.perf_counter()
                    fn()
                    row["ms"] = row["ms_p20"] = row["ms_p80"] = (time.perf_counter() - t0) * 1e3
            gm = gemm_ms(ck, shape, N)
            row["gemm_ratio"] = row["ms"] / gm if gm else None
        except Exception as e:  # noqa: BLE001 - a config that fails to compile or run is a result
            row.update(status="OOM" if harness.is_oom(e) else "error", reason=f"{type(e).__name__}: {e}"[:300])
        rows.append(row)
        harness.free_memory(ck.device)
    fwd = llp.forward_config(h.dtype, llp.sm_version(h.device), variant)
    for r in rows:
        r["forward_config"] = fwd._asdict()
    return logp, rows


def run_breakdown(ck: Check, budget: float) -> dict:
    from .breakdown import stages

    shape = C.SHAPES[ck.plan.shapes[0]]
    N = ck.plan.ll_tokens[0]
    rows = stages(N, shape.H, shape.V, ck.dtype)
    gemm = rows[0][1]
    ck.results["breakdown"] = [{"shape": shape.name, "N": N, "stage": name, "ms": ms, "gemm_ratio": ms / gemm}
                               for name, ms in rows]
    return {"status": "ok", "reason": None}


def run_train(ck: Check, budget: float) -> dict:
    """`prolix bench train` at one model shape and N (no torch.compile baseline: its compile of a
    whole step does not fit the section; it is timed on the heads in the kernel sections)."""
    from .runner import Spec
    from .train_step import bench_train

    baselines = tuple(b for b in ck.plan.baselines if b != "compile")
    spec = Spec(kernels=("train",), shapes=(ck.plan.train_shape,), tokens=(ck.plan.train_tokens,),
                dtype="bf16" if ck.device.type == "cuda" else "fp32", baselines=baselines, modes=("fwdbwd",),
                quick=ck.quick, out=ck.out, command=ck.results["command"])
    ctx = Context(device=ck.device, config=bench_config(), quick=ck.quick)
    with no_donated_buffers():
        rows = bench_train(spec, ck.results["ceilings"], ctx, ck.stem)
    _explain_dropped(rows, ck.plan.baselines,
                     "device_check: torch.compile of a whole step does not fit the train section's budget")
    for r in rows:
        r.update(gemm_ms=None, gemm_ratio=None, extra_gb=None)
    ck.results["cases"] += rows
    return {"status": "ok", "reason": None}


RUNNERS = {
    "tests": run_tests, "gemm": run_gemm, "configs": run_configs, "breakdown": run_breakdown, "train": run_train,
    "linear-logprobs": lambda ck, b: run_kernel(ck, "linear-logprobs", b),
    "fused-grpo": lambda ck, b: run_kernel(ck, "fused-grpo", b),
    "bitwise-head": bitwise_head.run_section,
}


def run_section(ck: Check, section: Section) -> None:
    """Run one section within its budget (and the run's); record status, reason and seconds."""
    budget = max(0.0, min(QUICK_BUDGET_S if ck.quick else section.budget_s, ck.left()))
    t0 = time.monotonic()
    if section.cuda_only and ck.device.type != "cuda":
        rec = {"status": "skipped", "reason": f"needs CUDA: {section.cuda_only}"}
    elif budget <= 1:
        rec = {"status": "skipped", "reason": f"the run's {ck.results['budget_s']:.0f} s budget ran out"}
    else:
        print(f"device_check: {section.name} (budget {budget:.0f} s)", flush=True)
        try:
            rec = RUNNERS[section.name](ck, budget)
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others
            rec = {"status": "OOM" if harness.is_oom(e) else "error", "reason": f"{type(e).__name__}: {e}"[:500]}
        harness.free_memory(ck.device)
    rec.update(budget_s=round(budget, 1), seconds=round(time.monotonic() - t0, 1))
    ck.results["sections"][section.name] = rec
    ck.save()


def run(out: Path, *, quick: bool, budget_s: float | None = None, command: str = "") -> Path:
    """Every section in order; then the targets; returns the JSON's path (.md and .png beside it)."""
    from .device_report import write_png

    budget = budget_s if budget_s is not None else (len(SECTIONS) * QUICK_BUDGET_S if quick else FULL_BUDGET_S)
    ck = Check(out, quick, budget, command)
    print(f"device_check: {ck.results['device']['name']}, {ck.results['dtype']}, budget {budget:.0f} s", flush=True)
    ck.results["ceilings"] = harness.measure_ceilings(ck.device, ck.dtype, quick=quick)
    ck.save()
    for section in SECTIONS:
        run_section(ck, section)
    path = ck.save()
    png = ck.stem.with_suffix(".png")
    ck.results["png"] = write_png(ck.results, png)
    return ck.save() if ck.results["png"] else path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the .json, .md and .png")
    p.add_argument("--quick", action="store_true", help="CPU-sized shapes, seconds (a smoke: not performance)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds for all sections (default {FULL_BUDGET_S:.0f}; --quick {len(SECTIONS) * QUICK_BUDGET_S:.0f})")
    args = p.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    command = "python -m prolix.benchmarks.device_check " + " ".join(argv if argv is not None else sys.argv[1:])
    path = run(Path(args.out), quick=args.quick, budget_s=args.budget_s, command=command)
    print(f"wrote {path} (+ .md{', .png' if path.with_suffix('.png').exists() else ''})")
    # The targets and the sections last: what a lease's output tail shows.
    parts = path.with_suffix(".md").read_text().split("\n## ")
    print("\n".join("## " + part for part in parts[1:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
