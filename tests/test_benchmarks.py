"""`prolix bench` runs end to end on CPU and writes results that a person and a script can read.

The smoke run is the one CI affords: `prolix bench all --quick` at the `tiny` shape (kernels and
the trainer step), in this process, through the CLI's own entry function, every baseline asked
for. Its numbers mean nothing; what is checked is the contract of the results: every case has
every key, every baseline was measured or skipped with a reason (never silently dropped), every
measured provider matched the float64 reference, and the table and plot exist and re-render
from the JSON alone. Separately, on small fp32 inputs, the baselines that lay the batch out
differently (TRL's padded [B, C] batch, Liger's, a ragged trainer batch) compute the same loss
and gradients as prolix: what makes their timings comparable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prolix.benchmarks import cases as C
from prolix.benchmarks import check, runner
from prolix.benchmarks import train_step as TS
from prolix.benchmarks.provider_types import Context, Skip
from prolix.benchmarks.providers import BASELINES, PROVIDERS, bench_config, grad_output, leaves
from prolix.benchmarks.runner import ALL_KERNELS, SCHEMA
from prolix.benchmarks.sweep import CASE_KEYS
from prolix.trainer.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOP_KEYS = {"schema", "created", "command", "commit", "device", "versions", "ceilings", "settings",
            "cases", "extras"}
MODEL_KEYS = {"family", "layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "tied", "params",
              "flop_params", "param_dtype", "autocast", "attn_backend", "gradient_checkpointing",
              "seq_lengths", "prompt_lengths"}
HAS_TRL = importlib.util.find_spec("trl") is not None
TRL_PROVIDERS = ("trl", "trl-chunked", "trl+prolix")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    # Every baseline asked for, whatever the CLI's default: a missing one must say why.
    assert main(["bench", "all", "--quick", "--out", str(out), "--baselines", ",".join(BASELINES)]) == 0
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
    assert {c["kernel"] for c in results["cases"]} == set(ALL_KERNELS)
    for kernel in ALL_KERNELS:
        seen = {c["provider"] for c in results["cases"] if c["kernel"] == kernel}
        assert seen == {p.name for p in PROVIDERS[kernel]}, kernel
        covered = {p.baseline for p in PROVIDERS[kernel] if p.baseline}
        assert covered == set(BASELINES), kernel
    for case in results["cases"]:
        if case["status"] != "ok":
            assert case["reason"] and case["reason"].strip(), case
        if case["provider"] in TRL_PROVIDERS and not HAS_TRL:
            assert case["status"] == "skipped", case
    if HAS_TRL:  # TRL's own GRPO path runs on CPU too: measured in the head and the step
        for kernel in ("fused-grpo", "train"):
            measured = {c["provider"] for c in results["cases"] if c["kernel"] == kernel and c["status"] == "ok"}
            assert set(TRL_PROVIDERS) <= measured, kernel


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
    for kernel in ALL_KERNELS:
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
            if c["kernel"] == "train":
                c["mfu"] = 0.4321
    oom = next(c for c in results["cases"] if c["provider"] == "eager" and c["status"] == "ok")
    oom.update(status="OOM", reason="OutOfMemoryError: CUDA out of memory", ms=None)
    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps(results))
    assert main(["bench", "render", str(path)]) == 0
    text = path.with_suffix(".md").read_text()
    assert "**OOM**" in text and "CPU run" not in text
    assert "| 43.2 |" in text  # the trainer step's MFU column
    assert path.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)


def test_bad_options_are_refused_with_the_option_named(tmp_path, capsys):
    assert main(["bench", "linear-logprobs", "--shape", "gpt-5", "--out", str(tmp_path)]) == 2
    assert "--shape" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "fused-grpo", "--shape", "llama-8b", "--out", str(tmp_path)]) == 2
        assert "--quick" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("option, text, bad", [("--tokens", "4096,abc", "'abc'"), ("--tokens", "4096,1.5", "'1.5'"),
                                               ("--seq-len", "many", "'many'")])
def test_a_malformed_list_or_number_option_is_a_usage_error(option, text, bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "linear-logprobs", option, text, "--out", str(tmp_path)])
    assert exit_info.value.code == 2                                 # argparse's usage error, no traceback
    err = capsys.readouterr().err
    assert f"argument {option}" in err and bad in err, err
    assert not list(tmp_path.iterdir())


def test_cli_help_is_fast_and_imports_no_torch():
    code = ("import sys; from prolix.trainer.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'prolix --help must not import torch'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    out = subprocess.run([sys.executable, "-m", "prolix.trainer.cli", "bench", "--help"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "linear-logprobs" in out and "render" in out


# ----------------------------------------------------------------------------- the reward pool


def test_reward_pool_bench_quick_writes_checked_rows_per_reward_and_worker_count(tmp_path, capsys):
    from prolix.benchmarks import reward_pool as RP

    # `prolix bench reward-pool`; each row's scores were checked (right 1.0, wrong 0.0, equal to
    # the 0-worker ones) before it was timed, or the run would have raised.
    assert main(["bench", "reward-pool", "--quick", "--workers", "0,1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-reward-pool-*.json")
    results = json.loads(path.read_text())
    assert results["schema"] == RP.SCHEMA and results["quick"] and results["reps"] == 1
    rows = {(r["kind"], r["workers"]): r for r in results["rows"]}
    assert set(rows) == {(kind, w) for kind in ("exact", "math_verify", "code_tests") for w in (0, 1)}
    assert all(r["responses"] > 0 and r["responses_per_s"] > 0 and r["start_s"] >= 0 for r in rows.values())
    assert rows[("code_tests", 0)]["speedup_vs_0"] == 1.0
    assert results["conditions"]["before"]["cpus"] == os.cpu_count()
    table = path.with_suffix(".md").read_text()
    assert "| code_tests | 1 | 4 |" in table and "CPU numbers" in table
    assert main(["bench", "reward-pool", "--workers", "0,-1", "--out", str(tmp_path / "bad")]) == 2  # usage error
    assert "--workers must be a non-empty list of ints >= 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- the trainer step


def test_trainer_step_rows_validate(quick_run):
    """`train` rows: one packed forward+backward of the tiny Qwen2 per provider, N tokens exactly,
    a ragged batch of several sequences, and tokens/s, model FLOPs and MFU consistent with it."""
    from prolix.trainer.metrics import train_flops

    _, results = quick_run
    rows = [c for c in results["cases"] if c["kernel"] == "train"]
    assert {(c["shape"], c["N"]) for c in rows} == {("tiny", n) for n in C.QUICK_TOKENS}
    assert {c["provider"] for c in rows} == {p.name for p in PROVIDERS["train"]}
    on_cuda = results["device"]["type"] == "cuda"
    ok = [c for c in rows if c["status"] == "ok"]
    assert {"prolix", "eager", "liger"} <= {c["provider"] for c in ok}
    for c in ok:
        m = c["model"]
        assert set(m) == MODEL_KEYS and m["layers"] == TS.MODEL_SHAPES["tiny"].layers
        assert (c["mode"], c["H"], c["V"]) == ("fwdbwd", m["hidden"], m["vocab"])
        assert c["dtype"] == ("bf16" if on_cuda else "fp32")   # the trainer's autocast=auto
        lengths = m["seq_lengths"]
        assert sum(lengths) == c["N"] and len(lengths) == c["S"] >= 2 and max(lengths) == c["L"]
        assert len(set(lengths)) > 1 and all(0 < p < n for p, n in zip(m["prompt_lengths"], lengths))
        head_dim = m["hidden"] // m["heads"]
        assert c["flop"] == pytest.approx(train_flops(m["flop_params"], m["layers"], m["heads"] * head_dim, lengths))
        assert c["flop"] > 6 * m["flop_params"] * c["N"]                # + attention
        assert c["tokens_per_s"] == pytest.approx(c["N"] / (c["ms"] * 1e-3))
        assert c["grads_gb"] == pytest.approx(4 * m["params"] / 1e9)     # fp32 master weights
        if on_cuda:
            assert 0 < c["mfu"] < 1
        else:
            assert c["mfu"] is None
    for c in results["cases"]:
        if c["kernel"] != "train":
            assert c["model"] is None and c["mfu"] is None
            assert c["status"] != "ok" or c["tokens_per_s"] == pytest.approx(c["N"] / (c["ms"] * 1e-3))
    text = Path(quick_run[0]).with_suffix(".md").read_text()
    assert "| tokens/s | MFU |" in text and "- **tiny** N=512: qwen2 2 layers" in text


def test_packed_lengths_fill_the_budget_with_a_long_tailed_mix():
    for budget in (2, 3, 128, 512, 4096, 16384, 131072):
        pairs = TS.sample_lengths(budget, seed=0)
        assert sum(p + r for p, r in pairs) == budget, budget
        assert all(p >= 1 and r >= 1 for p, r in pairs)
    pairs = TS.sample_lengths(16384, seed=0)
    lengths = [p + r for p, r in pairs]
    assert len(pairs) >= 3 and max(lengths) > 2 * min(lengths)     # several, of varied lengths
    assert TS.sample_lengths(16384, seed=0) == pairs                # deterministic


def test_train_shapes_are_model_shapes_and_cpu_sized():
    cpu = torch.device("cpu")
    spec = runner.Spec(kernels=("train",), shapes=("llama-8b",), tokens=(128,))
    with pytest.raises(runner.SpecError, match="--shape"):
        runner.validate(spec, cpu)
    spec = runner.Spec(kernels=("train",), shapes=("qwen-0.5b",), tokens=(128,))
    with pytest.raises(runner.SpecError, match="--quick"):
        runner.validate(spec, cpu)
    runner.validate(runner.Spec(kernels=("train",), shapes=("tiny",), tokens=(512,), quick=True), cpu)
    assert runner.default_shapes(("train",), quick=False) == TS.DEFAULT_MODELS
    assert runner.default_shapes(("train",), quick=True) == ("tiny",)
    # `all` runs the step too, at the model shapes among --shape (here the tiny head's namesake)
    spec = runner.Spec(kernels=C.KERNELS, shapes=("tiny",), tokens=(128,), quick=True)
    assert runner.run_kernels(spec, with_packing=True) == ALL_KERNELS
    assert TS.model_shapes(spec.shapes, spec.quick) == ("tiny",)
    assert TS.model_shapes(("qwen-1.5b", "llama-8b"), False) == ("qwen-1.5b",)


# ----------------------------------------------------------------------------- parity of the baselines


def _answer(kernel: str, provider, inp, ctx) -> dict:
    try:
        fwd = provider.build(inp, ctx)
    except Skip as e:
        pytest.skip(f"{provider.name}: {e}")
    return check.run_once(fwd, leaves(kernel, inp), grad_output(kernel, inp), True)


def _assert_same(kernel: str, got: dict, want: dict, what: str) -> None:
    """fp32: the value and every gradient within 1e-5 of prolix's, relative to prolix's scale."""
    errors = {name: check.relative_error(g, w) for name, g, w in
              zip(("out", *check.GRAD_NAMES[kernel]), (got["out"], *got["grads"]), (want["out"], *want["grads"]))}
    assert max(errors.values()) < 1e-5, (what, errors)


@pytest.mark.skipif(not HAS_TRL, reason="trl is not installed")
@pytest.mark.parametrize("kernel", C.KERNELS)
def test_trl_baselines_compute_prolix_loss_and_gradients(kernel):
    """TRL's own code (GRPOTrainer._compute_loss, selective_log_softmax, ChunkedLogProbFunction,
    and prolix's TRL integration) on TRL's padded batch gives prolix's answer on the packed one:
    N = 320 as 5 sequences of 64 (1/8 prompt), fp32, the bench's DAPO objective."""
    ctx = Context(device=torch.device("cpu"), config=bench_config(), quick=True)
    shape = C.LOSS_SHAPE if kernel == "grpo-loss" else C.SHAPES["tiny"]
    inp = C.make_inputs(shape, 320, torch.float32, ctx.device, seq_len=64)
    providers = {p.name: p for p in PROVIDERS[kernel]}
    want = _answer(kernel, providers["prolix"], inp, ctx)
    measured = 0
    for name in TRL_PROVIDERS:
        try:
            fwd = providers[name].build(inp, ctx)
        except Skip as e:
            assert "prolix" in str(e) or "grpo-loss" in str(e), (name, e)   # by design, not by accident
            continue
        got = check.run_once(fwd, leaves(kernel, inp), grad_output(kernel, inp), True)
        _assert_same(kernel, got, want, name)
        measured += 1
    assert measured >= 1


