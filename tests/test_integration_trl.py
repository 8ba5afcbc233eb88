"""prolix inside TRL's GRPOTrainer: same loss and gradients as TRL's own, less saved memory.

The model is a 2-layer Qwen2 (hidden 32, vocabulary 43) with a character-level tokenizer, both
built here and saved to a temporary folder (TRL loads its reference model from a path). One
generation batch is produced by TRL itself (`_generate_and_score_completions`, sampling at
temperature 0.7, so the head's temperature matters); then, for each option set, one
`_compute_loss` call of TRL and one of prolix run on the *same* inputs and their losses,
parameter gradients and logged metrics are compared. The old log-probs are perturbed by up to
±0.6 nats and the reference ones by ±0.5, so that ratios leave [1 − ε, 1 + ε] and the clip, the
dual clip and the KL all act.
Both sides run in fp32 (`bf16=False`: TRL's default is bf16 autocast, under which both heads
run their GEMMs in bf16), so the project's fp32 tolerances apply.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import TOLERANCES, assert_rel_close, run_without

TOL = TOLERANCES[torch.float32]
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +=?"
PROMPTS = ["1+2=?", "ab", "hello", "3+4=", "xyz", "9"]


def _tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")   # one token per character
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("trl")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _reward(completions, **kwargs):
    return [float(len(set(c))) for c in completions]      # varied rewards: nonzero advantages


def _trainer(model_dir, out_dir, cls=None, **overrides):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    opts = dict(output_dir=str(out_dir), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=8, gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2,
                beta=0.04, temperature=0.7, seed=0, use_cpu=True, bf16=False, report_to=[], logging_steps=1,
                save_strategy="no", disable_tqdm=True)
    opts.update(overrides)
    return (cls or GRPOTrainer)(model=model_dir, reward_funcs=_reward, args=GRPOConfig(**opts),
                                train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                                processing_class=_tokenizer())


@pytest.fixture(scope="module")
def batch(model_dir, tmp_path_factory):
    """(trainer, inputs): one TRL generation batch of 8 completions, old log-probs perturbed."""
    trainer = _trainer(model_dir, tmp_path_factory.mktemp("out"))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2       # set by the training loop; GA scaling is tested
    prompts = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        inputs = trainer._generate_and_score_completions(prompts)
    g = torch.Generator().manual_seed(1)
    mask = inputs["completion_mask"]
    assert 0 < mask.sum() < mask.numel(), "the batch should hold padding (a short completion)"
    old = inputs.get("old_per_token_logps")
    if old is None:                                        # TRL skips it when it equals logp.detach()
        old, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], mask], 1), mask.shape[1])
    inputs["old_per_token_logps"] = old.detach() + (torch.rand(old.shape, generator=g) - 0.5) * 1.2
    # the reference model starts as a copy of the policy: move it so that the KL term is not 0
    inputs["ref_per_token_logps"] = inputs["ref_per_token_logps"] + (torch.rand(old.shape, generator=g) - 0.5)
    # a vLLM-style importance weight with masked-out (0) tokens, used where the case enables it
    w = torch.rand(mask.shape, generator=g) * 1.5 + 0.25
    inputs["importance_sampling_ratio"] = torch.where(torch.rand(mask.shape, generator=g) < 0.1, 0.0, w)
    return trainer, inputs


def _configure(trainer, loss_type="grpo", epsilon_high=0.2, epsilon_low=0.2, delta=None, entropy_coef=0.0, is_correction=False,
               training=True, bias_correction_kl=True, level="token", off_policy=None):
    """Set every option the loss reads, so cases never leak into each other."""
    trainer.loss_type, trainer.epsilon_low, trainer.epsilon_high = loss_type, epsilon_low, epsilon_high
    trainer.importance_sampling_level, trainer.off_policy_mask_threshold = level, off_policy
    trainer.args.delta, trainer.args.use_bias_correction_kl = delta, bias_correction_kl
    trainer.entropy_coef, trainer._entropy_bonus_enabled = entropy_coef, entropy_coef != 0
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = is_correction
    trainer.model.train(training)


def _loss_and_grads(trainer, inputs, loss_fn):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    for logs in trainer._metrics.values():
        logs.clear()
    loss = loss_fn(trainer, model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train" if model.training else "eval"].items()}
    return loss.detach(), grads, metrics


GSPO_CLIP = dict(epsilon_low=0.05, epsilon_high=0.05)
CASES = {
    "grpo": dict(loss_type="grpo"),                       # TRL's default KL: ratio-weighted (bias-corrected)
    "grpo_kl_unweighted": dict(loss_type="grpo", bias_correction_kl=False),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo_clip_higher": dict(loss_type="dapo", epsilon_high=0.28),
    "grpo_delta_two_sided": dict(loss_type="grpo", delta=1.3),
    "dapo_vllm_is_correction": dict(loss_type="dapo", is_correction=True),
    "bnpo_entropy_bonus": dict(loss_type="bnpo", entropy_coef=0.05),
    "dapo_eval_mode": dict(loss_type="dapo", training=False),
    # GSPO: TRL's importance_sampling_level="sequence", with a narrow clip (GSPO's are 3e-4/4e-4)
    # so that means of the ±0.6-nat perturbation leave it
    "grpo_gspo": dict(loss_type="grpo", level="sequence", **GSPO_CLIP),
    "grpo_gspo_kl_unweighted_delta": dict(loss_type="grpo", level="sequence", bias_correction_kl=False, delta=1.3,
                                          **GSPO_CLIP),
    "dapo_gspo": dict(loss_type="dapo", level="sequence", **GSPO_CLIP),
    # DeepSeek-V3.2's off-policy sequence mask (sampling log-probs = the perturbed old ones here)
    "grpo_off_policy_mask": dict(loss_type="grpo", off_policy=0.0),
    "bnpo_off_policy_mask_vllm_is": dict(loss_type="bnpo", off_policy=0.02, is_correction=True),
    "grpo_gspo_off_policy_mask": dict(loss_type="grpo", level="sequence", off_policy=0.0, **GSPO_CLIP),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prolix_loss_matches_trl_loss_and_gradients(batch, case):
    from trl import GRPOTrainer

    from prolix.kernels.integrations.trl import compute_loss

    trainer, inputs = batch
    _configure(trainer, **CASES[case])
    ref_loss, ref_grads, ref_metrics = _loss_and_grads(trainer, inputs, GRPOTrainer._compute_loss)
    loss, grads, metrics = _loss_and_grads(trainer, inputs, compute_loss)

    assert_rel_close(loss, ref_loss, TOL["value"], f"{case}: loss")
    assert grads.keys() == ref_grads.keys(), f"{case}: parameters with gradients differ"
    flat = torch.cat([g.flatten() for g in grads.values()])
    ref_flat = torch.cat([ref_grads[n].flatten() for n in grads])
    assert_rel_close(flat, ref_flat, TOL["grad"], f"{case}: all parameter gradients")
    for name in ("model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"):
        assert_rel_close(grads[name], ref_grads[name], TOL["grad"], f"{case}: grad of {name}")
    for key in ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "policy_loss"):
        if key in ref_metrics:
            assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-6), f"{case}: metric {key}"


def test_cases_exercise_clipping_and_kl(batch):
    """Guards the parity test: with the perturbed old log-probs the clip acts on both sides at
    token level and on some sequences at sequence level, and the off-policy mask drops some sequences and keeps others."""
    from trl import GRPOTrainer

    trainer, inputs = batch
    for level in ("token", "sequence"):
        _configure(trainer, loss_type="grpo", level=level, **(GSPO_CLIP if level == "sequence" else {}))
        _, _, metrics = _loss_and_grads(trainer, inputs, GRPOTrainer._compute_loss)
        if level == "token":
            assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
        else:
            assert 0 < metrics["clip_ratio/region_mean"] < 1, metrics
        assert metrics["kl"] > 0
    mask = inputs["completion_mask"]
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], mask], 1), mask.shape[1])
    for threshold in (0.0, 0.02):
        keep = GRPOTrainer.get_off_policy_mask(inputs["advantages"][:, None], logp, inputs["old_per_token_logps"],
                                               mask, threshold)
        assert 0 < keep.sum() < keep.numel(), threshold


# --- TRL's own vLLM importance weights, every vllm_importance_sampling_mode ------------------

VLLM_MODES = {"token_truncate": (0.8, 1.5), "token_mask": (0.8, 1.5),
              "sequence_truncate": (0.5, 2.0), "sequence_mask": (0.5, 2.0)}


@pytest.fixture(scope="module")
def vllm_batches(model_dir, tmp_path_factory):
    """{mode: (trainer, inputs)}: TRL's `_generate_and_score_completions` with use_vllm and its
    importance-sampling correction on, generation by transformers (vLLM is not needed) and
    sampling log-probs that differ from the policy's by ±0.5 nats, so that TRL computes its own
    weight for each mode."""
    trainer = _trainer(model_dir, tmp_path_factory.mktemp("out-vllm"))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    prompts = next(iter(trainer.get_train_dataloader()))
    original = trainer._generate

    def generate(prompts):
        trainer.use_vllm = False            # transformers' generate; the rest of the batch is vLLM's path
        try:
            out = list(original(prompts))
        finally:
            trainer.use_vllm = True
        g = torch.Generator().manual_seed(3)
        out[4] = [(-3.7 + torch.rand(len(ids), generator=g) - 0.5).tolist() for ids in out[1]]
        return tuple(out)

    batches = {}
    trainer._generate = generate
    try:
        for mode, (lo, hi) in VLLM_MODES.items():
            trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
            trainer.vllm_importance_sampling_mode = mode
            trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max = lo, hi
            torch.manual_seed(0)
            with torch.no_grad():
                batches[mode] = trainer._generate_and_score_completions(prompts)
    finally:
        del trainer._generate
    return trainer, batches


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("mode", list(VLLM_MODES))
def test_prolix_loss_matches_trl_for_every_vllm_importance_sampling_mode(vllm_batches, mode, loss_type):
    from trl import GRPOTrainer

    from prolix.kernels.integrations.trl import compute_loss

    trainer, batches = vllm_batches
    inputs = batches[mode]
    w, mask = inputs["importance_sampling_ratio"].expand_as(inputs["completion_mask"]), inputs["completion_mask"].bool()
    lo, hi = VLLM_MODES[mode]
    if mode.endswith("mask"):       # the weights TRL computed drop some tokens and keep others
        assert (w[mask] == 0).any() and (w[mask] > 0).any(), mode
    else:
        assert ((w[mask] == lo) | (w[mask] == hi)).any() and ((w[mask] > lo) & (w[mask] < hi)).any(), mode
    for case in (dict(loss_type=loss_type, is_correction=True),
                 dict(loss_type=loss_type, is_correction=True, off_policy=0.0)):   # vLLM's sampling log-probs
        _configure(trainer, **case)
        ref_loss, ref_grads, ref_metrics = _loss_and_grads(trainer, inputs, GRPOTrainer._compute_loss)
        loss, grads, metrics = _loss_and_grads(trainer, inputs, compute_loss)
        assert_rel_close(loss, ref_loss, TOL["value"], f"{mode} {case}: loss")
        flat = torch.cat([g.flatten() for g in grads.values()])
        assert_rel_close(flat, torch.cat([ref_grads[n].flatten() for n in grads]), TOL["grad"], f"{mode}: grads")
        for key in ("kl", "clip_ratio/region_mean"):
            assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-6), f"{mode}: metric {key}"


def _saved_bytes(fn, exclude: set[int]):
    """Bytes of the distinct storages that autograd saves for the backward while `fn` runs."""
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())


def test_prolix_saves_less_for_backward_than_trl(batch):
    """The loss head's memory: what it keeps alive from the forward to the backward.

    On CPU there is no allocator peak to read, and tracemalloc does not see torch's buffers; but
    the peak of a training step is reached at the start of the backward and is made of the
    tensors saved for it, so we count them: every distinct storage passed to autograd's
    saved-tensor hook, parameters excluded (both sides keep the same weights). The backbone saves
    the same tensors in both runs, so it is measured alone and subtracted. Transient tensors of
    the forward are not counted: both heads stream over the vocabulary in tiles. What remains is
    the head + loss: TRL keeps the packed hidden rows plus ~a dozen [B, C] intermediates of its
    elementwise loss; prolix keeps the packed hidden rows plus a few [N] vectors (lse, E[z],
    targets, ∂loss/∂logp).
    """
    from trl import GRPOTrainer

    from prolix.kernels.integrations.trl import _last_hidden_states, compute_loss

    trainer, inputs = batch
    _configure(trainer, loss_type="grpo")
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    _, backbone = _saved_bytes(lambda: _last_hidden_states(trainer, trainer.model, ids, attn), params)
    trl_loss, trl_total = _saved_bytes(lambda: GRPOTrainer._compute_loss(trainer, trainer.model, inputs), params)
    pro_loss, pro_total = _saved_bytes(lambda: compute_loss(trainer, trainer.model, inputs), params)
    trl_head, pro_head = trl_total - backbone, pro_total - backbone

    n, hidden = int(inputs["completion_mask"].sum()), trainer.model.config.hidden_size
    packed_rows = n * hidden * 4                           # the [N, H] fp32 rows both heads keep
    assert pro_head < trl_head, f"prolix head saves {pro_head} B, TRL's {trl_head} B"
    assert pro_head - packed_rows <= 8 * n * 8, (
        f"beyond the packed rows prolix should save a few [N] vectors, saved {pro_head - packed_rows} B for N={n}")
    assert trl_loss.isfinite() and pro_loss.isfinite()


@pytest.mark.parametrize("option, value, message", [
    ("loss_type", "sapo", "loss_type='sapo'"),
    ("importance_sampling_level", "seq", "importance_sampling_level"),
    ("top_entropy_quantile", 0.5, "top_entropy_quantile"),
    ("off_policy_mask_threshold", float("nan"), "off_policy_mask_threshold"),
    ("use_adaptive_entropy", True, "use_adaptive_entropy"),
    ("entropy_coef", 0.1, "entropy_coef"),
    ("delta", 1.1, "delta=1.1"),
])
def test_unsupported_trl_options_raise_naming_the_option(batch, option, value, message):
    from prolix.kernels.integrations.trl import loss_config_from_trainer

    trainer, _ = batch
    _configure(trainer, loss_type="grpo")
    target = trainer.args if option == "delta" else trainer
    old = getattr(target, option)
    setattr(target, option, value)
    try:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
            loss_config_from_trainer(trainer)
    finally:
        setattr(target, option, old)


def test_prolix_trainer_trains_like_trl(model_dir, tmp_path):
    """Two real optimizer steps (GA = 2, two generations) of ProlixGRPOTrainer and of TRL's trainer
    from the same seed: the same logged losses and the same final weights (fp32 tolerance)."""
    from prolix.kernels.integrations.trl import ProlixGRPOTrainer, patch_grpo_trainer

    runs = {}
    for name, cls in (("trl", None), ("prolix", ProlixGRPOTrainer), ("patched", None)):
        trainer = _trainer(model_dir, tmp_path / name, cls=cls)
        if name == "patched":
            patch_grpo_trainer(trainer)
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        runs[name] = losses, torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    (trl_losses, trl_params), (losses, params) = runs["trl"], runs["prolix"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert losses == pytest.approx(trl_losses, rel=1e-4, abs=1e-6)
    assert_rel_close(params, trl_params, TOL["grad"], "weights after two steps")
    assert runs["patched"][0] == pytest.approx(losses, rel=1e-6, abs=1e-7)


def test_module_imports_without_trl_and_fails_clearly_when_used():
    """`prolix.kernels` must not need trl: import works, use raises an ImportError that says what to do."""
    out = run_without("trl", "import prolix.kernels.integrations.trl as m\n"
                               "try:\n    m.ProlixGRPOTrainer\nexcept ImportError as e:\n    print('ERR', e)\n")
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "pip install trl" in out.stdout, out.stdout
