"""`prolix bench train`: the trainer's packed forward + backward step, one LM head after another.

One timed call is one micro-batch of `Trainer.update` (trainer/loop.py) without the optimizer:
`forward_hidden` over a packed batch under autocast, the LM head + GRPO loss on its hidden states,
and the backward through the whole model. The model is a Qwen2 architecture built from a config
with random weights (nothing is downloaded), fp32 master weights as the trainer keeps them,
prepared as `load_policy` prepares it (Liger's RMSNorm/SwiGLU/RoPE where they run: CUDA). The
batch is S sequences of varied lengths packed into exactly N tokens with `pack` and
`SequenceRecord`, old and reference log-probs a little off the model's own (`sample_lengths`).

Only the head differs between providers: prolix's `fused_linear_grpo_loss` called exactly as
the trainer calls it, and every other fused-grpo provider (eager full logits, torch.compile,
Liger, CCE, TRL) on the same hidden states, cast as the trainer's `_head` casts them. So the gap
between rows is the head's, in time and memory, at the scale of a whole step.

Precision follows the trainer's `model.autocast: auto`: on CUDA the decoder runs under autocast
in the bench dtype (`--dtype`, bf16 by default) and the head gets bf16 hidden states and weight;
on CPU the trainer runs fp32, and so does this step (rows say `dtype: fp32`).

| shape     | layers | H    | I    | heads (kv) | V      | head  | why                             |
|-----------|--------|------|------|------------|--------|-------|---------------------------------|
| tiny      | 2      | 64   | 176  | 4 (2)      | 2053   | own   | CPU smoke (`--quick`)           |
| qwen-0.5b | 24     | 896  | 4864 | 14 (2)     | 151936 | tied  | Qwen2.5-0.5B                    |
| qwen-1.5b | 28     | 1536 | 8960 | 12 (2)     | 151936 | own   | DeepSeek-R1-Distill-Qwen-1.5B   |

Per row, besides ms and peak memory (above the model's parameters, the gradients included):
- tokens/s = N / step time;
- model FLOPs = `prolix.trainer.metrics.train_flops(passes=3)`, the convention of the trainer's
  perf/mfu: 6·P·N + 6·layers·d·ΣL² with P the matmul parameters (all but the input embedding,
  plus the LM head when tied) and d = heads·head_dim; recomputation is not counted;
- MFU = model FLOPs / time / the matmul rate measured at the start of the run in the bench
  dtype (CUDA only: a CPU smoke has no meaningful peak, the field is null);
- `bytes` = the parameters read and their gradients written once (fp32), the memory floor of
  a step; `grads_gb` is their size.
Before timing, each head is checked on one batch's hidden states against the streamed float64
reference of fused-grpo (loss, dH, dW); the backbone is the same code for every provider.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from pathlib import Path

import torch

from . import cases as C
from . import harness
from .provider_types import Context, Provider, Skip
from .providers import PROVIDERS
from .sweep import Point, add_ratios, check_provider, print_row, profile

KERNEL = "train"
MODE = "fwdbwd"  # a training step is a forward and a backward; nothing else is timed here


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A Qwen2 decoder: the sizes of its config and why it is here."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    why: str

    def config(self):
        from transformers import Qwen2Config

        return Qwen2Config(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, tie_word_embeddings=self.tied,
                           max_position_embeddings=131072, rope_theta=1e6)


MODEL_SHAPES = {
    s.name: s
    for s in (
        ModelShape("tiny", 2, 64, 176, 4, 2, 2053, False, "CPU smoke: V prime, as the tiny LM head"),
        ModelShape("qwen-0.5b", 24, 896, 4864, 14, 2, 151936, True, "Qwen2.5-0.5B (tied embeddings)"),
        ModelShape("qwen-1.5b", 28, 1536, 8960, 12, 2, 151936, False,
                   "DeepSeek-R1-Distill-Qwen-1.5B, the ProRL model (untied head)"),
    )
}
QUICK_MODELS = ("tiny",)
DEFAULT_MODELS = ("qwen-0.5b", "qwen-1.5b")


def step_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The step's compute dtype: the bench dtype on CUDA, fp32 on CPU (the trainer's autocast=auto)."""
    return dtype if device.type == "cuda" else torch.float32


def model_shapes(shapes: tuple[str, ...], quick: bool) -> tuple[str, ...]:
    """The model shapes among `shapes` (--shape); none named: tiny with --quick, else the defaults."""
    named = tuple(s for s in shapes if s in MODEL_SHAPES)
    return named or (QUICK_MODELS if quick else DEFAULT_MODELS)


