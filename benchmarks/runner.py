"""The one benchmark runner behind `prolix bench`: declared sweeps in, JSON out, then pictures.

    prolix bench linear-logprobs --shape qwen-1.5b,llama-8b --tokens 4096,16384
    prolix bench fused-grpo --modes fwdbwd --baselines eager,liger --profile
    prolix bench train --shape qwen-0.5b,qwen-1.5b --tokens 4096,16384   # the trainer's step
    prolix bench all --quick --out /tmp/bench         # every kernel and the step, CPU-sized
    prolix bench render benchmarks/results/<run>.json  # re-draw the table and plot

A sweep is kernel × shape × N × provider × mode. For each (kernel, shape, N) the inputs are
made once, the reference once; then every provider is built (or skipped with its reason),
checked against the reference, and only then timed per mode, its peak memory measured, and,
with `--profile`, traced. An out-of-memory error is a result ("OOM"), never a dropped row.

The trainer step (`train`, `train_step.py`) is the same sweep over model shapes: a Qwen2 model's
packed forward + backward with each provider's head, in the same rows (plus tokens/s and MFU).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

import torch

from . import cases as C
from . import harness, result_files
from .provider_types import Context, Provider, Skip
from .providers import BASELINES, PROVIDERS, bench_config, grad_output, leaves, no_donated_buffers
from .sweep import Point, add_ratios, check_provider, print_row, profile

SCHEMA = "prolix-bench/2"  # /2: + tokens_per_s, mfu, model; the train kernel; trl providers
TRAIN = "train"
ALL_KERNELS = (*C.KERNELS, TRAIN)
DEFAULT_OUT = result_files.DEFAULT_OUT


@dataclasses.dataclass(kw_only=True)
class Spec:
    """A run: what to sweep (kernels × shapes × tokens × providers × modes) and where to write."""

    kernels: tuple[str, ...]
    shapes: tuple[str, ...]
    tokens: tuple[int, ...]
    dtype: str = "bf16"
    baselines: tuple[str, ...] = BASELINES
    modes: tuple[str, ...] = C.MODES
    quick: bool = False
    out: Path = DEFAULT_OUT
    profile: bool = False
    check: str = "fp64"
    seq_len: int | None = None
    seed: int = 0
    command: str = ""


class SpecError(ValueError):
    """A sweep that cannot run as asked; the message names the option."""


def default_shapes(kernels: tuple[str, ...], quick: bool) -> tuple[str, ...]:
    """--shape when none is given: model shapes for the trainer step alone, else LM heads (with
    `all`, the step runs at the model shapes among them, or its own defaults)."""
    from .train_step import DEFAULT_MODELS, QUICK_MODELS

    if set(kernels) == {TRAIN}:
        return QUICK_MODELS if quick else DEFAULT_MODELS
    return C.QUICK_SHAPES if quick else C.DEFAULT_SHAPES


def run_kernels(spec: Spec, with_packing: bool) -> tuple[str, ...]:
    """The kernels a run measures: `all` (the CLI's with_packing) always includes the step."""
    return spec.kernels + ((TRAIN,) if with_packing and TRAIN not in spec.kernels else ())


def validate(spec: Spec, device: torch.device, kernels: tuple[str, ...] | None = None) -> None:
    """Refuse a sweep that cannot mean anything here, naming the option and the limit."""
    from .train_step import MODEL_SHAPES, model_shapes

    kernels = kernels or spec.kernels
    bad = [k for k in kernels if k not in ALL_KERNELS]
    if bad:
        raise SpecError(f"kernels: unknown {bad}; known: {list(ALL_KERNELS)}")
    heads = [k for k in kernels if k != TRAIN]
    known = (set(C.SHAPES) if heads else set()) | (set(MODEL_SHAPES) if TRAIN in kernels else set())
    unknown = [s for s in spec.shapes if s not in known]
    if unknown:
        raise SpecError(f"--shape: unknown {unknown}; known: {sorted(known)}")
    if heads and not any(s in C.SHAPES for s in spec.shapes):
        raise SpecError(f"--shape: {list(spec.shapes)} names no LM-head shape for {heads}; "
                        f"LM heads: {sorted(C.SHAPES)}")
    for name, got, known in (("--baselines", spec.baselines, BASELINES), ("--modes", spec.modes, C.MODES)):
        bad = [x for x in got if x not in known]
        if bad:
            raise SpecError(f"{name}: unknown {bad}; known: {list(known)}")
    if spec.dtype not in harness.DTYPES:
        raise SpecError(f"--dtype must be one of {list(harness.DTYPES)}, got {spec.dtype!r}")
    if device.type == "cpu":
        big_h = [s for s in spec.shapes if heads and s in C.SHAPES and C.SHAPES[s].H > 256]
        if TRAIN in kernels:
            big_h += [s for s in model_shapes(spec.shapes, spec.quick)
                      if MODEL_SHAPES[s].hidden > 256 and s not in big_h]
        big_n = [n for n in spec.tokens if n > 2048]
        if big_h or big_n:
            raise SpecError(
                f"on CPU the suite is a smoke (N ≤ 2048, H ≤ 256); got "
                f"shapes {big_h} and tokens {big_n}: use --quick, or --shape tiny,small --tokens 256,2048")


def run(spec: Spec, *, with_packing: bool = False) -> Path:
    """Run the sweep (and, with `all`, the trainer step and the packing benchmark); write
    `<out>/<date>-<device>-<commit>.json`, its .md and .png; return the JSON's path."""
    device = harness.pick_device()
    kernels = run_kernels(spec, with_packing)
    validate(spec, device, kernels)
    torch.manual_seed(spec.seed)
    dtype = harness.DTYPES[spec.dtype]
    created, stamp = harness.timestamp()
    commit = harness.git_commit()
    stem = spec.out / f"{stamp}-{harness.device_slug(device)}-{commit}"
    print(f"prolix bench: {harness.device_name(device)}, {spec.dtype}; measuring the ceilings", flush=True)
    ceilings = harness.measure_ceilings(device, dtype, quick=spec.quick)
    ctx = Context(device=device, config=bench_config(), quick=spec.quick)
    rows: list[dict] = []
    with no_donated_buffers():
        for kernel in kernels:
            if kernel == TRAIN:
                from .train_step import bench_train

                rows += bench_train(spec, ceilings, ctx, stem)
                continue
            shapes = ([C.LOSS_SHAPE] if kernel == "grpo-loss" else
                      [C.SHAPES[s] for s in spec.shapes if s in C.SHAPES])
            for shape in shapes:
                for N in spec.tokens:
                    point = Point(kernel, shape, N, dtype, device, ctx)
                    rows += bench_point(point, spec, ceilings, stem)
    results = {
        "schema": SCHEMA, "created": created, "command": spec.command, "commit": commit,
        "device": {"name": harness.device_name(device), "type": device.type},
        "versions": harness.versions(), "ceilings": ceilings,
        "settings": {"kernels": list(kernels), "dtype": spec.dtype, "quick": spec.quick, "check": spec.check,
                     "seed": spec.seed, "timing": _timing_text(device), "quantiles": list(harness.QUANTILES),
                     "config": dataclasses.asdict(ctx.config)},
        "cases": rows, "extras": {},
    }
    if with_packing:
        results["extras"]["packing_efficiency"] = run_packing_efficiency(spec)
    return write(results, stem)


def _timing_text(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton.testing.do_bench: CUDA events, median with p20/p80"
    return "time.perf_counter after one warm-up call, median with p20/p80 (CPU smoke: not performance)"


def write(results: dict, stem: Path) -> Path:
    """Write the JSON, then render the markdown table and the PNG plot from it alone."""
    from . import render

    stem.parent.mkdir(parents=True, exist_ok=True)
    path = stem.with_suffix(".json")
    path.write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")
    render.render_file(path)
    return path


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def bench_point(point: Point, spec: Spec, ceilings: dict, stem: Path) -> list[dict]:
    """All providers × modes at one (kernel, shape, N); OOM while making inputs is a result too."""
    try:
        seq_len = spec.seq_len or (C.QUICK_SEQ_LEN if spec.quick else None)
        point.inp = C.make_inputs(point.shape, point.N, point.dtype, point.device,
                                  seed=spec.seed, seq_len=seq_len)
    except Exception as e:  # noqa: BLE001 - OOM or not, every provider gets a row saying why
        status = "OOM" if harness.is_oom(e) else "error"
        return [point.row(p, m, status, f"making inputs: {e}")
                for p in PROVIDERS[point.kernel] for m in spec.modes]
    rows = []
    for provider in PROVIDERS[point.kernel]:
        rows += bench_provider(point, provider, spec, ceilings, stem)
        harness.free_memory(point.device)
    add_ratios(rows)
    point.inp = point.ref = None
    harness.free_memory(point.device)
    return rows


def bench_provider(point: Point, provider: Provider, spec: Spec, ceilings: dict, stem: Path) -> list[dict]:
    """Build, check, then time each mode; every failure becomes rows with a status and a reason."""
    if provider.baseline is not None and provider.baseline not in spec.baselines:
        return [point.row(provider, m, "skipped", f"not requested (--baselines {','.join(spec.baselines)})")
                for m in spec.modes]
    try:
        fwd = provider.build(point.inp, point.ctx)
        checked = check_provider(point, fwd, spec)
    except Skip as e:
        return [point.row(provider, m, "skipped", str(e)) for m in spec.modes]
    except Exception as e:  # noqa: BLE001 - a baseline that breaks is a result, not a crash
        status = "OOM" if harness.is_oom(e) else "error"
        return [point.row(provider, m, status, f"{type(e).__name__}: {e}"[:500]) for m in spec.modes]
    rows = []
    for mode in spec.modes:
        row = point.row(provider, mode, "ok")
        row.update(checked)
        try:
            measure_mode(point, fwd, mode, row, ceilings, spec, stem)
        except Exception as e:  # noqa: BLE001
            row.update(status="OOM" if harness.is_oom(e) else "error",
                       reason=f"{type(e).__name__}: {e}"[:500], ms=None)
        harness.free_memory(point.device)
        print_row(row)
        rows.append(row)
    return rows


def mode_fn(fwd: Callable[[], torch.Tensor], mode: str, g: torch.Tensor | None):
    """The callable timed for a mode: the forward; the backward alone (its forward run once,
    the graph retained); or both."""
    if mode == "fwd":
        return fwd
    if mode == "fwdbwd":
        return lambda: fwd().backward(g)
    out = fwd()
    return lambda: out.backward(g, retain_graph=True)


def measure_mode(point: Point, fwd, mode: str, row: dict, ceilings: dict, spec: Spec, stem: Path) -> None:
    """Time one mode, measure its peak memory, fill in the derived numbers of the row."""
    inp, dev = point.inp, point.device
    g, lv = grad_output(point.kernel, inp), leaves(point.kernel, inp)
    fn = mode_fn(fwd, mode, g)
    row["ms"], row["ms_p20"], row["ms_p80"] = harness.time_fn(fn, dev, grad_to_none=lv, quick=spec.quick)
    if spec.profile:
        trace = Path(f"{stem}-trace-{point.kernel}-{row['provider']}-{point.shape.name}-{point.N}-{mode}.json")
        row["profile"] = profile(fn, dev, trace, lv)
    del fn
    peak_fn = fwd if mode == "fwd" else mode_fn(fwd, "fwdbwd", g)
    row["peak_gb"], row["peak_reason"] = harness.peak_memory_gb(peak_fn, dev, grad_to_none=lv)
    elem = torch.finfo(point.dtype).bits // 8
    flop, n_bytes = C.work(point.kernel, mode, point.shape, point.N, elem)
    sec = row["ms"] * 1e-3
    floor = C.floor_ms(flop, n_bytes, ceilings)
    row.update(flop=flop, bytes=n_bytes, tflops=flop / sec / 1e12 if flop else None,
               gbps=n_bytes / sec / 1e9, floor_ms=floor, floor_frac=floor / row["ms"],
               grads_gb=C.grads_gb(point.kernel, mode, point.shape, point.N, elem),
               tokens_per_s=point.N / sec)


def run_packing_efficiency(spec: Spec) -> dict:
    """The padding-vs-packing benchmark (`benchmarks/packing_efficiency.py`), for `all`:
    {"status": "ok", "results": ...} or {"status": "skipped", "reason": ...}."""
    try:
        from .packing_efficiency import measure_packing_efficiency
    except ImportError as e:
        return {"status": "skipped", "reason": f"benchmarks/packing_efficiency.py cannot be imported ({e})"}
    print("  packing efficiency: padded vs packed micro-batches", flush=True)
    return {"status": "ok",
            "results": measure_packing_efficiency(num_sequences=128 if spec.quick else 1024, seed=spec.seed)}


def main_run(spec: Spec, *, with_packing: bool = False) -> int:
    path = run(spec, with_packing=with_packing)
    drawn = ".md, .png" if path.with_suffix(".png").exists() else ".md"
    print(f"wrote {path} (+ {drawn})", file=sys.stdout)
    return 0