@pytest.mark.parametrize("provider", ["eager", "liger", *TRL_PROVIDERS])
def test_padded_baselines_compute_prolix_loss_on_a_ragged_trainer_batch(provider):
    """The trainer step's batch is ragged, so Liger and TRL get it zero-padded to [S, L_max]:
    same loss and head gradients as the trainer's own fused call, on the model's hidden states."""
    if provider in TRL_PROVIDERS and not HAS_TRL:
        pytest.skip("trl is not installed")
    ctx = Context(device=torch.device("cpu"), config=bench_config(), quick=True)
    setup = TS.TrainSetup.build(TS.MODEL_SHAPES["tiny"], 384, torch.float32, ctx.device)
    inp = setup.check_inputs()
    assert inp.pad_index is not None and inp.S >= 2 and inp.S * inp.L > inp.N   # really padded
    providers = {p.name: p for p in PROVIDERS["train"]}
    want = _answer("fused-grpo", providers["prolix"], inp, ctx)
    _assert_same("fused-grpo", _answer("fused-grpo", providers[provider], inp, ctx), want, provider)


# ----------------------------------------------------------------------------- the device check


@pytest.fixture(scope="module")
def device_check_run(tmp_path_factory) -> tuple[Path, dict]:
    from prolix.benchmarks import device_check

    out = tmp_path_factory.mktemp("device_check")
    path = device_check.run(out, quick=True, command="python -m prolix.benchmarks.device_check --quick")
    return path, json.loads(path.read_text())