# ----------------------------------------------------------------------------- the batch


def sample_lengths(budget: int, *, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, response) token counts of sequences filling exactly `budget` tokens.

    A GRPO micro-batch: prompts ~ uniform[budget/128, budget/32] tokens (at least 1),
    responses long-tailed as RL responses are — lognormal, median budget/8, σ = 1, clipped to
    [1, budget/2] — drawn until the budget is full; the last sequence is cut to fit (a single
    token left over goes to the previous response). 3 to 5 sequences, at N = 16384 (seed 0): 3.2k, 4.7k, 8.5k.
    """
    if budget < 2:
        raise ValueError(f"budget: expected >= 2 tokens (one prompt and one response token), got {budget}")
    rng = random.Random(seed)
    out: list[tuple[int, int]] = []
    left = budget
    while left >= 2:
        prompt = min(rng.randint(max(1, budget // 128), max(1, budget // 32)), left - 1)
        response = min(max(1, int(rng.lognormvariate(math.log(budget / 8), 1.0))), max(1, budget // 2))
        response = min(response, left - prompt)
        out.append((prompt, response))
        left -= prompt + response
    if left:
        prompt, response = out[-1]
        out[-1] = (prompt, response + left)
    return out


def make_batch(model, vocab: int, N: int, compute_dtype: torch.dtype | None, *, seed: int = 0):
    """(PackedBatch on the model's device, per-sequence advantages [S], (prompt, response) lengths).

    Token ids are uniform; old_logp and ref_logp are the model's own log-probs of the response
    tokens plus N(0, 0.1²) noise, so the ratio clips on both sides as it does a few steps in."""
    from prolix.kernels import linear_logprobs
    from prolix.trainer.model import forward_hidden, lm_head_weight
    from prolix.trainer.packing import SequenceRecord, pack

    g = torch.Generator().manual_seed(seed)
    lengths = sample_lengths(N, seed=seed)
    advantages = torch.randn(len(lengths), generator=g)
    records = [SequenceRecord(token_ids=torch.randint(0, vocab, (p + r,), generator=g), response_start=p,
                              advantage=float(a)) for (p, r), a in zip(lengths, advantages)]
    device = model.get_input_embeddings().weight.device
    batch = pack(records).to(device)
    with torch.no_grad(), _autocast(device, compute_dtype):
        hidden = forward_hidden(model, batch)                                    # [N, H]
    with torch.no_grad():
        dt = compute_dtype or hidden.dtype
        logp = linear_logprobs(hidden.to(dt), lm_head_weight(model).to(dt), batch.targets)  # [N] fp32
    own = batch.split_responses(logp.cpu())
    noisy = lambda x: x + 0.1 * torch.randn(x.shape, generator=g)  # noqa: E731
    records = [dataclasses.replace(rec, old_logp=noisy(lp), ref_logp=noisy(lp)) for rec, lp in zip(records, own)]
    return pack(records).to(device), advantages, lengths


def head_inputs(batch, advantages: torch.Tensor, shape: C.Shape) -> C.Inputs:
    """The batch as the heads' `Inputs` (hidden and weight None: each step fills them in)."""
    lengths = torch.diff(batch.cu_seqlens).long()
    S, L = len(lengths), int(lengths.max())
    local = batch.position_ids
    pad_index = batch.seq_ids() * L + local                                      # [N] into [S, L]
    mask = batch.loss_mask.float()
    return C.Inputs(
        shape=shape, N=batch.num_tokens, S=S, L=L, hidden=None, weight=None, targets=batch.targets,
        safe_targets=batch.targets.clamp(min=0), logp=batch.old_logp.clone(), advantages=batch.advantages,
        adv_seq=advantages.to(batch.targets.device), mask=mask, old_logp=batch.old_logp,
        ref_logp=batch.ref_logp, cu_seqlens=batch.cu_seqlens, pad_index=pad_index,
    )


# ----------------------------------------------------------------------------- the model and the step


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def build_model(shape: ModelShape, device: torch.device, *, seed: int = 0):
    """Random-weight fp32 Qwen2 on `device`, prepared as `load_policy` prepares a checkpoint."""
    from transformers import AutoModelForCausalLM

    from prolix.trainer.model import prepare_policy

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape.config(), dtype=torch.float32, attn_implementation="sdpa")
    prepare_policy(model, liger=None)
    return model.train()


