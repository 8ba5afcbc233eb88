"""prolix inside verl: the registered "prolix" policy loss equals verl's "vanilla", and the
"prolix" fused-kernel backend gives the log-probs and entropy of log_softmax.

The policy-loss batch is padded [B, T] = [6, 13] with one empty and one full row (both matter:
empty rows are excluded from verl's sequence counts, full rows hit the last column). The old
log-probs differ from the current ones by up to ±1.5 nats, so ratios reach e^1.5 > clip_ratio_c
= 3 and the dual clip acts along with both sides of the clip. Every loss_agg_mode that verl and
prolix share is compared, with the local normalisers (global_batch_info empty) and with explicit
global ones (dp_size = 2), with and without rollout-correction weights. Both sides compute in
fp32, so the project's fp32 tolerances apply.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import TOLERANCES, assert_rel_close, run_without

TOL = TOLERANCES[torch.float32]
MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
LENGTHS = (5, 0, 13, 1, 9, 7)
B, T = len(LENGTHS), 13
GLOBAL_INFO = {"dp_size": 2, "batch_num_tokens": 71, "global_batch_size": 11, "loss_scale_factor": 16}


@pytest.fixture(scope="module")
def verl_modules():
    """verl's core_algos and actor config, or a skip that says why verl cannot be imported here."""
    try:
        import verl.trainer.ppo.core_algos as core_algos
        from verl.workers.config.actor import FSDPActorConfig
    except ImportError as e:
        pytest.skip(f"verl is not importable here ({type(e).__name__}: {e}); on CPU install it with "
                    "`pip install --no-deps verl==0.9.1 ray 'tensordict>=0.8,<=0.10,!=0.9.0' omegaconf codetiming`")
    import prolix.kernels.integrations.verl as prolix_verl

    prolix_verl.register()
    return core_algos, FSDPActorConfig


def _batch(seed: int, with_weights: bool):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]                 # [B, T] bool
    log_prob = -torch.rand(B, T, generator=g) * 3 - 0.1
    old = log_prob + (torch.rand(B, T, generator=g) - 0.5) * 3.0
    adv = torch.randn(B, 1, generator=g).expand(B, T).clone()                        # one per sequence
    weights = torch.rand(B, T, generator=g) * 1.5 + 0.25 if with_weights else None
    if weights is not None:
        weights[0, 2] = 0.0                                                          # a masked-out token
    return old, log_prob, adv, mask, weights


def _run(loss_fn, config, mode, old, log_prob, adv, mask, weights):
    x = log_prob.clone().requires_grad_(True)
    loss, metrics = loss_fn(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask, loss_agg_mode=mode,
                            config=config, rollout_is_weights=weights)
    loss.backward()
    return loss.detach(), x.grad, metrics


@pytest.mark.parametrize("weights", [False, True], ids=["no_is", "rollout_is_weights"])
@pytest.mark.parametrize("info", ["local", "global"])
@pytest.mark.parametrize("mode", MODES)
def test_prolix_policy_loss_matches_verl_vanilla(verl_modules, mode, info, weights):
    core_algos, FSDPActorConfig = verl_modules
    config = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2,
                             clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode=mode)
    config.global_batch_info.update(GLOBAL_INFO if info == "global" else {})
    batch = _batch(seed=MODES.index(mode), with_weights=weights)
    ref_loss, ref_grad, ref_metrics = _run(core_algos.get_policy_loss_fn("vanilla"), config, mode, *batch)
    loss, grad, metrics = _run(core_algos.get_policy_loss_fn("prolix"), config, mode, *batch)

    assert_rel_close(loss, ref_loss, TOL["value"], f"{mode}/{info}: loss")
    assert_rel_close(grad, ref_grad, TOL["grad"], f"{mode}/{info}: d loss / d log_prob")
    assert metrics.keys() == ref_metrics.keys()
    for key, value in ref_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"{mode}/{info}: metric {key}"


def test_batch_exercises_clip_and_dual_clip(verl_modules):
    """Guards the parity test: both clip sides and the dual clip are active on this batch."""
    core_algos, FSDPActorConfig = verl_modules
    config = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
    _, _, metrics = _run(core_algos.get_policy_loss_fn("vanilla"), config, "token-mean", *_batch(0, False))
    assert metrics["actor/pg_clipfrac"] > 0.1 and metrics["actor/pg_clipfrac_lower"] > 0


