"""`prolix bench` runs end to end on CPU and writes results that a person and a script can read.

The smoke run is the one CI affords: `prolix bench all --quick` at the `tiny` shape, in this
process, through the CLI's own entry function. Its numbers mean nothing; what is checked is the
contract of the results: every case has every key, every baseline was measured or skipped with
a reason (never silently dropped), every measured provider matched the float64 reference, and
the table and plot exist and re-render from the JSON alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prolix.benchmarks.cases import KERNELS
from prolix.benchmarks.providers import BASELINES, PROVIDERS
from prolix.benchmarks.runner import CASE_KEYS, SCHEMA
from prolix.trainer.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOP_KEYS = {"schema", "created", "command", "commit", "device", "versions", "ceilings", "settings",
            "cases", "extras"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "all", "--quick", "--out", str(out)]) == 0
    (path,) = out.glob("*.json")
    return path, json.loads(path.read_text())


def test_results_json_has_the_schema(quick_run):
    path, results = quick_run
    assert TOP_KEYS <= results.keys()
    assert results["schema"] == SCHEMA
    assert results["command"].startswith("prolix bench all --quick")
    assert results["ceilings"]["matmul_tflops"] > 0 and results["ceilings"]["copy_gbps"] > 0
    assert results["versions"]["torch"] == torch.__version__
    assert path.name.endswith(f"-{results['commit']}.json")
    assert results["cases"]
    for case in results["cases"]:
        assert set(CASE_KEYS) <= case.keys(), set(CASE_KEYS) - case.keys()
        assert case["status"] in ("ok", "skipped", "OOM"), (case["provider"], case["reason"])


def test_every_baseline_is_measured_or_skipped_with_a_reason(quick_run):
    _, results = quick_run
    for kernel in KERNELS:
        seen = {c["provider"] for c in results["cases"] if c["kernel"] == kernel}
        assert seen == {p.name for p in PROVIDERS[kernel]}, kernel
        covered = {p.baseline for p in PROVIDERS[kernel] if p.baseline}
        assert covered == set(BASELINES), kernel
    for case in results["cases"]:
        if case["status"] != "ok":
            assert case["reason"] and case["reason"].strip(), case


def test_measured_cases_are_checked_timed_and_compared(quick_run):
    _, results = quick_run
    ok = [c for c in results["cases"] if c["status"] == "ok"]
    assert {c["provider"] for c in ok} >= {"prolix", "eager"}
    for c in ok:
        assert 0 < c["ms_p20"] <= c["ms"] <= c["ms_p80"], c
        assert c["err_vs"] == "fp64" and c["check_ok"], (c["provider"], c["errors"])
        assert c["floor_frac"] > 0 and c["gbps"] > 0
        if results["device"]["type"] == "cpu":
            assert c["peak_gb"] is None and c["peak_reason"]  # no allocator statistics
        else:
            assert c["peak_gb"] is not None and c["peak_gb"] >= 0
        others = {o["provider"] for o in ok if o is not c and
                  (o["kernel"], o["shape"], o["N"], o["mode"]) == (c["kernel"], c["shape"], c["N"], c["mode"])}
        assert set(c["vs"]) == others
    prolix = [c for c in results["cases"] if c["provider"] == "prolix"]
    assert prolix and all(c["status"] == "ok" for c in prolix)


def test_table_and_plot_exist_and_rerender_from_the_json(quick_run, tmp_path):
    path, _ = quick_run
    md, png = path.with_suffix(".md"), path.with_suffix(".png")
    text = md.read_text()
    for kernel in KERNELS:
        assert f"## {kernel}" in text
    assert "CPU run" in text and "not performance" in text  # a CPU run says so
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert main(["bench", "render", str(path), "--out", str(tmp_path)]) == 0
    assert (tmp_path / md.name).read_text() == text
    assert (tmp_path / png.name).read_bytes().startswith(PNG_MAGIC)


def test_gpu_style_results_render_memory_and_oom(quick_run, tmp_path):
    """The GPU branches of the renderer (peak memory lines, OOM rows) on synthetic numbers."""
    _, results = quick_run
    results = json.loads(json.dumps(results))
    results["device"] = {"name": "synthetic GPU", "type": "cuda"}
    for i, c in enumerate(results["cases"]):
        if c["status"] == "ok":
            c["peak_gb"], c["peak_reason"] = 0.01 * (i + 1), None
    oom = next(c for c in results["cases"] if c["provider"] == "eager" and c["status"] == "ok")
    oom.update(status="OOM", reason="OutOfMemoryError: CUDA out of memory", ms=None)
    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps(results))
    assert main(["bench", "render", str(path)]) == 0
    text = path.with_suffix(".md").read_text()
    assert "**OOM**" in text and "CPU run" not in text
    assert path.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)


def test_bad_options_are_refused_with_the_option_named(tmp_path, capsys):
    assert main(["bench", "linear-logprobs", "--shape", "gpt-5", "--out", str(tmp_path)]) == 2
    assert "--shape" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "fused-grpo", "--shape", "llama-8b", "--out", str(tmp_path)]) == 2
        assert "--quick" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_help_is_fast_and_imports_no_torch():
    code = ("import sys; from prolix.trainer.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'prolix --help must not import torch'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    out = subprocess.run([sys.executable, "-m", "prolix.trainer.cli", "bench", "--help"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "linear-logprobs" in out and "render" in out
