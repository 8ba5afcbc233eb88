"""The embedded default (`prolix train` with no arguments), shrunk to seconds: it builds its
model and tokenizer from nothing, warm-starts, runs GRPO, and leaves a complete run directory
behind, with the held-out accuracy before and after as its last line.

Whether RL *raises* the accuracy is measured by running the real demo (`make train`, minutes),
not here: a test-sized run is too short to show it.
"""

import random
import re

import pytest
import torch
from trainer_testing import SMALL_DEMO

from prolix.trainer import demo
from prolix.trainer.config import load_config
from prolix.trainer.data import prepare_data
from prolix.trainer.tokenizer import load_tokenizer
from prolix.trainer.train import main as train_main

pytest.importorskip("reasoning_gym")


pytestmark = pytest.mark.usefixtures("one_thread")          # conftest.py: tiny models, one thread


def test_demo_run_prints_accuracy_last_and_leaves_a_complete_run_dir(tmp_path, capsys):
    assert train_main([f"run.out_dir={tmp_path}", "run.name=demo", *SMALL_DEMO]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"held-out accuracy: [01]\.\d\d -> [01]\.\d\d", lines[-1]), lines[-1]
    run = tmp_path / "demo"
    assert lines[-2] == f"run directory: {run}"
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "base_model/config.json",
                 "base_model/tokenizer.json", "checkpoints/latest", "checkpoints/step_000002/model.safetensors"):
        assert (run / name).is_file(), name
    # the saved config points at the built model, so the run can be resumed or repeated as is
    assert load_config(run / "config.yaml").model.path == str(run / "base_model")


def test_char_tokenizer_survives_a_qwen2_model_directory(tmp_path, capsys):
    """transformers 5's AutoTokenizer swaps in Qwen2Tokenizer for qwen2 model dirs, which
    would drop every space; `load_tokenizer` loads what the files declare."""
    assert train_main([f"run.out_dir={tmp_path}", "run.name=tok", *SMALL_DEMO, "run.steps=0"]) == 0
    tokenizer = load_tokenizer(tmp_path / "tok" / "base_model")
    text = "9 - 5 = 4\n<answer>4</answer>"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_warm_start_learns_the_worked_answers(tmp_path):
    cfg = load_config(None, [*SMALL_DEMO, "demo.warmup_steps=30", "demo.warmup_batch=8", "demo.warmup_lr=3e-3",
                             "demo.hidden_size=64",
                             "demo.intermediate_size=128"])
    data = prepare_data(cfg)
    tokenizer = demo.build_char_tokenizer(demo.DEFAULT_ALPHABET)
    model = demo.build_model(cfg, tokenizer)
    first, last = demo.warm_start(model, tokenizer, cfg, data, device=torch.device("cpu"), log=lambda *_: None)
    assert last < 0.5 * first, (first, last)


def test_warm_start_teaches_two_answer_styles_and_only_the_tagged_one_scores():
    """The warm start mixes "<answer>X</answer>" (read by the scorer) with "The answer is X."
    (reward 0), so RL has a habit to find out about from the reward alone."""
    from prolix.trainer.rewards import score

    cfg = load_config(None, SMALL_DEMO)
    data = prepare_data(cfg)
    rng = random.Random(0)
    problems = data.train.sample(400, rng)
    texts = [demo.warm_start_answer(p, rng, 0.3) for p in problems]
    tagged = [t.endswith("</answer>") for t in texts]
    assert 0.3 - 0.08 < sum(tagged) / len(texts) < 0.3 + 0.08              # ~5 standard deviations
    for problem, text, is_tagged in zip(problems, texts, tagged):
        work = text.rsplit("\n", 1)[0]
        assert work == demo.worked_answer(problem).rsplit("\n", 1)[0]   # the same working either way
        assert score(problem, text) == float(is_tagged), text
        if not is_tagged:
            assert text.endswith(f"The answer is {problem.answer}.")
    assert all(demo.warm_start_answer(p, rng, 1.0).endswith("</answer>") for p in problems[:20])
    assert not any(demo.warm_start_answer(p, rng, 0.0).endswith("</answer>") for p in problems[:20])