def test_prolix_policy_loss_rejects_unknown_aggregation(verl_modules):
    core_algos, FSDPActorConfig = verl_modules
    config = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        _run(core_algos.get_policy_loss_fn("prolix"), config, "seq-sum", *_batch(0, False))


def _reference_logprobs(hidden, weight, ids, temperature):
    logits = hidden.double() @ weight.double().T / temperature                        # [nnz, V] fp64
    logprobs = torch.log_softmax(logits, -1)
    return logprobs.gather(-1, ids[..., None]).squeeze(-1), -(logprobs.exp() * logprobs).sum(-1)


def test_linear_logprobs_rmpad_matches_log_softmax_and_verl(verl_modules):
    """[1, total_nnz, H] packed hidden states, V = 333 (not a power of two), τ = 0.7: values and
    gradients against fp64 log_softmax, and values against verl's own FusedLinearForPPO."""
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    from prolix.kernels.integrations.verl import linear_logprobs_rmpad

    g = torch.Generator().manual_seed(3)
    nnz, H, V, tau = 37, 24, 333, 0.7
    hidden = torch.randn(1, nnz, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_(True)
    ids = torch.roll(torch.randint(0, V, (1, nnz), generator=g), shifts=-1, dims=-1)
    log_probs, entropy = linear_logprobs_rmpad(hidden, weight, ids, temperature=tau)
    ref_lp, ref_ent = _reference_logprobs(hidden, weight, ids, tau)
    assert log_probs.shape == entropy.shape == (1, nnz) and log_probs.dtype == torch.float32
    assert_rel_close(log_probs, ref_lp, TOL["value"], "log_probs")
    assert_rel_close(entropy, ref_ent, TOL["value"], "entropy")

    cot = torch.randn(2, 1, nnz, generator=g, dtype=torch.float64)                    # d/dlogp, d/dentropy
    grads = torch.autograd.grad((log_probs * cot[0]).sum() + (entropy * cot[1]).sum(), (hidden, weight))
    ref_grads = torch.autograd.grad((ref_lp * cot[0]).sum() + (ref_ent * cot[1]).sum(), (hidden, weight))
    for name, got, ref in zip(("hidden", "weight"), grads, ref_grads):
        assert_rel_close(got, ref, TOL["grad"], f"grad of {name}")

    with torch.no_grad():
        verl_lp, verl_ent = FusedLinearForPPO()(hidden, weight, ids, temperature=tau)
    assert_rel_close(log_probs, verl_lp, TOL["value"], "log_probs vs verl FusedLinearForPPO")
    assert_rel_close(entropy, verl_ent, TOL["value"], "entropy vs verl FusedLinearForPPO")
    assert linear_logprobs_rmpad(hidden[0], weight, ids[0], calculate_entropy=False)[1] is None


def test_prolix_backend_forward_on_packed_sequences(verl_modules):
    """verl's patch_forward_with_backends(…, "prolix") on a tiny Qwen2: three sequences packed in
    one row (position ids restart), log-probs and entropy equal log_softmax of the model's logits."""
    import verl.models.transformers.monkey_patch as monkey_patch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=False))
    lengths = (6, 1, 9)
    ids = torch.randint(0, 97, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    rolled = torch.roll(ids, shifts=-1, dims=-1)
    with torch.no_grad():
        # unpatched, [1, nnz, V]; no cache, as in training: transformers then reads the restarting
        # position ids as packed sequences and attends within each one
        logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="prolix")
    assert model._verl_fused_kernels_backend == "prolix"
    out = model(input_ids=ids, position_ids=position_ids, temperature=0.7, shift_labels=rolled, return_dict=True)
    logprobs = torch.log_softmax(logits.double() / 0.7, -1)
    ref_lp = logprobs.gather(-1, rolled[..., None]).squeeze(-1)
    assert_rel_close(out.log_probs, ref_lp, TOL["value"], "backend log_probs")
    assert_rel_close(out.entropy, -(logprobs.exp() * logprobs).sum(-1), TOL["value"], "backend entropy")
    out.log_probs.sum().backward()
    assert model.model.embed_tokens.weight.grad is not None and model.lm_head.weight.grad is not None
    other = Qwen2ForCausalLM(model.config)                                              # the class is untouched
    assert other(input_ids=ids).logits.shape == (1, sum(lengths), 97)