def flop_params(model) -> int:
    """Weights a token's forward multiplies by: all but the input embedding (a lookup), plus the
    LM head when it is tied to that embedding (as `Trainer._throughput` counts them)."""
    embed = model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters()) - embed.numel()
    return params + (embed.numel() if model.config.tie_word_embeddings else 0)


@dataclasses.dataclass
class TrainSetup:
    """One (model shape, N): the model, the packed batch and what every provider's step shares."""

    shape: ModelShape
    model: torch.nn.Module
    batch: object  # PackedBatch
    template: C.Inputs
    lengths: list[tuple[int, int]]
    compute_dtype: torch.dtype | None

    @classmethod
    def build(cls, shape: ModelShape, N: int, dtype: torch.dtype, device: torch.device, *, seed: int = 0):
        model = build_model(shape, device, seed=seed)
        compute = None if dtype == torch.float32 else dtype
        batch, adv, lengths = make_batch(model, shape.vocab, N, compute, seed=seed)
        head = C.Shape(shape.name, shape.hidden, shape.vocab, shape.why)
        return cls(shape, model, batch, head_inputs(batch, adv, head), lengths, compute)

    def params(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def hidden_and_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`Trainer.update`: forward_hidden under autocast, then `_head`'s cast to one dtype."""
        from prolix.trainer.model import forward_hidden, lm_head_weight

        device = self.batch.input_ids.device
        with _autocast(device, self.compute_dtype):
            hidden = forward_hidden(self.model, self.batch)                      # [N, H]
        weight = lm_head_weight(self.model)                                      # [V, H] fp32 master
        dt = self.compute_dtype or weight.dtype
        return hidden.to(dt), weight.to(dt)

    def step(self, provider: Provider, ctx: Context):
        """The timed call: forward, then `provider`'s head + loss; returns the loss (0-d)."""
        def run() -> torch.Tensor:
            hidden, weight = self.hidden_and_weight()
            inp = dataclasses.replace(self.template, hidden=hidden, weight=weight)
            return provider.build(inp, ctx)()
        return run

    def check_inputs(self) -> C.Inputs:
        """One step's hidden states and head weight as leaves: what the heads are checked on."""
        with torch.no_grad():
            hidden, weight = self.hidden_and_weight()
        return dataclasses.replace(self.template, hidden=hidden.detach().requires_grad_(),
                                   weight=weight.detach().clone().requires_grad_())

    def describe(self) -> dict:
        """The row's `model` field: the architecture, sizes and how the step runs."""
        from prolix.trainer.model import resolve_attn_backend

        c, device = self.model.config, self.batch.input_ids.device
        return {
            "family": "qwen2", "layers": c.num_hidden_layers, "hidden": c.hidden_size,
            "intermediate": c.intermediate_size, "heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads, "vocab": c.vocab_size, "tied": bool(c.tie_word_embeddings),
            "params": sum(p.numel() for p in self.model.parameters()), "flop_params": flop_params(self.model),
            "param_dtype": "fp32", "autocast": harness.dtype_name(self.compute_dtype) if self.compute_dtype else None,
            "attn_backend": resolve_attn_backend("auto", device, self.compute_dtype or torch.float32),
            "gradient_checkpointing": False,
            "seq_lengths": [p + r for p, r in self.lengths], "prompt_lengths": [p for p, _ in self.lengths],
        }

    def work(self) -> tuple[float, float, float]:
        """(model FLOPs, bytes, gradient GB) of one forward + backward."""
        from prolix.trainer.metrics import train_flops

        c = self.model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        flop = train_flops(flop_params(self.model), c.num_hidden_layers, c.num_attention_heads * head_dim,
                           [p + r for p, r in self.lengths], passes=3.0)
        param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return flop, 2.0 * param_bytes, param_bytes / 1e9


# ----------------------------------------------------------------------------- the sweep


def bench_train(spec, ceilings: dict, ctx: Context, stem) -> list[dict]:
    """Every provider × model shape × N of the run (mode fwdbwd); rows in the runner's schema."""
    rows = []
    for name in model_shapes(spec.shapes, spec.quick):
        for N in spec.tokens:
            rows += bench_model_point(MODEL_SHAPES[name], N, spec, ceilings, ctx, stem)
    return rows


def bench_model_point(shape: ModelShape, N: int, spec, ceilings: dict, ctx: Context, stem) -> list[dict]:
    """All providers at one (model shape, N): build the model and batch, check every head, then
    time every step; a failure anywhere is a row with its status and reason."""
    dtype = step_dtype(harness.DTYPES[spec.dtype], ctx.device)
    point = Point(KERNEL, C.Shape(shape.name, shape.hidden, shape.vocab, shape.why), N, dtype, ctx.device, ctx)
    providers = PROVIDERS[KERNEL]
    if MODE not in spec.modes:
        return [point.row(p, m, "skipped", "the trainer step is timed as forward+backward only (--modes fwdbwd)")
                for p in providers for m in spec.modes]
    print(f"  train           {shape.name:<9} N={N:<6} building the model and the packed batch", flush=True)
    try:
        setup = TrainSetup.build(shape, N, dtype, ctx.device, seed=spec.seed)
        point.inp = setup.template
        head = Point("fused-grpo", point.shape, N, dtype, ctx.device, ctx, inp=setup.check_inputs())
    except Exception as e:  # noqa: BLE001 - OOM or not, every provider gets a row saying why
        status = "OOM" if harness.is_oom(e) else "error"
        return [point.row(p, MODE, status, f"building the model and batch: {type(e).__name__}: {e}"[:500])
                for p in providers]
    # Every check first, then its [N, H] and [V, H] leaves go, so they never sit under a timed step.
    checked = {p.name: check_head(point, head, p, spec) for p in providers}
    head.inp = head.ref = None
    harness.free_memory(ctx.device)
    rows = []
    for p in providers:
        row = checked[p.name]
        if row["status"] == "ok":
            row["model"] = setup.describe()
            measure_step(point, setup, p, row, spec, ceilings, stem)
        print_row(row)
        rows.append(row)
    add_ratios(rows)
    del setup
    point.inp = None
    harness.free_memory(ctx.device)
    return rows


def check_head(point, head, provider: Provider, spec) -> dict:
    """A row for `provider`: "ok" with its head's errors on the model's hidden states (`head`, a
    fused-grpo point), or skipped / OOM / error with the reason."""
    if provider.baseline is not None and provider.baseline not in spec.baselines:
        return point.row(provider, MODE, "skipped", f"not requested (--baselines {','.join(spec.baselines)})")
    try:
        checked = check_provider(head, provider.build(head.inp, point.ctx), spec)
    except Skip as e:
        return point.row(provider, MODE, "skipped", str(e))
    except Exception as e:  # noqa: BLE001 - a baseline that breaks is a result, not a crash
        status = "OOM" if harness.is_oom(e) else "error"
        return point.row(provider, MODE, status, f"checking the head: {type(e).__name__}: {e}"[:500])
    finally:
        harness.free_memory(point.device)
    row = point.row(provider, MODE, "ok")
    row.update(checked)
    return row


def measure_step(point, setup: TrainSetup, provider: Provider, row: dict, spec, ceilings: dict, stem) -> None:
    """Time the whole step, measure its peak memory, fill in the derived numbers of the row."""
    device, params = point.device, setup.params()
    fn = lambda: setup.step(provider, point.ctx)().backward()  # noqa: E731
    try:
        row["ms"], row["ms_p20"], row["ms_p80"] = harness.time_fn(fn, device, grad_to_none=params, quick=spec.quick)
        if spec.profile:
            trace = Path(f"{stem}-trace-{KERNEL}-{provider.name}-{point.shape.name}-{point.N}-{MODE}.json")
            row["profile"] = profile(fn, device, trace, params)
        row["peak_gb"], row["peak_reason"] = harness.peak_memory_gb(fn, device, grad_to_none=params)
    except Exception as e:  # noqa: BLE001 - out of memory in the step is a result
        row.update(status="OOM" if harness.is_oom(e) else "error", reason=f"{type(e).__name__}: {e}"[:500],
                   ms=None, ms_p20=None, ms_p80=None)
        return
    finally:
        for p in params:
            p.grad = None
        harness.free_memory(device)
    flop, n_bytes, grads_gb = setup.work()
    sec = row["ms"] * 1e-3
    floor = C.floor_ms(flop, n_bytes, ceilings)
    row.update(flop=flop, bytes=n_bytes, tflops=flop / sec / 1e12, gbps=n_bytes / sec / 1e9, floor_ms=floor,
               floor_frac=floor / row["ms"], grads_gb=grads_gb, tokens_per_s=point.N / sec,
               mfu=flop / sec / (ceilings["matmul_tflops"] * 1e12) if device.type == "cuda" else None)



