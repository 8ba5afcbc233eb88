"""The GRPO loss tests' shared batches and comparisons (test_grpo_loss, test_rollout_correction).

`packed_batch` is per-token inputs of ragged packed sequences; `ours_and_ref` runs `grpo_loss`
and the float64 reference `grpo_loss_ref` on it; `fused_batch` is the fused LM-head path's
hidden/weight/targets with per-token inputs whose ratios sit away from the clip edges.
"""

from __future__ import annotations

import math

import torch
from kernel_testing import DEVICE

from prolix.kernels import grpo_loss
from prolix.kernels.reference import grpo_loss_ref, linear_logprobs_ref

# The loss math on given log-probs has no kernel and is checked elementwise:
#   float64: closed-form derivatives vs autograd through the reference, rounding only;
#   float32: fp32 math over N ≤ 64 tokens.
LOSS_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
}

IGNORE = -100

# Sequence lengths of the packed test batch: an empty sequence, single-token sequences, and
# lengths that are neither powers of two nor equal, so per-sequence weights differ.
LENGTHS = (5, 0, 1, 9, 3, 12, 1, 7)


def close(actual, expected, dtype, what):
    torch.testing.assert_close(actual.double(), expected.double(), **LOSS_TOL[dtype], msg=lambda m: f"{what}: {m}")


def packed_batch(lengths=LENGTHS, *, dtype=torch.float64, seed=0, log_ratio=0.6):
    """Packed per-token inputs with ratios spread over ±log_ratio (both clip sides active)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    n, s = int(lens.sum()), len(lengths)
    cu = torch.zeros(s + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    seq_adv = torch.randn(s, generator=g, dtype=torch.float64).abs() * torch.tensor([1.0, -1.0]).repeat(s)[:s]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    logp = u(-4.0, -0.05)
    b = dict(
        logp=logp,
        advantages=torch.repeat_interleave(seq_adv, lens),
        mask=torch.rand(n, generator=g) < 0.85,
        old_logp=logp - u(-log_ratio, log_ratio),
        ref_logp=logp + u(-0.5, 0.5),
        rollout_logp=logp + u(-0.8, 0.3),
        entropy=u(0.1, 3.0),
        cu_seqlens=cu,
    )
    return {k: (v.to(dtype) if v.is_floating_point() else v).to(DEVICE) for k, v in b.items()}


def ours_and_ref(b, config, normalizer=None, *, with_entropy=False):
    """Loss and grads (logp, entropy) of grpo_loss and of the float64 reference."""
    out = []
    for fn in (grpo_loss, grpo_loss_ref):
        leaves = {k: b[k].detach().clone().requires_grad_() for k in ("logp", "entropy")}
        kw = {**b, **leaves}
        if not with_entropy and fn is grpo_loss:
            kw["entropy"] = None
        res = fn(kw.pop("logp"), kw.pop("advantages"), kw.pop("mask"), **kw, config=config, normalizer=normalizer)
        loss = res[0] if fn is grpo_loss else res
        targets = [leaves["logp"]] + [leaves["entropy"]] * (config.entropy_coef != 0)
        grads = torch.autograd.grad(loss, targets, allow_unused=True)
        out.append((loss, grads, res[1] if fn is grpo_loss else None))
    return out


def fused_batch(n, v, h, dtype, *, seed=0, temperature=1.0):
    """hidden/weight in `dtype`, per-token inputs whose ratios sit away from the clip edges."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h)).to(dtype)   # logits ~ N(0, 1)
    targets = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) < 0.8
    mask[0] = True   # N = 1 must not be an all-masked (trivially zero) batch
    if n > 2:   # a row without a next token: ignored target, masked out
        targets[n // 2], mask[n // 2] = IGNORE, False
    logp64, _ = linear_logprobs_ref(hidden, weight, targets, temperature=temperature, ignore_index=IGNORE)
    # log ratios ±0.08 (inside the clip range) and ±0.5 (clipped), never near log(1 ± ε):
    # a bf16 logp error must not flip a clip decision and turn a small error into a large one.
    side = torch.tensor([-0.5, -0.08, 0.08, 0.5], dtype=torch.float64)[torch.randint(0, 4, (n,), generator=g)]
    lens = [n // 3, 0, n - 2 * (n // 3), n // 3] if n > 2 else [n]
    cu = torch.tensor([0] + list(torch.cumsum(torch.tensor(lens), 0)), dtype=torch.int32)
    seq_adv = torch.randn(len(lens), generator=g, dtype=torch.float64)
    seq_adv[0] = -seq_adv[0].abs()
    b = dict(hidden=hidden, weight=weight, targets=targets, mask=mask, cu_seqlens=cu,
             advantages=torch.repeat_interleave(seq_adv, torch.tensor(lens)).float(),
             old_logp=(logp64 - side).float(), ref_logp=(logp64 + 0.3 * torch.randn(n, generator=g)).float())
    return {k: v.to(DEVICE) for k, v in b.items()}