def test_module_imports_without_verl_and_fails_clearly_when_used():
    out = run_without("verl", "import prolix.kernels.integrations.verl as m\n"
                               "try:\n    m.register()\nexcept ImportError as e:\n    print('ERR', e)\n")
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "pip install" in out.stdout, out.stdout


# --- rollout correction: verl's own weights and rejection masks vs prolix's rules --------------

VERL_CORRECTIONS = {      # verl's options → what they must equal in prolix
    "token-tis": dict(rollout_is="token", rollout_is_threshold=1.5),
    "token-icepop": dict(rollout_is="token", rollout_is_threshold="0.7_1.5"),
    "seq-mean-k3": dict(rollout_rs="seq_mean_k3", rollout_rs_threshold=0.03),
    "seq-mean-k1": dict(rollout_rs="seq_mean_k1", rollout_rs_threshold=1.105),
    "seq-mean-k1-range": dict(rollout_rs="seq_mean_k1", rollout_rs_threshold=f"{1 / 1.105}_1.105"),
    "token-tis+seq-mean-k3": dict(rollout_is="token", rollout_is_threshold=2.0, rollout_rs="seq_mean_k3",
                                  rollout_rs_threshold=0.03),
}


def _mismatch_batch(seed: int = 5):
    """[B, T] old and rollout log-probs: per-sequence offsets (±0.3) plus per-token noise (±0.4)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    old = -torch.rand(B, T, generator=g) * 3 - 0.1
    rollout = old + (torch.rand(B, 1, generator=g) - 0.5) * 0.6 + (torch.rand(B, T, generator=g) - 0.5) * 0.8
    return old, rollout, mask


@pytest.mark.parametrize("name", VERL_CORRECTIONS)
def test_prolix_rollout_correction_matches_verl_weights_and_rejection_masks(verl_modules, name):
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    from prolix.kernels.integrations.verl import compute_rollout_correction_prolix

    old, rollout, mask = _mismatch_batch()
    options = VERL_CORRECTIONS[name]
    ref_w, ref_mask, _ = compute_rollout_correction_and_rejection_mask(old, rollout, mask.float(), **options)
    weights, new_mask, metrics = compute_rollout_correction_prolix(old, rollout, mask.float(), **options)
    ref_w = None if ref_w is None else ref_w.batch["rollout_is_weights"]
    assert (weights is None) == (ref_w is None)
    if weights is not None:
        assert_rel_close(weights, ref_w, TOL["value"], f"{name}: weights")
    expected = ref_mask
    if options.get("rollout_is_threshold") == "0.7_1.5":    # prolix also drops IcePop's zero-weight tokens
        expected = ref_mask * (ref_w != 0)
        assert ((ref_w == 0) & mask).any() and ((ref_w != 0) & mask).any(), "IcePop drops some tokens, not all"
    torch.testing.assert_close(new_mask, expected.float(), rtol=0, atol=0)
    if "rollout_rs" in options:          # the rule rejects some sequences and keeps others
        rejected = (mask & (ref_mask == 0)).any(1)
        assert rejected.any() and (~rejected & mask.any(1)).any(), name
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("options, message", [
    (dict(rollout_is="sequence"), "rollout_is='sequence'"),
    (dict(rollout_is="token", rollout_is_batch_normalize=True), "rollout_is_batch_normalize"),
    (dict(rollout_rs="token_k1", rollout_rs_threshold=2.0), "rollout_rs='token_k1'"),
    (dict(rollout_rs="seq_mean_k3,seq_max_k2", rollout_rs_threshold=2.0), "rollout_rs="),
    (dict(rollout_rs="seq_mean_k1", rollout_rs_threshold="0.5_1.5"), "symmetric"),
])
def test_verl_options_prolix_does_not_have_raise_naming_them(options, message):
    from prolix.kernels.integrations.verl import rollout_correction_from_verl

    with pytest.raises(ValueError, match=message):
        rollout_correction_from_verl(options)
