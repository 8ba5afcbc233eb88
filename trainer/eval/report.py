"""What `prolix eval` writes from its samples: summary.json, summary.md and, over checkpoints,
pass_at_k.png. Everything here is a function of the samples and the options alone, so a resumed
evaluation writes the same files as an uninterrupted one."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..evaluation import ProblemResult, summarize
from .options import EvalSpec

__all__ = ["SUMMARY_JSON", "SUMMARY_MD", "PLOT_FILE", "summary", "write_reports"]

SUMMARY_JSON, SUMMARY_MD, PLOT_FILE = "summary.json", "summary.md", "pass_at_k.png"
SCHEMA = "prolix-eval/1"


def summary(spec: EvalSpec, results: dict[tuple[int | None, str], Sequence[ProblemResult]]) -> dict:
    """The summary of `results` ((step, source) -> that source's problems, in order): per
    checkpoint and source, pass@k for every k, the mean reward, the mean response length, the
    truncated fraction and the problem and sample counts."""
    checkpoints = []
    for target in spec.targets:
        per_source = {name: summarize(results[(target.step, name)], spec.ks, spec.threshold)
                      for name in spec.sources if (target.step, name) in results}
        checkpoints.append({"step": target.step, "path": str(target.path), "sources": per_source})
    return {"schema": SCHEMA, "target": str(spec.target), "options": spec.fingerprint(), "k": list(spec.ks),
            "threshold": spec.threshold, "checkpoints": checkpoints}


def _markdown(s: dict) -> str:
    o = s["options"]
    ks = [f"pass@{k}" for k in s["k"]]
    lines = [f"# prolix eval: {s['target']}", "",
             f"{o['n']} samples per problem at temperature {o['temperature']}, top-p {o['top_p']}, at most "
             f"{o['max_tokens']} response tokens; engine {o['engine']}, seed {o['seed']}; a sample is correct when "
             f"its reward is >= {s['threshold']}.", "",
             "| step | source | " + " | ".join(ks) + " | mean reward | mean length | truncated | problems |",
             "|---|---|" + "---:|" * (len(ks) + 4)]
    for ckpt in s["checkpoints"]:
        step = "—" if ckpt["step"] is None else str(ckpt["step"])
        for name, m in ckpt["sources"].items():
            cells = [f"{m[k]:.3f}" for k in ks] + [f"{m['mean_reward']:.3f}", f"{m['response_len']:.1f}",
                                                    f"{m['truncated_frac']:.2f}", str(m["problems"])]
            lines.append(f"| {step} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "Sources: " + "; ".join(f"{name}: {text}" for name, text in o["sources"].items()), ""]
    return "\n".join(lines)


def _plot(s: dict, path: Path) -> Path | None:
    """pass@k against the training step, one panel per source (None without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [c for c in s["checkpoints"] if c["step"] is not None]
    names = list(dict.fromkeys(n for c in points for n in c["sources"]))
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [(c["step"], c["sources"][name]) for c in points if name in c["sources"]]
        for k in s["k"]:
            ax.plot([r[0] for r in rows], [r[1][f"pass@{k}"] for r in rows], marker="o", markersize=3,
                    label=f"pass@{k}")
        ax.set_title(name)
        ax.set_xlabel("training step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(spec: EvalSpec, results: dict[tuple[int | None, str], Sequence[ProblemResult]]) -> dict:
    """summary.json, summary.md and (--all-checkpoints) the plot in spec.out; returns the summary."""
    s = summary(spec, results)
    (spec.out / SUMMARY_JSON).write_text(json.dumps(s, indent=1) + "\n")
    (spec.out / SUMMARY_MD).write_text(_markdown(s))
    if spec.all_checkpoints:
        _plot(s, spec.out / PLOT_FILE)
    return s
