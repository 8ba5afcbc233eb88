"""Where a benchmark's results go: `<out>/<UTC YYYYMMDD-HHMMSS>-<kind>-<commit>.json`, the
markdown table beside it as `.md` and, when the benchmark draws one, a `.png`. `out` defaults
to `benchmarks/results/`. Torch-free: the reward pool's spawned workers import its callers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def write_results(results: dict, kind: str, table: str, out: Path | None = None,
                  plot: Callable[[dict, Path], None] | None = None) -> Path:
    """Write `results` (with its "commit"), `table` and `plot(results, png)`, print the table
    and the files written; returns the path stem."""
    out = out or DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{kind}-{results['commit']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table)
    if plot is not None:
        plot(results, stem.with_suffix(".png"))
    print(table.rstrip("\n"))
    print(f"wrote {stem}.json, .md" + (" and .png" if plot is not None else ""))
    return stem
