"""What the CPU step benchmarks (`rl_overlap.py`, `bitwise_step.py`) run: the demo's task on a
random demo-sized model, as `prolix train` overrides."""

from __future__ import annotations

from pathlib import Path

__all__ = ["random_demo_model", "workload"]


def workload(model: Path, out: Path, steps: int, quick: bool, prompts: int) -> list[str]:
    """`prolix train` overrides: no evaluation, no checkpoints, dynamic sampling off (one rollout
    call per step), `prompts` prompts a step in one mini-batch (4 and 24 tokens with `quick`)."""
    prompts = 4 if quick else prompts
    values = {"model.path": model, "run.out_dir": out, "run.steps": steps, "run.device": "cpu",
              "run.progress": "false", "run.tensorboard": "false", "run.checkpoint_every": 0,
              "eval.every": 0, "eval.at_start": "false", "algorithm.dynamic_sampling": "false",
              "rollout.max_tokens": 24 if quick else 48, "optim.prompts_per_step": prompts,
              "optim.mini_batch_prompts": prompts}
    return [f"{k}={v}" for k, v in values.items()]


def random_demo_model(folder: Path) -> Path:
    """A random demo-sized Qwen2 with the demo's tokenizer, saved as FOLDER/base_model."""
    from prolix.trainer import demo
    from prolix.trainer.config import load_config
    from prolix.trainer.model import save_policy
    from prolix.trainer.tokenizer import build_char_tokenizer, save_tokenizer

    tokenizer = build_char_tokenizer()
    path = folder / "base_model"
    save_policy(demo.build_model(load_config(), tokenizer), path)
    save_tokenizer(tokenizer, str(path))
    return path