def test_device_check_writes_json_markdown_and_png(device_check_run):
    from prolix.benchmarks.device_check import SCHEMA as DC_SCHEMA
    from prolix.benchmarks.device_check import SECTIONS

    path, r = device_check_run
    assert r["schema"] == DC_SCHEMA and r["quick"] is True
    assert {"created", "command", "commit", "device", "versions", "plan", "ceilings", "sections", "tests",
            "gemm", "cases", "configs", "breakdown", "targets", "elapsed_s"} <= r.keys()
    assert list(r["sections"]) == [s.name for s in SECTIONS]
    for name, sec in r["sections"].items():
        assert sec["status"] in ("ok", "skipped"), (name, sec)
        assert sec["seconds"] >= 0 and (sec["status"] == "ok" or sec["reason"]), (name, sec)
    if not torch.cuda.is_available():
        assert "needs CUDA" in r["sections"]["breakdown"]["reason"]
    assert path.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)
    text = path.with_suffix(".md").read_text()
    assert "## Targets" in text and "| verdict |" in text
    if r["device"]["type"] == "cpu":
        assert "not performance" in text


def test_device_check_measures_against_the_gemm_of_the_same_shape(device_check_run):
    from prolix.kernels.linear_logprob import CONFIG_VARIANTS

    _, r = device_check_run
    assert r["gemm"] and all(g["status"] == "ok" and g["ms"] > 0 for g in r["gemm"])
    kernels = [c for c in r["cases"] if c["kernel"] in ("linear-logprobs", "fused-grpo")]
    assert {c["kernel"] for c in kernels} == {"linear-logprobs", "fused-grpo"}
    for c in kernels:
        assert set(CASE_KEYS) <= c.keys()
        if c["status"] == "ok":
            assert c["check_ok"] and c["gemm_ratio"] == pytest.approx(c["ms"] / c["gemm_ms"])
        else:
            assert c["status"] == "skipped" and c["reason"], c
    assert {c["provider"] for c in kernels if c["status"] == "ok"} >= {"prolix", "eager"}
    assert {c["kernel"] for c in r["cases"]} >= {"train"}
    # Every configuration set ran the same inputs; they agree to fp32 rounding.
    assert {x["variant"] for x in r["configs"] if x["status"] == "ok"} == set(CONFIG_VARIANTS)
    assert all(x["max_abs_diff_vs_v2"] < 1e-4 for x in r["configs"] if x["variant"] != "v2")
    assert r["tests"] and r["tests"][0]["summary"]


