"""TRL as a baseline: TRL's own log-prob and GRPO-loss code at the benchmark's shapes.

TRL 1.16 (`trl`, tested with 1.16.0) computes a GRPO loss in `GRPOTrainer._compute_loss`:
per-token log-probs and entropies from `_get_per_token_logps_and_entropies`, then the clipped
objective, the k3 KL and the aggregation as elementwise ops on the padded [B, C] batch, then its
metrics (five host syncs). Its log-probs come from one of two places:

    provider      log-probs                                               TRL name
    trl           the model's logits [B, C, V], `logits / temperature`,   trl.trainer.utils.selective_log_softmax
                  then log_softmax + gather (TRL's Triton kernel on the   + entropy_from_logits (no grad)
                  logits on CUDA, a torch loop over rows on CPU); the
                  path of GRPOTrainer before its fused head
    trl-chunked   the chunked LM head GRPOTrainer 1.16 installs with      trl.trainer.utils.add_fused_lm_head →
                  `add_fused_lm_head`: [4096, 32768] logit tiles in       trl.kernels.ChunkedLogProbFunction
                  cuBLAS folded into online log-sum-exp statistics, the
                  backward recomputing each tile; only loss-mask rows on
                  CUDA, every row elsewhere
    trl+prolix    prolix's TRL integration (`prolix.kernels.integrations.trl.compute_loss`, what
                  `ProlixGRPOTrainer` runs instead of `_compute_loss`): the backbone's hidden states
                  packed to the loss-mask rows, then prolix's linear_logprobs + grpo_loss

Nothing here re-implements TRL: `_compute_loss`, `_get_per_token_logps_and_entropies`, the fused
head and the integration run as shipped, called with a stand-in for the trainer object (the
options `bench_config()` maps to: loss_type="dapo" = token-mean, ε 0.2 / 0.28, β = 0.01 with k3,
`use_bias_correction_kl=False` so the KL is prolix's unweighted k3 — TRL's default True weights
it by the ratio, a different objective) and, where TRL runs a model, a model whose backbone
returns the case's hidden states (`_HiddenStatesLM`). The case's S sequences of L tokens become
TRL's padded batch: B = S completions of C = L tokens after a one-token prompt, completion token
j of sequence s being the target of packed row (s, j) and the completion mask the loss mask.

Every provider raises `Skip` with the reason when trl is not installed.
"""

from __future__ import annotations

import contextlib
import types
from collections import defaultdict

import torch

from .cases import IGNORE_INDEX, Inputs
from .provider_types import Forward, Skip, padded_sequences

TRL_TESTED = "1.16.0"


def _trl():
    try:
        import trl
        from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: F401 - the class whose code runs
    except ImportError as e:
        raise Skip(f"trl is not installed ({e}); pip install 'prolix[trl]' (tested with trl=={TRL_TESTED})") from e
    return trl


# ----------------------------------------------------------------------------- TRL's batch and trainer


def trl_inputs(inp: Inputs) -> dict:
    """The case as GRPOTrainer's `inputs`: a one-token prompt, then C = L completion tokens."""
    S, dev = inp.S, inp.targets.device
    return {
        "prompt_ids": torch.zeros(S, 1, dtype=torch.long, device=dev),           # [B, 1]
        "prompt_mask": torch.ones(S, 1, dtype=torch.int, device=dev),
        "completion_ids": padded_sequences(inp.safe_targets, inp),                           # [B, C]
        "completion_mask": padded_sequences(inp.mask, inp).int(),                            # [B, C] the loss mask
        "advantages": inp.adv_seq,                                               # [B]
        "old_per_token_logps": padded_sequences(inp.old_logp, inp),                          # [B, C] fp32
        "ref_per_token_logps": padded_sequences(inp.ref_logp, inp),
        "num_items_in_batch": inp.mask.sum(),                                    # dapo's denominator
    }


