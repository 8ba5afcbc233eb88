"""What a sweep's points share, between the kernel sweep (`runner.py`) and the trainer step's
(`train_step.py`): one (kernel, shape, N) `Point` and its result rows, the check of a provider
against the point's reference, the profile of one case, the ratios between providers and the
console line of a row. A leaf of the runner and the step: neither imports the other for these.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from . import cases as C
from . import check, harness
from .provider_types import Context, Provider
from .providers import PROVIDERS, grad_output, leaves

__all__ = ["CASE_KEYS", "Point", "reference_for", "check_provider", "profile", "add_ratios", "print_row"]

CASE_KEYS = (
    "kernel", "provider", "note", "shape", "N", "H", "V", "S", "L", "dtype", "mode", "status",
    "reason", "ms", "ms_p20", "ms_p80", "tflops", "gbps", "flop", "bytes", "floor_ms",
    "floor_frac", "peak_gb", "peak_reason", "grads_gb", "errors", "max_err", "err_vs",
    "check_ok", "vs", "profile", "tokens_per_s", "mfu", "model",
)


@dataclasses.dataclass
class Point:
    """One (kernel, shape, N) of the sweep, with what its providers share."""

    kernel: str
    shape: C.Shape
    N: int
    dtype: torch.dtype
    device: torch.device
    ctx: Context
    inp: C.Inputs | None = None
    ref: dict | None = None

    def row(self, provider: Provider, mode: str, status: str, reason: str | None = None) -> dict:
        r = dict.fromkeys(CASE_KEYS)
        inp = self.inp
        r.update(kernel=self.kernel, provider=provider.name, note=provider.note or None,
                 shape=self.shape.name, N=self.N, H=self.shape.H or None, V=self.shape.V or None,
                 S=inp.S if inp else None, L=inp.L if inp else None,
                 dtype=harness.dtype_name(self.dtype), mode=mode, status=status, reason=reason, vs={})
        return r


def reference_for(point: Point, spec, with_grads: bool) -> tuple[dict | None, str]:
    """The answer providers are checked against (computed once per point) and its name.

    A reference that fails (out of memory, or prolix itself failing under --check prolix)
    leaves the providers unchecked, with the reason, rather than blaming the provider."""
    name = "fp64" if spec.check == "fp64" else f"prolix-{spec.dtype}"
    if spec.check == "none":
        return None, "none"
    if point.ref is None:
        g = grad_output(point.kernel, point.inp) if with_grads else None
        try:
            if spec.check == "fp64":
                point.ref = check.reference_fp64(point.kernel, point.inp, g, point.ctx.config,
                                                 with_grads=with_grads)
            else:
                fwd = PROVIDERS[point.kernel][0].build(point.inp, point.ctx)
                point.ref = check.run_once(fwd, leaves(point.kernel, point.inp), g, with_grads)
        except Exception as e:  # noqa: BLE001
            point.ref = {"failed": f"unchecked: the {name} reference failed ({type(e).__name__}: {e})"[:300]}
            harness.free_memory(point.device)
    if "failed" in point.ref:
        return None, point.ref["failed"]
    return point.ref, name


def check_provider(point: Point, fwd, spec) -> dict:
    """Run the provider once (with gradients if any timed mode needs them), compare, report.
    `spec`: the run's `runner.Spec` (its check, dtype and modes)."""
    with_grads = any(m != "fwd" for m in spec.modes)
    ref, ref_name = reference_for(point, spec, with_grads)
    if ref is None:
        return {"errors": None, "max_err": None, "err_vs": ref_name, "check_ok": None}
    g = grad_output(point.kernel, point.inp) if with_grads else None
    got = check.run_once(fwd, leaves(point.kernel, point.inp), g, with_grads)
    errors = check.compare(point.kernel, got, ref)
    max_err = max(errors.values())
    return {"errors": errors, "max_err": max_err, "err_vs": ref_name,
            "check_ok": bool(max_err <= check.TOLERANCE[point.dtype])}


def profile(fn, device, trace: Path, lv) -> dict:
    from .profiling import profile_case

    return profile_case(fn, device, trace, grad_to_none=lv)


def add_ratios(rows: list[dict]) -> None:
    """For each measured row, `vs[other] = {"speedup": other_ms / ms, "memory": peak / other_peak}`
    against every other provider measured at the same kernel, shape, N, dtype and mode."""
    ok = [r for r in rows if r["status"] == "ok" and r["ms"]]
    for r in ok:
        for o in ok:
            if o is r or o["mode"] != r["mode"]:
                continue
            mem = r["peak_gb"] / o["peak_gb"] if r["peak_gb"] and o["peak_gb"] else None
            r["vs"][o["provider"]] = {"speedup": o["ms"] / r["ms"], "memory": mem}


def print_row(r: dict) -> None:
    head = f"  {r['kernel']:<15} {r['shape']:<9} N={r['N']:<6} {r['mode']:<6} {r['provider']:<12}"
    mfu = f"  MFU {100 * r['mfu']:4.1f}%" if r.get("mfu") is not None else ""
    if r["status"] != "ok":
        print(f"{head} {r['status']}: {r['reason']}", flush=True)
        return
    err = f"err {r['max_err']:.1e}" if r["max_err"] is not None else "unchecked"
    print(f"{head} {r['ms']:9.3f} ms  {100 * r['floor_frac']:5.1f}% of floor  {err}{mfu}", flush=True)
