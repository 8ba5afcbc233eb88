"""The user's commands on the device: the `commands` section of `python -m prolix.benchmarks.device_check`.

Three commands, as a user types them, each in a process of its own so that a CUDA crash fails
that command (exit status and the end of its output recorded) instead of the whole check:

    prolix train model.path=OUT/model data.sources=[{kind: jsonl, path: OUT/sums.jsonl, ...}]
                 run.device=cuda rollout.engine=torch model.autocast=bf16 model.kernel_backend=triton
                 run.steps=4 run.checkpoint_every=2 ...
    prolix train --resume RUN run.steps=6
    prolix eval RUN --n 4 --k 1,4 --engine torch --out RUN/eval     # the run's held-out set

The model is a random Qwen2 (512 hidden, 4 layers, 8 heads) over the embedded demo's character
tokenizer, written by this section (no download, no reasoning-gym: the device image need not
have it), trained in bf16 autocast with the Triton LM head and, where liger-kernel is installed,
Liger's decoder kernels (`model.load_policy`); 16 prompts × 8 responses of 128 tokens a step,
every group trained on. Each command
runs through this module's `__main__`, which calls the `prolix` entry point and then reports
the process's peak CUDA memory. From RUN/metrics.jsonl each training command records steps/s,
training and generation tokens/s and MFU; the evaluation its samples and generated tokens per
second (model loading included) and its summary.

`--quick` (CPU, the test of the device check) runs the same three commands in this process with
the tests' tiny model: seconds, no numbers that mean anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

__all__ = ["run_commands", "write_model_and_data", "train_overrides", "markdown", "FULL_MODEL", "QUICK_MODEL"]

PEAK_LINE = "prolix-device-commands: peak_memory_gb="
# Head dim 64 (512 / 8 heads); long enough steps to time. The vocabulary is the character
# tokenizer's 101 tokens.
FULL_MODEL = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 4}
# The tests' tiny model (tests/conftest.py): seconds on a CPU.
QUICK_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1}
CONTEXT = 256


def write_model_and_data(out: Path, quick: bool) -> tuple[Path, Path]:
    """A random Qwen2 with the demo's character tokenizer in OUT/model, and 96 sums in
    OUT/sums.jsonl ("add 3 4" -> "7"): nothing to download, nothing beyond the trainer's own
    dependencies (no reasoning-gym)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from prolix.trainer.model import save_policy
    from prolix.trainer.tokenizer import build_char_tokenizer, save_tokenizer

    tokenizer = build_char_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=CONTEXT, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **(QUICK_MODEL if quick else FULL_MODEL))
    torch.manual_seed(0)
    model_dir, data = out / "model", out / "sums.jsonl"
    save_policy(AutoModelForCausalLM.from_config(config, dtype=torch.float32), model_dir)
    save_tokenizer(tokenizer, str(model_dir))
    data.write_text("".join(json.dumps({"prompt": f"add {i % 10} {i // 10}", "answer": str(i % 10 + i // 10)}) + "\n"
                            for i in range(96)))
    return model_dir, data


def train_overrides(out: Path, model_dir: Path, data: Path, quick: bool) -> list[str]:
    """The first `prolix train`: 4 steps (2 with --quick), a checkpoint every 2 (1), validation
    only at the end, on 32 held-out sums (4). Every group is trained on, rewards equal or not (no
    dynamic sampling): a random model scores 0 everywhere, and the update is what is timed."""
    steps, every, heldout = (2, 1, 4) if quick else (4, 2, 32)
    sizes = ["rollout.n=2", "rollout.max_tokens=8", "optim.prompts_per_step=2", "optim.mini_batch_prompts=1",
             "run.device=cpu"] if quick else \
        ["rollout.n=8", "rollout.max_tokens=128", "optim.prompts_per_step=16", "optim.mini_batch_prompts=8",
         "run.device=cuda", "model.autocast=bf16", "model.kernel_backend=triton"]
    return [f"model.path={model_dir}", f"data.sources=[{{kind: jsonl, path: {data}, reward: exact, "
            f"heldout_size: {heldout}}}]", "data.system_prompt=", *sizes, "rollout.engine=torch",
            "rollout.max_prompt_tokens=64", f"rollout.max_model_len={CONTEXT}", "algorithm.dynamic_sampling=false",
            f"run.out_dir={out}", "run.name=run", f"run.steps={steps}", f"run.checkpoint_every={every}",
            "eval.every=0", "eval.at_start=false", "eval.n=2", "eval.k=2", "run.progress=false",
            "run.tensorboard=false"]


def _in_process(argv: list[str]) -> tuple[int, str, float | None]:
    from prolix.trainer.cli import main

    return main(argv), "", None


def _subprocess(argv: list[str], timeout: float) -> tuple[int, str, float | None]:
    cmd = [sys.executable, "-m", "prolix.benchmarks.device_commands", *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out[-3000:] + f"\nstopped after {timeout:.0f} s (the section's budget)", None
    out = proc.stdout + proc.stderr
    peak = next((float(line[len(PEAK_LINE):]) for line in out.splitlines() if line.startswith(PEAK_LINE)), None)
    return proc.returncode, out[-3000:], peak


def _train_numbers(run: Path, first: int, last: int) -> dict:
    """steps/s, tokens/s and MFU of steps first..last from RUN/metrics.jsonl."""
    path = run / "metrics.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    steps = [r for r in records if first <= r.get("step", 0) <= last and r.get("perf/step_s")]
    if not steps:
        return {}

    def mean(key):
        values = [r[key] for r in steps if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {"steps": len(steps), "steps_per_s": len(steps) / sum(r["perf/step_s"] for r in steps),
            "train_tokens_per_s": mean("perf/train_tokens_per_s"),
            "rollout_tokens_per_s": mean("perf/rollout_tokens_per_s"), "mfu": mean("perf/mfu"),
            "eval_score": next((r["eval/score"] for r in reversed(steps) if r.get("eval/score") is not None), None)}


def _eval_numbers(out: Path, seconds: float) -> dict:
    samples = out / "samples.jsonl"
    if not samples.is_file():
        return {}
    lengths = [s["length"] for line in samples.read_text().splitlines() for s in json.loads(line)["samples"]]
    summary = json.loads((out / "summary.json").read_text())
    return {"samples": len(lengths), "samples_per_s": len(lengths) / seconds,
            "generated_tokens_per_s": sum(lengths) / seconds, "summary": summary["checkpoints"]}


def _commands(out: Path, quick: bool) -> list[tuple[str, list[str], tuple[int, int] | None]]:
    """(name, argv of `prolix`, steps whose numbers it records) of the three commands."""
    run = out / "run"
    first, resumed = (2, 3) if quick else (4, 6)
    n = "2" if quick else "4"
    model_dir, data = write_model_and_data(out, quick)
    return [("train", ["train", *train_overrides(out, model_dir, data, quick)], (1, first)),
            ("resume", ["train", "--resume", str(run), f"run.steps={resumed}"], (first + 1, resumed)),
            ("eval", ["eval", str(run), "--n", n, "--k", f"1,{n}", "--engine", "torch", "--out", str(run / "eval")],
             None)]


def run_commands(ck, budget: float) -> dict:
    """The section: each command in turn (on CUDA in a process of its own; --quick or without
    CUDA in this process, at the tests' size), its status and numbers in ck.results["commands"];
    a failed command stops the section."""
    out = ck.out / f"{ck.stem.name}-commands"
    ck.results["commands"] = rows = []
    end = time.monotonic() + budget
    quick = ck.quick or ck.device.type != "cuda"            # the GPU sizes want a GPU
    for name, argv, steps in _commands(out, quick):
        t0 = time.monotonic()
        status, tail, peak = _in_process(argv) if quick else _subprocess(argv, end - t0)
        seconds = time.monotonic() - t0
        row = {"command": name, "argv": "prolix " + " ".join(argv), "exit": status, "seconds": round(seconds, 1),
               "peak_memory_gb": peak, "status": "ok" if status == 0 else "error", "tail": tail}
        row.update(_train_numbers(out / "run", *steps) if steps else _eval_numbers(out / "run" / "eval", seconds))
        rows.append(row)
        ck.save()
        if status != 0:
            print(f"device_check: FAIL: `prolix {name}` exited with {status}:\n{tail}", file=sys.stderr, flush=True)
            return {"status": "error", "reason": f"prolix {name} exited with status {status} (see its tail)"}
    return {"status": "ok", "reason": None}


def markdown(rows: list[dict]) -> list[str]:
    """The section's table for the device check's report."""
    def f(x, fmt=".3g"):
        return "—" if x is None else format(x, fmt)

    lines = ["## Commands", "", "| command | exit | seconds | steps/s | train tok/s | generation tok/s | MFU | "
             "peak GB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gen = r.get("rollout_tokens_per_s", r.get("generated_tokens_per_s"))
        lines.append(f"| {r['command']} | {r['exit']} | {r['seconds']} | {f(r.get('steps_per_s'))} | "
                     f"{f(r.get('train_tokens_per_s'))} | {f(gen)} | {f(r.get('mfu'))} | {f(r['peak_memory_gb'])} |")
    return lines + [""]


def main(argv: list[str]) -> int:
    """`prolix ARGV` in this process, then its peak CUDA memory on one line."""
    from prolix.trainer.cli import main as prolix_main

    status = prolix_main(argv)
    if torch.cuda.is_available():
        print(f"{PEAK_LINE}{torch.cuda.max_memory_allocated() / 2**30:.3f}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