def trl_trainer(config) -> types.SimpleNamespace:
    """A stand-in for `trl.GRPOTrainer` holding what its loss code reads, set to `config`
    (a GRPOLossConfig with token-mean aggregation and a k3 KL): one process, no gradient
    accumulation, training mode, no vLLM, no entropy mask or bonus, no MoE aux loss."""
    NS = types.SimpleNamespace
    accelerator = NS(num_processes=1, is_main_process=True, unwrap_model=lambda m: m,
                     autocast=contextlib.nullcontext, reduce=lambda t, reduction="sum": t,
                     gather=lambda t: t, gather_for_metrics=lambda t: t)
    args = NS(use_bias_correction_kl=False, delta=None, steps_per_generation=1, report_to=[],
              cast_lm_head_to_fp32=False)
    return NS(loss_type="dapo", beta=config.kl_coef, epsilon_low=config.clip_low, epsilon_high=config.clip_high,
              temperature=1.0, importance_sampling_level="token", top_entropy_quantile=1.0,
              off_policy_mask_threshold=None, entropy_coef=0.0, use_adaptive_entropy=False,
              _entropy_bonus_enabled=False, aux_loss_enabled=False, use_vllm=False,
              vllm_importance_sampling_correction=False, max_completion_length=None,
              accelerator=accelerator, args=args, model=NS(training=True),
              current_gradient_accumulation_steps=1, state=NS(global_step=0),
              _metrics={"train": defaultdict(list), "eval": defaultdict(list)})


def _compute_loss(trainer, model, inputs) -> torch.Tensor:
    from trl.trainer.grpo_trainer import GRPOTrainer

    return GRPOTrainer._compute_loss(trainer, model, inputs)


# ----------------------------------------------------------------------------- a model around the case


class _Backbone(torch.nn.Module):
    """Returns the case's hidden states as the final hidden states of [B, 1 + C] tokens:
    position j < C holds packed row (s, j), which predicts completion token j; position C
    (nothing to predict) is zeros."""

    def __init__(self, inp: Inputs):
        super().__init__()
        self.inp = inp

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        h = padded_sequences(self.inp.hidden, self.inp)                                      # [B, C, H]
        h = torch.cat([h, h.new_zeros(h.shape[0], 1, h.shape[2])], dim=1)       # [B, C + 1, H]
        return types.SimpleNamespace(last_hidden_state=h)


class _Head(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight                 # the case's [V, H] leaf, so its gradient lands there
        self.bias = None


class _TextConfig:
    model_type = "qwen2"

    def get_text_config(self, *args, **kwargs):
        return self


class _HiddenStatesLM(torch.nn.Module):
    """The smallest causal LM that TRL's fused head and prolix's TRL integration accept: a
    backbone returning the case's hidden states and an untied, bias-free LM head."""

    def __init__(self, inp: Inputs):
        super().__init__()
        self.base_model = _Backbone(inp)
        self.lm_head = _Head(inp.weight)
        self.config = _TextConfig()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        h = self.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, logits_to_keep]
        return types.SimpleNamespace(logits=h @ self.lm_head.weight.T)


# ----------------------------------------------------------------------------- providers


def _full_logits_logps(inp: Inputs, *, entropy: bool):
    """GRPOTrainer's per-token log-probs from materialised logits (before its fused head)."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    logits = padded_sequences(inp.hidden, inp) @ inp.weight.T                                # [B, C, V] bench dtype
    logits = logits / 1.0                                                        # / temperature: a copy, as TRL makes
    logps = selective_log_softmax(logits, padded_sequences(inp.safe_targets, inp))           # [B, C]
    if not entropy:
        return logps, None
    with torch.no_grad():
        return logps, entropy_from_logits(logits)


def trl_linear(inp: Inputs, ctx) -> Forward:
    """linear-logprobs: TRL's selective_log_softmax on the full logits; 0 on ignored rows."""
    _trl()
    valid = inp.targets != IGNORE_INDEX

    def fwd():
        logps, _ = _full_logits_logps(inp, entropy=False)
        return torch.where(valid, logps.reshape(-1).float(), 0.0)
    return fwd


