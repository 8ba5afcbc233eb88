"""Tables and plots, drawn from a results JSON alone (`prolix bench render RESULTS.json`).

- `<stem>.md`: the run's header (device, versions, commit, command, measured ceilings), then per
  kernel one table of the measured cases, the cases that ran out of memory or failed, the
  providers that were not measured and why, and how to read each provider. The trainer step
  (`train`) also gets tokens/s and MFU columns and a line per model it ran.
- `<stem>.png`: per (kernel, shape) one column; top: time vs N (log-log, the roofline floor
  dashed), bottom: peak memory vs N; one line per provider; "OOM" where a provider ran out.
- `<stem>-profile.md` when the run was profiled; `<stem>-packing.png` after `all`, whose
  markdown also carries the padding-vs-packing tables of `packing_efficiency.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PLOT_MODES = ("fwdbwd", "fwd", "bwd")  # the panel shows the first of these that was measured
COLORS = {"prolix": "tab:red", "eager": "tab:gray", "compile": "tab:purple", "liger": "tab:blue",
          "liger-triton": "tab:cyan", "cce": "tab:green", "trl": "tab:orange", "trl-chunked": "tab:brown",
          "trl+prolix": "tab:pink"}


def render_file(path: Path, out_dir: Path | None = None) -> tuple[Path, Path | None]:
    """Re-render the markdown and the PNG of a results JSON; next to it unless `out_dir`.
    The PNG path is None when matplotlib is not installed (the markdown is written anyway)."""
    path = Path(path)
    results = json.loads(path.read_text())
    stem = (Path(out_dir) if out_dir else path.parent) / path.stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    md, png = stem.with_suffix(".md"), stem.with_suffix(".png")
    md.write_text(markdown(results))
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:  # the numbers are in the JSON and the table; only the pictures are lost
        print(f"prolix bench: no .png plots, matplotlib is not installed ({e}); pip install matplotlib",
              file=sys.stderr)
        png = None
    else:
        plot(results, png)
    packing = results.get("extras", {}).get("packing_efficiency")
    if png and packing and packing["status"] == "ok":
        from .packing_efficiency import plot as packing_plot

        packing_plot(packing["results"], Path(f"{stem}-packing.png"))
    if any(c.get("profile") for c in results["cases"]):
        from .profiling import profile_markdown

        Path(f"{stem}-profile.md").write_text(profile_markdown(results["cases"]))
    return md, png


# ----------------------------------------------------------------------------- markdown


def _num(x, fmt: str, empty: str = "—") -> str:
    return empty if x is None else format(x, fmt)


def header(results: dict) -> list[str]:
    v, c, dev = results["versions"], results["ceilings"], results["device"]
    lines = [
        "# prolix kernel benchmarks", "",
        f"Measured {results['created']} on **{dev['name']}** · commit `{results['commit']}` · "
        f"torch {v['torch']} · triton {v['triton']} · liger-kernel {v['liger_kernel']} · "
        f"cut-cross-entropy {v['cut_cross_entropy']}"
        + "".join(f" · {k} {v[k]}" for k in ("trl", "transformers") if k in v),  # not in /1 results
        "",
        f"Command: `{results['command']}`", "",
        f"Ceilings measured in this run: {c['matmul_dtype']} matmul **{c['matmul_tflops']:.3g} TFLOP/s** "
        f"({'×'.join(map(str, c['matmul_shape']))}), copy **{c['copy_gbps']:.3g} GB/s**. "
        f"Timing: {results['settings']['timing']}.", "",
    ]
    if dev["type"] != "cuda":
        lines += ["> **CPU run: a smoke test of the suite. These numbers are not performance.**", ""]
    return lines


def kernel_table(cases: list[dict], *, step: bool = False) -> list[str]:
    """One row per measured (or OOM / failed) case; a `× P` column per provider P measured;
    with `step` (the trainer step) tokens/s and MFU columns after ms."""
    shown = [c for c in cases if c["status"] != "skipped"]
    # Same shape, N and mode together, so the providers being compared sit on adjacent rows.
    order = {k: {v: i for i, v in enumerate(dict.fromkeys(c[k] for c in cases))}
             for k in ("shape", "mode", "provider")}
    shown.sort(key=lambda c: (order["shape"][c["shape"]], c["N"], order["mode"][c["mode"]],
                              order["provider"][c["provider"]]))
    if not shown:
        return ["No provider was measured."]
    others = [p for p in COLORS if any(c["provider"] == p and c["status"] == "ok" for c in cases)]
    others += sorted({c["provider"] for c in cases if c["status"] == "ok"} - set(others))
    cols = (["shape", "N", "mode", "provider", "ms (p20–p80)"] + (["tokens/s", "MFU"] if step else [])
            + ["TFLOP/s", "GB/s", "% floor", "peak GB", "max err"] + [f"× {p}" for p in others])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * 4 + "---:|" * (len(cols) - 4)]
    for c in shown:
        if c["status"] == "ok":
            ms = f"{c['ms']:.3g} ({c['ms_p20']:.3g}–{c['ms_p80']:.3g})"
            err = _num(c["max_err"], ".1e") + ("" if c["check_ok"] in (True, None) else " ✗")
            cells = [ms] + ([_num(c.get("tokens_per_s"), ".4g"), _num(c.get("mfu") and 100 * c["mfu"], ".1f")]
                            if step else [])
            cells += [_num(c["tflops"], ".3g"), _num(c["gbps"], ".3g"),
                      _num(c["floor_frac"] and 100 * c["floor_frac"], ".1f"),
                      _num(c["peak_gb"], ".3f"), err]
            cells += ["" if p == c["provider"] else _ratio(c["vs"].get(p)) for p in others]
        else:
            cells = [f"**{c['status']}**"] + [""] * (len(cols) - 5)
        lines.append("| " + " | ".join([c["shape"], str(c["N"]), c["mode"], c["provider"]] + cells) + " |")
    return lines


def _ratio(vs: dict | None) -> str:
    return "—" if not vs else f"{vs['speedup']:.3g}×"


def _dedup(cases: list[dict], status: str | tuple) -> list[str]:
    seen = []
    for c in cases:
        if c["status"] in ((status,) if isinstance(status, str) else status):
            item = f"- **{c['provider']}** ({c['status']}): {c['reason']}"
            if item not in seen:
                seen.append(item)
    return seen


def markdown(results: dict) -> str:
    lines = header(results)
    kernels = list(dict.fromkeys(c["kernel"] for c in results["cases"]))
    for k in kernels:
        cases = [c for c in results["cases"] if c["kernel"] == k]
        lines += [f"## {k}", ""] + (_models(cases) if k == "train" else [])
        lines += kernel_table(cases, step=k == "train") + [""]
        failed = _dedup(cases, ("OOM", "error"))
        if failed:
            lines += ["Out of memory or failed:", ""] + failed + [""]
        skipped = _dedup(cases, "skipped")
        if skipped:
            lines += ["Not measured:", ""] + skipped + [""]
        notes = list(dict.fromkeys(f"- **{c['provider']}**: {c['note']}" for c in cases if c["note"]))
        if notes:
            lines += ["How to read:", ""] + notes + [""]
    lines += ["Columns: `ms` median (p20–p80) of one call; `TFLOP/s` and `GB/s` count the work the math",
              "needs (2·N·H·V per GEMM: fwd 1, bwd 2, fwdbwd 3; no recompute), the same for every",
              "provider; `% floor` = roofline floor (FLOP at the measured matmul peak, or bytes at the",
              "measured copy bandwidth) / ms; `peak GB` above the inputs, gradients included; `max err`",
              "relative to the reference (✗ above the dtype's tolerance); `× P` = P's ms / this row's ms",
              "(> 1: this row is faster).", ""]
    if "train" in kernels:
        lines += ["`train` rows time one packed forward + backward of the whole model (no optimizer step):",
                  "`TFLOP/s` and `MFU` count model FLOPs, 6·P·N + 6·layers·d·ΣL² (P the matmul parameters,",
                  "d = heads·head_dim; recomputation not counted), MFU against the measured matmul peak (CUDA",
                  "only); `GB/s` counts the parameters read and their gradients written once; `max err` is the",
                  "head + loss on one batch's hidden states against the fp64 reference.", ""]
    packing = results.get("extras", {}).get("packing_efficiency")
    if packing:
        lines += ["## packing efficiency", ""] + _packing_markdown(packing)
    return "\n".join(lines)


def _models(cases: list[dict]) -> list[str]:
    """One line per model shape of the trainer step: its sizes, precision and batch."""
    lines, seen = [], set()
    for c in cases:
        m = c.get("model")
        if not m or (c["shape"], c["N"]) in seen:
            continue
        seen.add((c["shape"], c["N"]))
        lengths = m["seq_lengths"]
        lines.append(
            f"- **{c['shape']}** N={c['N']}: {m['family']} {m['layers']} layers, H {m['hidden']}, "
            f"I {m['intermediate']}, {m['heads']} heads ({m['kv_heads']} kv), V {m['vocab']}, {'tied' if m['tied'] else 'untied'} head, "
            f"{m['params'] / 1e6:.4g} M params ({m['param_dtype']}, autocast {m['autocast'] or 'off'}), "
            f"attention {m['attn_backend']}; {len(lengths)} sequences of {min(lengths)}–{max(lengths)} tokens")
    return lines + ([""] if lines else [])


def _packing_markdown(extra: dict) -> list[str]:
    if extra["status"] != "ok":
        return [f"Not measured: {extra['reason']}", ""]
    from .packing_efficiency import markdown as packing_markdown

    return [packing_markdown(extra["results"])]


# ----------------------------------------------------------------------------- plot


def _panels(cases: list[dict]) -> list[tuple[str, str, str]]:
    """(kernel, shape, mode) per column, in the run's order; the mode is the first of PLOT_MODES."""
    panels = []
    for k, s in dict.fromkeys((c["kernel"], c["shape"]) for c in cases):
        modes = {c["mode"] for c in cases if c["kernel"] == k and c["shape"] == s}
        panels.append((k, s, next(m for m in PLOT_MODES if m in modes)))
    return panels


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["cases"]
    panels = _panels(cases) or [("no cases", "", "")]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 7.4), squeeze=False, sharex="col")
    for col, (kernel, shape, mode) in enumerate(panels):
        sel = [c for c in cases if (c["kernel"], c["shape"], c["mode"]) == (kernel, shape, mode)]
        _draw_time(axes[0][col], sel)
        _draw_memory(axes[1][col], sel)
        ns = sorted({c["N"] for c in sel})
        if ns:
            axes[1][col].set_xticks(ns, [_fmt_n(n) for n in ns])
            axes[1][col].minorticks_off()
            axes[1][col].set_xlim(ns[0] / 1.3, ns[-1] * 1.3)
        first = sel[0] if sel else {}
        dims = f"H={first['H']}, V={first['V']}" if first.get("H") else "[N] vectors"
        axes[0][col].set_title(f"{kernel} · {shape}\n({dims}) · {mode}", fontsize=10)
    dev = results["device"]
    title = (f"{dev['name']} · {results['settings']['dtype']} · commit {results['commit']} · "
             f"{results['created'][:10]}")
    if dev["type"] != "cuda":
        title += "\nCPU smoke run: not performance"
    fig.suptitle(title, fontsize=11)
    legend = {}  # one legend for the figure: a provider has the same colour in every panel
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncols=min(len(legend), 8), fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _fmt_n(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _lines(ax, sel: list[dict], key: str) -> bool:
    """One line per provider through its measured points; 'OOM' marks; True if anything drawn."""
    drawn = False
    for prov in dict.fromkeys(c["provider"] for c in sel):
        pts = sorted((c["N"], c[key]) for c in sel
                     if c["provider"] == prov and c["status"] == "ok" and c[key] is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=4, label=prov, color=COLORS.get(prov))
            drawn = True
        for c in sel:
            if c["provider"] == prov and c["status"] == "OOM":
                ax.annotate(f"{prov} OOM", (c["N"], 0.97), xycoords=("data", "axes fraction"),
                            ha="center", va="top", fontsize=7, color=COLORS.get(prov, "k"), rotation=90)
    return drawn


def _draw_time(ax, sel: list[dict]) -> None:
    if _lines(ax, sel, "ms"):
        floor = sorted({(c["N"], c["floor_ms"]) for c in sel if c["floor_ms"]})
        if floor:
            ax.plot(*zip(*floor), ls="--", color="k", lw=1, label="floor (roofline)")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xscale("log", base=2)
    ax.set_ylabel("ms (median)")
    ax.grid(True, which="both", alpha=0.3)


def _draw_memory(ax, sel: list[dict]) -> None:
    if _lines(ax, sel, "peak_gb"):
        grads = sorted({(c["N"], c["grads_gb"]) for c in sel if c["grads_gb"]})
        if grads:  # what any backward must allocate: the floor of the peak
            ax.plot(*zip(*grads), ls=":", color="k", lw=1.2, label="gradients (memory floor)")
        ax.set_yscale("log")
        ax.set_ylabel("peak GB above inputs")
    else:
        reason = next((c["peak_reason"] for c in sel if c.get("peak_reason")), "not measured")
        ax.text(0.5, 0.5, "peak memory:\n" + reason.replace("; ", ";\n"), ha="center", va="center",
                transform=ax.transAxes, fontsize=8, wrap=True)
        ax.set_yticks([])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (packed tokens)")
    ax.grid(True, which="both", alpha=0.3)