def test_device_check_targets_pass_or_fail_only_on_cuda(device_check_run):
    from prolix.benchmarks.device_report import TARGETS, evaluate_targets

    _, r = device_check_run
    assert len(r["targets"]) == len(TARGETS) * len({g["shape"] for g in r["gemm"]})
    assert {t["verdict"] for t in r["targets"]} == {"n/a"}  # CPU: never PASS or FAIL
    synthetic = json.loads(json.dumps(r))
    synthetic["device"]["type"] = "cuda"
    for c in synthetic["cases"]:
        if c["status"] == "ok" and c["provider"] == "prolix" and c["mode"] == "fwdbwd":
            c["gemm_ratio"] = 3.0 if c["kernel"] == "fused-grpo" else 5.0  # fused passes, generic fails
            c["peak_gb"], c["grads_gb"], c["extra_gb"] = 3.0, 1.0, 2.0
    verdicts = {t["target"]: t["verdict"] for t in evaluate_targets(synthetic)}
    assert verdicts["fused GRPO fwd+bwd"] == "PASS"
    assert verdicts["generic linear_logprobs fwd+bwd"] == "FAIL"
    assert verdicts["extra memory at 16k"] == verdicts["extra memory flat to 64k"] == "PASS"


def test_device_check_bitwise_head_holds_the_bits_and_times_both_modes(device_check_run):
    path, r = device_check_run
    rec = r["bitwise_head"]
    bits = rec["bits"]
    T = bits["row_block"]
    assert bits["ok"] and {1, T - 1, T, T + 1} <= set(bits["N"])
    assert bits["invariant"] == [0] * len(bits["N"]) and len(bits["default"]) == len(bits["N"])
    assert bits["fused_logp_mismatches"] == 0 and bits["gradient_mismatches"] == 0
    assert [c["stage"] for c in rec["cost"]] == ["logprobs fwd", "logprobs fwdbwd", "fused fwdbwd"]
    assert all(c["default_ms"] > 0 and c["ratio"] == pytest.approx(c["invariant_ms"] / c["default_ms"])
               for c in rec["cost"])
    assert "## Batch-invariant head" in path.with_suffix(".md").read_text()


