"""What is benchmarked: the shapes, the inputs, and the two numbers of a result (time and memory).

Shapes are LM heads (H, V) of common models (`SHAPES`) plus CPU-sized ones for the
smoke (`--quick`: N ≤ 2048, H ≤ 256). Inputs are fresh random tensors from a fixed seed, laid
out as a packed micro-batch of S equal sequences of L tokens (N = S·L); equal lengths mean the
padded baselines (Liger's [S, L] layout) pay no padding, their best case.

FLOP and bytes are those of the math, the same for every provider (quack's convention), so a
provider's TFLOP/s and GB/s say how close it gets to the work that must be done:
- one GEMM `h @ Wᵀ` is 2·N·H·V FLOP; forward = 1 GEMM, backward = 2 (dH, dW), forward+backward = 3.
  Recomputing the logits in the backward is a provider's overhead, not counted work.
- bytes: hidden N·H and weight V·H read once (and their gradients written once) plus O(N)
  vectors; a naive provider's N·V logits are its own overhead.
- floor (ms) = max(FLOP / measured matmul peak, bytes / measured copy bandwidth).
"""

from __future__ import annotations

import dataclasses
import math

import torch

KERNELS = ("linear-logprobs", "grpo-loss", "fused-grpo")
MODES = ("fwd", "bwd", "fwdbwd")


@dataclasses.dataclass(frozen=True)
class Shape:
    """An LM head: hidden size H, vocabulary V, and why it is here."""

    name: str
    H: int
    V: int
    why: str


SHAPES = {
    s.name: s
    for s in (
        Shape("qwen-1.5b", 1536, 151936, "the ProRL model (DeepSeek-R1-Distill-Qwen-1.5B)"),
        Shape("qwen-7b", 3584, 152064, "the next size up"),
        Shape("llama-8b", 4096, 128256, "the common peer-benchmark shape"),
        Shape("tiny", 64, 2053, "CPU smoke: V prime (no aligned tail), the size a CI run affords"),
        Shape("small", 256, 16384, "CPU smoke, largest CPU shape (H = 256)"),
    )
}
# grpo-loss works on [N] vectors: H and V do not enter, so it runs once per N under this name.
LOSS_SHAPE = Shape("packed", 0, 0, "per-token vectors only: H and V do not enter")

DEFAULT_SHAPES = ("qwen-1.5b", "llama-8b")
DEFAULT_TOKENS = (4096, 16384)
QUICK_SHAPES = ("tiny",)
QUICK_TOKENS = (128, 512)
QUICK_SEQ_LEN = 64   # several sequences even at the smoke's N, so per-sequence chunking runs

IGNORE_INDEX = -100
PROMPT_FRACTION = 0.125  # the first 1/8 of each sequence is prompt: masked, target ignored
LOGIT_STD = 2.0          # std of h·W: a peaked-enough softmax, like a trained LM head


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    """One packed micro-batch. N rows = S sequences × L tokens.

    hidden [N, H] and weight [V, H] in the bench dtype (leaves with requires_grad);
    targets [N] int64 (IGNORE_INDEX on prompt rows) and safe_targets [N] (0 there instead: the
    loss kernels rely on the mask, and some baselines read any target id); per token, fp32:
    logp [N] (a leaf with requires_grad: the input of grpo-loss); advantages [N]
    (one value per sequence, repeated), mask [N] (0 on prompt rows), old_logp [N], ref_logp [N];
    cu_seqlens [S+1] int32; adv_seq [S] fp32 for the baselines that take one advantage per sequence.
    pad_index [N] int64 or None: where each packed row sits in the padded [S, L] layout of the
    Liger and TRL baselines (row-major). None when all sequences have L tokens, as in every kernel
    case (the padded layout is then a view); the trainer step's ragged batches set it, with L the
    longest sequence.
    """

    shape: Shape
    N: int
    S: int
    L: int
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    targets: torch.Tensor
    safe_targets: torch.Tensor
    logp: torch.Tensor
    advantages: torch.Tensor
    adv_seq: torch.Tensor
    mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    cu_seqlens: torch.Tensor
    pad_index: torch.Tensor | None = None


def sequence_layout(N: int, seq_len: int | None) -> tuple[int, int]:
    """(S, L) with S·L = N: sequences of `seq_len` tokens (default min(N, 4096)), else one."""
    L = min(N, seq_len or 4096)
    if N % L:
        L = math.gcd(N, L)
    return N // L, L