def trl_chunked_linear(inp: Inputs, ctx) -> Forward:
    """linear-logprobs: TRL's ChunkedLogProbFunction over all N rows (log-probs only, as
    add_fused_lm_head's default outputs); 0 on ignored rows."""
    _trl()
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    valid = inp.targets != IGNORE_INDEX

    def fwd():
        logps = ChunkedLogProbFunction.apply(inp.hidden, inp.weight, None, inp.safe_targets, 1.0,
                                             _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",))[0]
        return torch.where(valid, logps.float(), 0.0)
    return fwd


def _compute_loss_on(inp: Inputs, ctx, logps_and_entropies) -> Forward:
    """GRPOTrainer._compute_loss with its per-token log-prob/entropy method replaced."""
    inputs = trl_inputs(inp)

    def fwd():
        trainer = trl_trainer(ctx.config)
        trainer._get_per_token_logps_and_entropies = logps_and_entropies
        return _compute_loss(trainer, None, inputs)
    return fwd


def trl_loss(inp: Inputs, ctx) -> Forward:
    """grpo-loss: GRPOTrainer._compute_loss on the case's log-probs [N] (zero entropies)."""
    _trl()

    def logps_and_entropies(*args, **kwargs):
        logps = padded_sequences(inp.logp, inp)
        return logps, torch.zeros_like(logps), None
    return _compute_loss_on(inp, ctx, logps_and_entropies)


def trl_fused(inp: Inputs, ctx) -> Forward:
    """fused-grpo: full logits → selective_log_softmax (+ entropy, no grad) → _compute_loss."""
    _trl()

    def logps_and_entropies(*args, **kwargs):
        logps, entropies = _full_logits_logps(inp, entropy=True)
        return logps, entropies, None
    return _compute_loss_on(inp, ctx, logps_and_entropies)


def trl_chunked_fused(inp: Inputs, ctx) -> Forward:
    """fused-grpo: GRPOTrainer 1.16's own path — add_fused_lm_head on the model, its
    _get_per_token_logps_and_entropies (ChunkedLogProbFunction, log-probs + entropy), _compute_loss."""
    _trl()
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    inputs = trl_inputs(inp)

    def fwd():
        model = _HiddenStatesLM(inp)
        add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))
        trainer = trl_trainer(ctx.config)
        trainer._get_per_token_logps_and_entropies = types.MethodType(
            GRPOTrainer._get_per_token_logps_and_entropies, trainer)
        return _compute_loss(trainer, model, inputs)
    return fwd


def trl_prolix_fused(inp: Inputs, ctx) -> Forward:
    """fused-grpo: prolix.kernels.integrations.trl.compute_loss, ProlixGRPOTrainer's loss."""
    _trl()
    from prolix.kernels.integrations.trl import compute_loss

    inputs = trl_inputs(inp)

    def fwd():
        return compute_loss(trl_trainer(ctx.config), _HiddenStatesLM(inp), inputs)
    return fwd


NOTES = {
    "trl": ("TRL's selective_log_softmax on full [S, L, V] logits (+ entropy_from_logits without grad), "
            "then GRPOTrainer._compute_loss as shipped (dapo, use_bias_correction_kl=False)"),
    "trl-linear": "TRL's selective_log_softmax on full [S, L, V] logits",
    "trl-loss": "GRPOTrainer._compute_loss as shipped, on the case's log-probs (dapo, use_bias_correction_kl=False)",
    "trl-chunked": ("GRPOTrainer 1.16's own path: add_fused_lm_head (ChunkedLogProbFunction: log-probs + entropy) "
                    "and _compute_loss, as shipped"),
    "trl-chunked-linear": "trl.kernels.ChunkedLogProbFunction (logit tiles in cuBLAS, recomputed in the backward)",
    "trl+prolix": ("prolix.kernels.integrations.trl.compute_loss (ProlixGRPOTrainer): TRL's padded batch packed "
                   "to the loss-mask rows, then prolix's linear_logprobs + grpo_loss"),
}
SKIPS = {
    "trl+prolix-linear": ("prolix's TRL integration replaces TRL's loss; its log-probs are prolix's "
                          "linear_logprobs, the 'prolix' row"),
    "trl-chunked-loss": ("TRL's chunked head (ChunkedLogProbFunction) makes log-probs from hidden states; "
                         "grpo-loss starts from log-probs (it is measured in linear-logprobs and fused-grpo)"),
    "trl+prolix-loss": "prolix's TRL integration computes this loss with prolix's grpo_loss, the 'prolix' row",
}