def test_device_check_out_of_budget_records_every_section_as_skipped(tmp_path):
    from prolix.benchmarks import device_check

    path = device_check.run(tmp_path, quick=True, budget_s=1e-3)
    r = json.loads(path.read_text())
    assert r["sections"] and all(s["status"] == "skipped" and "budget" in s["reason"] or "CUDA" in s["reason"]
                                 for s in r["sections"].values())
    assert path.with_suffix(".md").exists()


def test_rl_overlap_writes_json_markdown_and_png(tmp_path):
    """`prolix bench rl-overlap` end to end on the smallest workload: one calibration run, one
    measured step per run."""
    from prolix.trainer.cli import main

    assert main(["bench", "rl-overlap", "--steps", "3", "--passes", "1", "--calibrations", "1", "--quick",
                 "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("*-rl-overlap-*.json")
    results = json.loads(path.read_text())
    runs = results["runs"]
    assert set(runs) == {"colocated", "split_k0", "split_k1"} and all(r["steps"] == 1 for r in runs.values())
    assert runs["colocated"]["lag_max_any"] == runs["split_k0"]["lag_max_any"] == 0
    assert runs["split_k1"]["lag_max_any"] == 1                # step 3 trains on version 1
    g, t = results["generation_s"], results["train_s"]
    assert results["ratios"]["split_k1_vs_max"] == pytest.approx(runs["split_k1"]["step_s"] / max(g, t))
    assert path.with_suffix(".md").read_text().startswith("# rl-overlap")
    assert path.with_suffix(".png").stat().st_size > 0


def test_rl_overlap_refuses_too_few_steps(tmp_path, capsys):
    from prolix.trainer.cli import main

    assert main(["bench", "rl-overlap", "--steps", "2", "--out", str(tmp_path)]) == 2
    assert "--steps: expected > 2" in capsys.readouterr().err
    assert main(["bench", "rl-overlap", "--steps", "3", "--calibrations", "0", "--out", str(tmp_path)]) == 2
    assert "--calibrations: expected >= 1, got 0" in capsys.readouterr().err
