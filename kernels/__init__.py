"""prolix.kernels: fused LM-head log-probs and the GRPO loss on packed tokens.

Depends on torch and triton only; nothing here imports the trainer. CUDA tensors run the
Triton kernels, CPU tensors a streaming torch implementation with the same memory bound.

    from prolix.kernels import linear_logprobs, fused_linear_grpo_loss, GRPOLossConfig
    from prolix.kernels import RolloutCorrectionConfig   # GRPOLossConfig(rollout_correction=...)
    from prolix.kernels import seq_ids                   # packed row -> sequence index, from cu_seqlens
    from prolix.kernels import batch_invariant           # context: every call in the bitwise-reproducible mode
"""

if __name__ == "kernels":   # imported by that name from the repository root: see _shadow.py
    from ._shadow import hand_over

    hand_over(globals())
else:
    from ._common import batch_invariant, seq_ids
    from .grpo_loss import (
        FusedLinearGRPOLoss,
        GRPOLossConfig,
        fused_linear_grpo_loss,
        grpo_loss,
    )
    from .linear_logprob import linear_logprobs
    from .rollout_correction import RolloutCorrectionConfig

    __all__ = [
        "linear_logprobs",
        "GRPOLossConfig",
        "RolloutCorrectionConfig",
        "grpo_loss",
        "fused_linear_grpo_loss",
        "FusedLinearGRPOLoss",
        "seq_ids",
        "batch_invariant",
    ]
