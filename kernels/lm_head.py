"""Which LM heads the fused kernels can stand in for, checked in one place.

`prolix.kernels` computes logits as `hidden · Wᵀ / τ`. A causal LM whose head adds a bias, scales
or soft-caps its logits (Gemma-2's `final_logit_softcapping`, Cohere's `logit_scale`, Granite's
`logits_scaling`, MiniCPM / muP-style `output_multiplier` / `lm_head_multiplier`) computes
something else, so `plain_lm_head_weight` refuses it instead of training on the wrong
log-probs. The trainer (`prolix.trainer.model.lm_head_weight`) and the TRL integration both
call it. Depends on nothing but the model's own interface (`get_output_embeddings`, `config`).
"""

from __future__ import annotations

import torch

__all__ = ["LOGIT_TRANSFORMS", "plain_lm_head_weight"]

# config keys (of the text config) that change the logits, with the value that leaves them as is
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0,
                    "output_multiplier": 1.0, "lm_head_multiplier": 1.0}


def plain_lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The [V, H] weight of `model`'s LM head (the input embedding itself when tied).

    Raises ValueError naming the model class and the offending part when the head is not a plain
    `hidden · Wᵀ`: no head, a bias, or a config key of `LOGIT_TRANSFORMS` set to anything but
    its neutral value (None counts as neutral everywhere: the key unset)."""
    name = type(model).__name__
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{name} has no LM head (get_output_embeddings() is None)")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{name}: the LM head has a bias, which prolix.kernels does not apply")
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(config, key, None)
        if value is not None and value != neutral:
            raise ValueError(f"{name}: config.{key}={value!r} changes the logits, which prolix.kernels does not "
                             "apply (the logits must be hidden·Wᵀ / temperature)")
    return head.weight
