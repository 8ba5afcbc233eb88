"""`--profile`: a torch.profiler trace per case and the table of where its time goes.

The trace is Chrome/Perfetto JSON (open it in ui.perfetto.dev or chrome://tracing). The table
lists the device kernels (CUDA) or, on CPU, the aten ops by self time: calls, ms per call of
the benchmarked function, and share of the total, so a kernel engineer sees at a glance whether
the GEMMs dominate (as they should) or something else does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

STEPS = 3   # calls recorded per case (after the timing warm-up, so nothing compiles here)
TOP = 15    # rows kept in the table


def profile_case(
    fn: Callable[[], object],
    device: torch.device,
    trace_path: Path,
    *,
    grad_to_none: Sequence[torch.Tensor] = (),
) -> dict:
    """Record STEPS calls of `fn`; write the trace; return {"trace", "unit", "kernels": [...]}.

    kernels: [{"name", "calls", "ms", "share"}] per call of `fn`, the TOP by self time.
    """
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(STEPS):
            for t in grad_to_none:
                t.grad = None
            fn()
        if on_cuda:
            torch.cuda.synchronize()
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_path))
    return {"trace": trace_path.name, "unit": "device kernels" if on_cuda else "CPU ops (self time)",
            "kernels": _kernel_table(prof.key_averages(), on_cuda)}


def _kernel_table(events, on_cuda: bool) -> list[dict]:
    rows = []
    for e in events:
        if on_cuda:
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.self_device_time_total
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append((e.key, e.count, us))
    total = sum(us for _, _, us in rows) or 1.0
    rows.sort(key=lambda r: -r[2])
    return [{"name": name[:120], "calls": calls // STEPS, "ms": us / 1e3 / STEPS, "share": us / total}
            for name, calls, us in rows[:TOP]]


def profile_markdown(cases: list[dict]) -> str:
    """One table per profiled case, for the `-profile.md` beside the results."""
    lines = ["# Profiles", ""]
    for c in cases:
        p = c.get("profile")
        if not p:
            continue
        lines += [f"## {c['kernel']} · {c['provider']} · {c['shape']} · N={c['N']} · {c['mode']}",
                  "", f"Trace: `{p['trace']}` ({p['unit']}, per call)", "",
                  "| kernel | calls | ms | share |", "|---|---:|---:|---:|"]
        for k in p["kernels"]:
            name = k["name"].replace("|", "\\|")
            lines.append(f"| `{name}` | {k['calls']} | {k['ms']:.3f} | {100 * k['share']:.1f}% |")
        lines.append("")
    return "\n".join(lines)
