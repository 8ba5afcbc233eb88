"""The embedded default of `make train`: a model built from nothing, so RL needs no download.

`build_base_model(cfg, run_dir, data)` writes RUN/base_model, which `model.path` then points at:

1. a character-level tokenizer (`tokenizer.build_char_tokenizer`, printable ASCII) in HF format;
2. a tiny Qwen2-architecture causal LM from a config (`demo.*`: hidden 128, 2 layers, 4 query /
   2 KV heads, tied embeddings: 0.5M parameters), context = rollout.max_model_len;
3. a short supervised warm start on the task's own worked answers (`worked_answer`:
   "4 - 1 = 3\n3 + 7 = 10\n<answer>10</answer>"), drawn from the training split, never the
   held-out one; AdamW, lr 1.5e-3 cosine to 10%. Half of its answers (`demo.tagged_fraction`)
   end in the "<answer>X</answer>" tag the scorer reads; the other half end in "The answer is
   X.", which scores 0 however right X is (`warm_start_answer`).

Then the ordinary trainer runs GRPO on it (torch sampler on CPU, vLLM where installed), and
`prolix train` prints the held-out accuracy before and after RL.

What RL has to learn. The base model leaves the warm start with two habits and no way to know
which one pays; the reward alone tells it, and GRPO learns within a few dozen steps to always
tag its answer — the format lesson RL teaches real base models (DeepSeek-R1-Zero's format
reward), in miniature: over seeds 0-2, 80 steps raised held-out accuracy by 0.09 to 0.31
(README). The arithmetic itself improves far more slowly at a learning rate the tiny model
tolerates (1e-4; at 2e-4 accuracy fell).

The task is chain_sum with three one-digit terms ("4 - 1 + 7 ="): every held-out question is
new, but the one-step facts it needs ("3 + 7") also occur in training questions, so what RL
learns from rewards on training questions transfers. The reward is the dataset's scorer
thresholded at a full score: chain_sum's own scorer gives partial credit to an answer that
merely contains the gold string, which RL learns to exploit ("-4" for "4").
"""

from __future__ import annotations

import ast
import math
import operator
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from .config import TrainConfig
from .data import check_prompt_lengths
from .model import logprobs, prepare_policy, save_policy
from .packing import SequenceRecord, pack
from .problem import Problem
from .tokenizer import DEFAULT_ALPHABET, build_char_tokenizer, format_prompt, save_tokenizer

__all__ = ["build_base_model", "build_model", "warm_start", "warm_start_answer", "worked_answer", "WORKED_TASKS"]


def build_model(cfg: TrainConfig, tokenizer) -> torch.nn.Module:
    """A randomly initialised Qwen2 causal LM of the `demo` section's size (fp32, CPU)."""
    d = cfg.demo
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
        num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads,
        max_position_embeddings=cfg.rollout.max_model_len, tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.run.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return prepare_policy(model, liger=False)


def warm_start_answer(problem, rng: random.Random, tagged_fraction: float) -> str:
    """A worked answer ending, with probability `tagged_fraction`, in "<answer>X</answer>" (what
    the scorer reads) and otherwise in "The answer is X." (no tag: reward 0)."""
    text = worked_answer(problem)
    if rng.random() < tagged_fraction:
        return text
    tagged = f"<answer>{problem.answer}</answer>"
    assert text.endswith(tagged), text
    return text[: -len(tagged)] + f"The answer is {problem.answer}."