def make_inputs(
    shape: Shape,
    N: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    seed: int = 0,
    seq_len: int | None = None,
) -> Inputs:
    """Fresh random inputs for one case (never zeros), seeded so every provider sees the same."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    S, L = sequence_layout(N, seq_len)
    prompt = torch.arange(L) < max(1, int(L * PROMPT_FRACTION))  # [L] True on prompt rows
    prompt = prompt.repeat(S)                                     # [N]
    mask = (~prompt).float()
    adv_seq = torch.randn(S, generator=g)
    advantages = adv_seq.repeat_interleave(L)
    cu_seqlens = torch.arange(0, N + 1, L, dtype=torch.int32)
    hidden = weight = None
    V = shape.V or 32000
    targets = torch.randint(0, V, (N,), generator=g)
    targets[prompt] = IGNORE_INDEX
    # Log-probs of a plausible policy: around -log(V)/4, old and ref a little off the current one.
    base = -torch.rand(N, generator=g) * math.log(V) / 2
    old_logp = base + 0.1 * torch.randn(N, generator=g)
    ref_logp = base + 0.1 * torch.randn(N, generator=g)
    logp = base + 0.1 * torch.randn(N, generator=g)  # ratio exp(logp - old) clips on both sides
    if shape.H:
        hidden = torch.randn(N, shape.H, generator=g)
        weight = torch.randn(shape.V, shape.H, generator=g) * (LOGIT_STD / math.sqrt(shape.H))
        hidden = hidden.to(device=device, dtype=dtype).requires_grad_()
        weight = weight.to(device=device, dtype=dtype).requires_grad_()
    to = lambda t: t.to(device)  # noqa: E731
    return Inputs(
        shape=shape, N=N, S=S, L=L, hidden=hidden, weight=weight, targets=to(targets),
        safe_targets=to(targets.clamp(min=0)), logp=to(logp).requires_grad_(),
        advantages=to(advantages), adv_seq=to(adv_seq), mask=to(mask), old_logp=to(old_logp),
        ref_logp=to(ref_logp), cu_seqlens=to(cu_seqlens),
    )


def work(kernel: str, mode: str, shape: Shape, N: int, elem_bytes: int) -> tuple[float | None, float]:
    """(FLOP, bytes) that `kernel` must do in `mode`; FLOP is None where it is negligible.

    linear-logprobs / fused-grpo: GEMMs 2·N·H·V each (fwd 1, bwd 2, fwdbwd 3); bytes: read
    hidden and weight (fwd), read them and write their gradients (bwd), plus per-token vectors.
    grpo-loss: k fp32 vectors of N read (logp, old, ref, advantages, mask), dlogp written.
    """
    vec = 4 * N
    if kernel == "grpo-loss":
        fwd_b, bwd_b = 5 * vec, 6 * vec
        return None, {"fwd": fwd_b, "bwd": bwd_b, "fwdbwd": fwd_b + bwd_b}[mode]
    n_vec = 3 if kernel == "linear-logprobs" else 7  # targets (int64 = 2), out; + loss inputs
    params = (N * shape.H + shape.V * shape.H) * elem_bytes
    gemm = 2.0 * N * shape.H * shape.V
    fwd = (gemm, params + n_vec * vec)
    bwd = (2 * gemm, 2 * params + n_vec * vec)
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": (fwd[0] + bwd[0], fwd[1] + bwd[1])}[mode]


def grads_gb(kernel: str, mode: str, shape: Shape, N: int, elem_bytes: int) -> float:
    """GB of the gradients a backward must produce (dH, dW or dlogp): part of every peak."""
    if mode == "fwd":
        return 0.0
    if kernel == "grpo-loss":
        return 4 * N / 1e9
    return (N * shape.H + shape.V * shape.H) * elem_bytes / 1e9


def floor_ms(flop: float | None, n_bytes: float, ceilings: dict) -> float:
    """The roofline floor: the slower of doing the FLOP at the matmul peak, moving the bytes."""
    t_flop = (flop or 0.0) / (ceilings["matmul_tflops"] * 1e12)
    t_bytes = n_bytes / (ceilings["copy_gbps"] * 1e9)
    return max(t_flop, t_bytes) * 1e3
