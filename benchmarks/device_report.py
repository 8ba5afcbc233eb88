"""The device check's report, from its JSON alone: the kernels' targets, a markdown page, a plot.

Targets, each a ratio to the cuBLAS bf16 GEMM of the same [N, H]×[H, V]
shape measured in the same run, per LM-head shape at N = 16384:

| target                          | read off                                                   | limit |
|---------------------------------|------------------------------------------------------------|-------|
| fused GRPO fwd+bwd              | `fused-grpo`, provider prolix, mode fwdbwd: ms / GEMM ms    | 3.6   |
| no-grad log-prob forward        | `configs`, default variant, "no-grad forward": ms / GEMM ms | 1.3   |
| generic linear_logprobs fwd+bwd | `linear-logprobs`, prolix, fwdbwd: ms / GEMM ms             | 4.6   |
| extra memory at 16k             | `fused-grpo`, prolix, fwdbwd: peak − gradients (GB)         | 2.5   |
| extra memory flat to 64k        | the same at N = 65536 (the 16k budget still holds at 4×)    | 2.5   |

A target is PASS or FAIL only on a CUDA run; on CPU (or when its row was not measured) it says
why not. `python -m prolix.benchmarks.device_report RESULTS.json` re-renders the .md and .png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = (
    # (name, source, limit, unit)
    ("fused GRPO fwd+bwd", "fused", 3.6, "× GEMM"),
    ("no-grad log-prob forward", "nograd", 1.3, "× GEMM"),
    ("generic linear_logprobs fwd+bwd", "generic", 4.6, "× GEMM"),
    ("extra memory at 16k", "mem16k", 2.5, "GB"),
    ("extra memory flat to 64k", "mem64k", 2.5, "GB"),   # quick: at its own two N
)


def _case(results: dict, kernel: str, shape: str, N: int, mode: str = "fwdbwd") -> dict | None:
    return next((c for c in results["cases"] if c["kernel"] == kernel and c["provider"] == "prolix"
                 and c["shape"] == shape and c["N"] == N and c["mode"] == mode), None)


def _value(results: dict, source: str, shape: str) -> tuple[float | None, str]:
    """(value, how it was read or why it is missing) of one target at one shape: at the run's
    first N (16384), memory also at its last fused-grpo N (65536)."""
    plan = results["plan"]
    if source == "nograd":
        row = next((r for r in results["configs"] if r["shape"] == shape and r.get("variant") == "v2"
                    and r.get("stage") == "no-grad forward"), None)
        if row is None or row["status"] != "ok":
            return None, "configs: " + (row["reason"] if row else "not measured")
        return row.get("gemm_ratio"), f"{row['ms']:.3g} ms (v2)"
    kernel = {"fused": "fused-grpo", "generic": "linear-logprobs"}.get(source, "fused-grpo")
    N = plan["fused_tokens"][-1] if source == "mem64k" else plan["ll_tokens"][0]
    row = _case(results, kernel, shape, N)
    if row is None or row["status"] != "ok":
        return None, f"{kernel} N={N}: " + (f"{row['status']}: {row['reason']}" if row else "not measured")
    if source.startswith("mem"):
        return row.get("extra_gb"), f"peak {row['peak_gb']} GB − gradients {row['grads_gb']:.3g} GB" \
            if row.get("peak_gb") is not None else (row.get("peak_reason") or "no peak")
    return row.get("gemm_ratio"), f"{row['ms']:.3g} ms / GEMM {row['gemm_ms']:.3g} ms" if row.get("gemm_ms") else "no GEMM"


def evaluate_targets(results: dict) -> list[dict]:
    """One entry per (target, shape): value, limit, verdict PASS / FAIL / n/a (with why)."""
    shapes = results["plan"]["shapes"]
    on_cuda = results["device"]["type"] == "cuda"
    out = []
    for name, source, limit, unit in TARGETS:
        for shape in shapes:
            value, how = _value(results, source, shape)
            verdict = "n/a" if value is None or not on_cuda else ("PASS" if value <= limit else "FAIL")
            if value is not None and not on_cuda:
                how += "; CPU run: not performance"
            out.append({"target": name, "shape": shape, "value": value, "limit": limit, "unit": unit,
                        "verdict": verdict, "detail": how})
    return out


# ----------------------------------------------------------------------------- markdown


def _f(x, fmt=".3g") -> str:
    return "—" if x is None else format(x, fmt)


def markdown(r: dict) -> str:
    from .bitwise_head import markdown_lines as bitwise_head_md  # imports torch: only when rendering

    v, c = r["versions"], r.get("ceilings") or {}
    lines = ["# prolix device check", "",
             f"{r['created']} on **{r['device']['name']}** · commit `{r['commit']}` · torch {v['torch']} · "
             f"triton {v['triton']} · liger-kernel {v['liger_kernel']} · cut-cross-entropy {v['cut_cross_entropy']} · "
             f"trl {v.get('trl')} · {r['dtype']} · {r['elapsed_s']:.0f} s of a {r['budget_s']:.0f} s budget", "",
             f"Command: `{r['command']}`", ""]
    if c:
        lines += [f"Ceilings: matmul {c['matmul_tflops']:.3g} TFLOP/s, copy {c['copy_gbps']:.3g} GB/s.", ""]
    if r["device"]["type"] != "cuda":
        lines += ["> **CPU run: a smoke test of the device check. These numbers are not performance.**", ""]
    lines += ["## Targets", "", "| target | shape | value | limit | verdict | from |", "|---|---|---:|---:|---|---|"]
    lines += [f"| {t['target']} | {t['shape']} | {_f(t['value'])} {t['unit']} | {t['limit']} | **{t['verdict']}** | "
              f"{t['detail']} |" for t in r["targets"]] or ["| (not evaluated yet) | | | | | |"]
    lines += ["", "## Sections", "", "| section | status | seconds | budget | reason |", "|---|---|---:|---:|---|"]
    lines += [f"| {n} | {s['status']} | {s['seconds']} | {s['budget_s']} | {s.get('reason') or ''} |"
              for n, s in r["sections"].items()]
    lines += ["", "## cuBLAS GEMM", "", "| shape | N | ms | TFLOP/s |", "|---|---:|---:|---:|"]
    lines += [f"| {g['shape']} | {g['N']} | {_f(g.get('ms'))} | {_f(g.get('tflops'))} |" if g["status"] == "ok"
              else f"| {g['shape']} | {g['N']} | **{g['status']}** | {g['reason']} |" for g in r["gemm"]]
    lines += ["", *_cases_md(r["cases"]), *bitwise_head_md(r.get("bitwise_head")),
              *_configs_md(r["configs"]), *_breakdown_md(r["breakdown"]), *_tests_md(r["tests"])]
    return "\n".join(lines) + "\n"


def _cases_md(cases: list[dict]) -> list[str]:
    lines = ["## Kernels and the trainer step", "",
             "`× GEMM` = ms / the cuBLAS GEMM of the same shape and N; `extra GB` = peak − gradients.", "",
             "| kernel | shape | N | mode | provider | ms | × GEMM | peak GB | extra GB | max err |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for x in cases:
        if x["status"] == "ok":
            lines.append(f"| {x['kernel']} | {x['shape']} | {x['N']} | {x['mode']} | {x['provider']} | "
                         f"{_f(x['ms'])} | {_f(x.get('gemm_ratio'))} | {_f(x['peak_gb'])} | "
                         f"{_f(x.get('extra_gb'))} | {_f(x['max_err'], '.1e')} |")
        elif x["status"] != "skipped":
            lines.append(f"| {x['kernel']} | {x['shape']} | {x['N']} | {x['mode']} | {x['provider']} | "
                         f"**{x['status']}** | | | | |")
    reasons = dict.fromkeys(f"- {x['kernel']} / **{x['provider']}** ({x['status']}): {x['reason']}"
                            for x in cases if x["status"] != "ok")
    return lines + ([""] + ["Not measured, or failed:", ""] + list(reasons) if reasons else []) + [""]


def _configs_md(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["## Kernel configurations (PROLIX_LLP_CONFIG)", "",
             "| variant | shape | N | stage | ms | × GEMM | logp max abs diff vs v2 |", "|---|---|---:|---|---:|---:|---:|"]
    for x in rows:
        cell = f"{_f(x.get('ms'))} | {_f(x.get('gemm_ratio'))}" if x["status"] == "ok" else f"**{x['status']}** | {x['reason']}"
        lines.append(f"| {x['variant']} | {x['shape']} | {x['N']} | {x.get('stage', '')} | {cell} | "
                     f"{_f(x.get('max_abs_diff_vs_v2'), '.1e')} |")
    return lines + [""]


def _breakdown_md(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [f"## Stage breakdown ({rows[0]['shape']}, N = {rows[0]['N']})", "", "| stage | ms | × GEMM |",
             "|---|---:|---:|"]
    return lines + [f"| {x['stage']} | {x['ms']:.3g} | {x['gemm_ratio']:.3g} |" for x in rows] + [""]


def _tests_md(rows: list[dict]) -> list[str]:
    lines = ["## Tests", ""]
    for t in rows:
        cmd = f" (`{t['command'][:200]}`)" if t.get("command") else ""
        lines += [f"- **{t['name']}**: {t['status']}: {t.get('summary') or t.get('reason')}{cmd}"]
    failing = [t for t in rows if t["status"] not in ("ok", "skipped")]
    for t in failing:
        lines += ["", f"End of the output of {t['name']}:", "", "```", t["tail"][-2000:], "```"]
    return lines + [""]


def write_markdown(results: dict, path: Path) -> Path:
    path.write_text(markdown(results), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- plot


def write_png(results: dict, path: Path) -> str | None:
    """Left: prolix and the baselines in GEMM-times (fwdbwd, N = 16384) per kernel × shape, with
    the targets dashed; right: the two configuration sets stage by stage. Returns the path, or
    None when matplotlib is missing (the JSON then says so under "png_reason")."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        results["png_reason"] = f"matplotlib is not installed ({e})"
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5))
    _plot_kernels(ax, results)
    _plot_configs(bx, results)
    fig.suptitle(f"prolix device check · {results['device']['name']} · {results['commit']}"
                 + (" · CPU smoke, not performance" if results["device"]["type"] != "cuda" else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _plot_kernels(ax, results: dict) -> None:
    ok = [c for c in results["cases"] if c["status"] == "ok" and c["mode"] == "fwdbwd" and c.get("gemm_ratio")]
    groups = list(dict.fromkeys((c["kernel"], c["shape"], c["N"]) for c in ok))
    providers = list(dict.fromkeys(c["provider"] for c in ok))
    width = 0.8 / max(1, len(providers))
    for j, p in enumerate(providers):
        xs = [i + j * width for i, g in enumerate(groups) for c in ok if (c["kernel"], c["shape"], c["N"]) == g
              and c["provider"] == p]
        ys = [c["gemm_ratio"] for g in groups for c in ok if (c["kernel"], c["shape"], c["N"]) == g and c["provider"] == p]
        ax.bar(xs, ys, width, label=p)
    for limit, label in ((3.6, "fused target 3.6"), (4.6, "generic target 4.6")):
        ax.axhline(limit, ls="--", lw=1, color="k")
        ax.text(-0.4, limit, label, va="bottom", fontsize=7)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{k}\n{s} N={n}" for k, s, n in groups], fontsize=7)
    ax.set_ylabel("fwd+bwd time / cuBLAS GEMM time")
    ax.set_title("fwd+bwd in GEMM-times (lower is better)")
    if providers:
        ax.legend(fontsize=7)


def _plot_configs(ax, results: dict) -> None:
    ok = [r for r in results["configs"] if r["status"] == "ok"]
    use_ratio = all(r.get("gemm_ratio") for r in ok) and bool(ok)
    keys = list(dict.fromkeys((r["shape"], r["stage"]) for r in ok))
    variants = list(dict.fromkeys(r["variant"] for r in ok))
    width = 0.8 / max(1, len(variants))
    for j, v in enumerate(variants):
        vals = {(r["shape"], r["stage"]): r["gemm_ratio"] if use_ratio else r["ms"] for r in ok if r["variant"] == v}
        ax.bar([i + width * j for i in range(len(keys))], [vals.get(k, 0) for k in keys], width, label=v)
    if use_ratio:
        ax.axhline(1.3, ls="--", lw=1, color="k")
        ax.text(-0.4, 1.3, "no-grad forward target 1.3", va="bottom", fontsize=7)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
    ax.set_xticklabels([f"{s}\n{st}" for s, st in keys], fontsize=6, rotation=20)
    ax.set_ylabel("time / cuBLAS GEMM time" if use_ratio else "ms")
    ax.set_title("linear_logprobs by PROLIX_LLP_CONFIG")
    if variants:
        ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m prolix.benchmarks.device_report RESULTS.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    results = json.loads(path.read_text())
    write_markdown(results, path.with_suffix(".md"))
    write_png(results, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