def warm_start(model, tokenizer, cfg: TrainConfig, data, *, device: torch.device, log=print) -> tuple[float, float]:
    """Supervised steps on worked answers; returns (first, last) mean loss per answer token."""
    d = cfg.demo
    rng = random.Random(cfg.run.seed + 2)            # its own draws: the RL sampler's stream is untouched
    optimizer = torch.optim.AdamW(model.parameters(), lr=d.warmup_lr, weight_decay=0.0)
    eos = tokenizer.eos_token_id
    model.train()
    losses = []
    for step in range(d.warmup_steps):
        records = []
        for problem in data.train.sample(d.warmup_batch, rng):
            prompt = format_prompt(tokenizer, problem.prompt, cfg.data.system_prompt)
            text = warm_start_answer(problem, rng, d.tagged_fraction)
            answer = tokenizer.encode(text, add_special_tokens=False) + [eos]
            records.append(SequenceRecord(token_ids=prompt + answer, response_start=len(prompt), advantage=0.0))
        batch = pack(records).to(device)
        logp = logprobs(model, batch)                                                 # (N,) fp32
        loss = -(logp * batch.loss_mask).sum() / batch.loss_mask.sum()
        lr = d.warmup_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(d.warmup_steps, 1))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == d.warmup_steps:
            log(f"demo warm start: step {step + 1}/{d.warmup_steps}, loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return (losses[0], losses[-1]) if losses else (float("nan"), float("nan"))


def build_base_model(cfg: TrainConfig, run_dir: str | Path, data) -> Path:
    """Tokenizer + tiny Qwen2 + warm start, saved in HF format to RUN/base_model; returns the path."""

    out = Path(run_dir) / "base_model"
    t0 = time.perf_counter()
    tokenizer = build_char_tokenizer(DEFAULT_ALPHABET)
    check_prompt_lengths(cfg, tokenizer, data)        # config errors before any training
    device = torch.device("cuda" if cfg.run.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.run.device == "auto" else cfg.run.device)
    model = build_model(cfg, tokenizer).to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"demo: tiny Qwen2 ({params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}), "
          f"warm start on {', '.join(s.name for s in cfg.data.sources)} worked answers", flush=True)
    first, last = warm_start(model, tokenizer, cfg, data, device=device)
    save_policy(model.to("cpu"), out)
    save_tokenizer(tokenizer, str(out))
    print(f"demo: base model in {out} (warm-start loss {first:.2f} -> {last:.2f}, "
          f"{time.perf_counter() - t0:.0f} s)", flush=True)
    return out


# ----------------------------------------------------------------------------- worked answers

_OPS = {ast.Add: ("+", operator.add), ast.Sub: ("-", operator.sub),
        ast.Mult: ("*", operator.mul), ast.FloorDiv: ("/", operator.floordiv)}
WORKED_TASKS = ("chain_sum", "basic_arithmetic")


def _literal(node: ast.AST) -> int | None:
    """The int a node stands for if it is a number or a negated number, else None."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _literal(node.operand)
        if inner is not None:
            return -inner if isinstance(node.op, ast.USub) else inner
    return None


def _reduce_once(node: ast.AST, lines: list[str]) -> ast.AST:
    """Evaluate the first binary operation Python would (left operand first), logging it."""
    if isinstance(node, ast.BinOp):
        left, right = _literal(node.left), _literal(node.right)
        if left is not None and right is not None:
            symbol, fn = _OPS[type(node.op)]
            value = fn(left, right)
            lines.append(f"{left} {symbol} {right} = {value}")
            return ast.Constant(value)
        if left is None:
            node.left = _reduce_once(node.left, lines)
        else:
            node.right = _reduce_once(node.right, lines)
        return node
    if isinstance(node, ast.UnaryOp):
        node.operand = _reduce_once(node.operand, lines)
        return node
    raise ValueError(f"unsupported expression node {ast.dump(node)}")


def worked_answer(problem: Problem) -> str:
    """A correct solution, one operation per line, then "<answer>X</answer>".

    For chain_sum / basic_arithmetic problems from a reasoning_gym source: the expression (the
    entry's metadata) is reduced one binary operation at a time in Python's evaluation order, with
    "/" as floor division as reasoning-gym computes it, e.g. "4 - 1 - 7" ->
    "4 - 1 = 3\\n3 - 7 = -4\\n<answer>-4</answer>".
    """
    entry = problem.metadata.get("entry")
    dataset = problem.metadata.get("dataset")
    if dataset not in WORKED_TASKS or not isinstance(entry, dict):
        raise ValueError(f"worked_answer supports reasoning_gym {WORKED_TASKS} problems, got task {problem.task!r}")
    expression = entry["metadata"]["expression"]
    for bad in ("**", "//", "%"):
        if bad in expression:
            raise ValueError(f"unexpected operator {bad!r} in {expression!r}")
    node = ast.parse(expression.replace("/", "//"), mode="eval").body
    for sub in ast.walk(node):
        if not isinstance(sub, (ast.BinOp, ast.UnaryOp, ast.Constant, *_OPS, ast.USub, ast.UAdd)):
            raise ValueError(f"unsupported syntax {type(sub).__name__} in {expression!r}")
    lines: list[str] = []
    while _literal(node) is None:
        node = _reduce_once(node, lines)
    result = _literal(node)
    if str(result) != problem.answer:
        raise ValueError(f"worked answer {result} != gold {problem.answer!r} for {expression!r}")
    return "\n".join(lines + [f"<answer>{result}</answer>"])
