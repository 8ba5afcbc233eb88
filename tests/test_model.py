"""The packed policy forward equals running each sequence alone, for real HF model classes.

Tiny random Qwen2 and Llama models are built from their config classes (no download): hidden 64,
2 layers, 4 query / 2 key-value heads (GQA, as in the real models), vocabulary 301 (not a power
of two, so no kernel tile divides it), fp32. The reference for every packed quantity is the
unmodified transformers model (sdpa) run on one sequence at a time, unpadded.

Sequence lengths 5, 13 and 9 are unaligned, and the first response starts at different places,
so an off-by-one in position_ids, cu_seqlens or the target shift shows up as a mismatch.
"""

import copy
import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from prolix.kernels import GRPOLossConfig
from prolix.kernels.reference import grpo_loss_ref
from prolix.trainer.model import (
    ATTN_IMPLEMENTATION,
    forward_hidden,
    lm_head_weight,
    load_policy,
    logprobs,
    packed_grpo_loss,
    prepare_policy,
    save_policy,
)
from prolix.trainer.packing import SequenceRecord, pack

VOCAB = 301
LENGTHS = (5, 13, 9)
FAMILIES = ("qwen2", "llama")
CPU_BACKENDS = ("sdpa_per_sequence", "sdpa_block_mask")
# fp32 end to end; the packed and per-sequence paths differ only in GEMM blocking (rows [N, H]
# vs [L, H]) and reduction order, i.e. a few ulps of the activations.
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def tiny_model(family: str, *, tied: bool = False, seed: int = 0, **overrides):
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                  tie_word_embeddings=tied, **overrides)
    config = Qwen2Config(**common) if family == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def make_records(lengths=LENGTHS, seed=0, with_logps=False):
    g = torch.Generator().manual_seed(seed)
    records = []
    for i, length in enumerate(lengths):
        start = 1 + i % (length - 1)
        extra = {}
        if with_logps:
            r = length - start
            extra = dict(old_logp=-5.7 + 0.3 * torch.randn(r, generator=g),
                         ref_logp=-5.7 + 0.3 * torch.randn(r, generator=g))
        records.append(SequenceRecord(token_ids=torch.randint(0, VOCAB, (length,), generator=g), response_start=start,
                                      advantage=float(torch.randn((), generator=g)), **extra))
    return records


def reference_hidden(ref, records):
    """Each sequence run alone through the untouched HF model: list of [L, H]."""
    return [ref.model(input_ids=torch.as_tensor(r.token_ids)[None]).last_hidden_state[0] for r in records]


def reference_logprobs(ref, records, temperature=1.0):
    """log_softmax of the HF model's own logits at each next token; 0 on each last row. [N]."""
    out = []
    for r in records:
        ids = torch.as_tensor(r.token_ids)
        logits = ref(input_ids=ids[None]).logits[0].float() / temperature         # (L, V)
        lp = torch.log_softmax(logits, -1)[:-1].gather(1, ids[1:, None])[:, 0]
        out.append(torch.cat([lp, lp.new_zeros(1)]))
    return torch.cat(out)


def packed_and_reference(family, **kw):
    model = tiny_model(family, **kw)
    ref = copy.deepcopy(model)
    prepare_policy(model)
    return model, ref


def assert_grads_close(model, ref, dtype=torch.float32):
    ref_grads = dict(ref.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        q = ref_grads[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")
            checked += 1
    assert checked > 10


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_hidden_states_independent_of_neighbours(family, backend):
    model, ref = packed_and_reference(family)
    records = make_records()
    with torch.no_grad():
        hidden = forward_hidden(model, pack(records), attn_backend=backend)            # (N, H)
        assert hidden.shape == (sum(LENGTHS), 64)
        torch.testing.assert_close(hidden, torch.cat(reference_hidden(ref, records)), **TOL[torch.float32])
        # the middle sequence, now first and beside different neighbours, is unchanged
        others = make_records(lengths=(7, 3), seed=5)
        moved = forward_hidden(model, pack([records[1], *others]), attn_backend=backend)[: LENGTHS[1]]
        torch.testing.assert_close(moved, hidden[LENGTHS[0]: LENGTHS[0] + LENGTHS[1]], **TOL[torch.float32])


def test_full_causal_attention_over_the_pack_would_be_caught():
    # The control for the test above: running the pack as one ordinary sequence (positions
    # 0..N−1, causal over everything) gives visibly different hidden states for sequence 1.
    model, ref = packed_and_reference("qwen2")
    records = make_records()
    with torch.no_grad():
        expected = reference_hidden(ref, records)[1]
        naive = ref.model(input_ids=pack(records).input_ids[None]).last_hidden_state[0]
        leaked = naive[LENGTHS[0]: LENGTHS[0] + LENGTHS[1]]
    assert (leaked - expected).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logprobs_equal_log_softmax_of_hf_logits(family):
    model, ref = packed_and_reference(family)
    records = make_records()
    batch = pack(records)
    with torch.no_grad():
        for temperature in (1.0, 0.7):
            lp = logprobs(model, batch, temperature=temperature)
            assert lp.shape == (batch.num_tokens,) and lp.dtype == torch.float32
            torch.testing.assert_close(lp, reference_logprobs(ref, records, temperature), **TOL[torch.float32])
        lp, ent = logprobs(model, batch, return_entropy=True)
        assert ent.shape == lp.shape and (ent[batch.targets != -100] > 0).all()
        assert (lp[batch.targets == -100] == 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_gradients_equal_per_sequence_gradients(family):
    model, ref = packed_and_reference(family)
    records = make_records()
    batch = pack(records)
    weights = torch.randn(batch.num_tokens, generator=torch.Generator().manual_seed(3)) * batch.loss_mask
    (weights * logprobs(model, batch)).sum().backward()
    (weights * reference_logprobs(ref, records)).sum().backward()
    assert_grads_close(model, ref)


def test_tied_embeddings_share_one_weight_and_its_gradient():
    model, ref = packed_and_reference("qwen2", tied=True)
    assert lm_head_weight(model) is model.get_input_embeddings().weight
    records = make_records()
    batch = pack(records)
    with torch.no_grad():
        torch.testing.assert_close(logprobs(model, batch), reference_logprobs(ref, records), **TOL[torch.float32])
    logprobs(model, batch)[batch.loss_mask].sum().backward()
    reference_logprobs(ref, records)[batch.loss_mask].sum().backward()
    # the embedding gets both the input-side and the LM-head gradient, as in the HF model
    torch.testing.assert_close(model.get_input_embeddings().weight.grad, ref.get_input_embeddings().weight.grad,
                               **TOL[torch.float32])
    assert_grads_close(model, ref)


def test_activation_checkpointing_keeps_gradients():
    plain = tiny_model("llama")
    ckpt = copy.deepcopy(plain)
    prepare_policy(plain)
    prepare_policy(ckpt, gradient_checkpointing=True)
    batch = pack(make_records())
    for m in (plain, ckpt):
        m.train()                       # HF checkpoints only in train mode; dropout is 0 here
        logprobs(m, batch)[batch.loss_mask].sum().backward()
    assert ckpt.model.gradient_checkpointing
    assert_grads_close(ckpt, plain)


def test_sliding_window_layers_keep_the_window_per_sequence():
    # Qwen2 with a 4-token window on layer 1: keys further back than 3 positions are invisible.
    model, ref = packed_and_reference("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    records = make_records()
    with torch.no_grad():
        expected = torch.cat(reference_hidden(ref, records))
        for backend in CPU_BACKENDS:
            hidden = forward_hidden(model, pack(records), attn_backend=backend)
            torch.testing.assert_close(hidden, expected, **TOL[torch.float32])


def test_packed_grpo_loss_and_gradients_match_the_reference():
    model, ref = packed_and_reference("qwen2")
    records = make_records(with_logps=True)
    batch = pack(records)
    config = GRPOLossConfig(kl_coef=0.1, loss_agg="seq-mean-token-mean")
    loss, metrics = packed_grpo_loss(model, batch, config=config)
    expected = grpo_loss_ref(reference_logprobs(ref, records), batch.advantages, batch.loss_mask,
                             old_logp=batch.old_logp, ref_logp=batch.ref_logp, cu_seqlens=batch.cu_seqlens,
                             config=config, upcast=False)
    torch.testing.assert_close(loss, expected.float(), **TOL[torch.float32])
    assert metrics["num_tokens"] == batch.loss_mask.sum()
    loss.backward()
    expected.backward()
    assert_grads_close(model, ref)


def test_plain_hf_calls_still_behave_like_sdpa_after_prepare():
    # prepare_policy switches attention to prolix's; outside forward_hidden (generation, padded
    # batches) the model must stay exactly transformers' sdpa, padding mask included.
    model, ref = packed_and_reference("llama")
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0                                                       # left padding
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def _varlen_reference(q, k, v, cu, scale):
    """(N, h, D) varlen causal attention from per-sequence SDPA, for the fakes below."""
    out = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))    # (1, h, L, D)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                  enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(out)


def _fake_flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
                window_size=(-1, -1)):
    assert causal and window_size == (-1, 0) and cu_q.dtype == torch.int32 and max_q == max(LENGTHS)
    assert q.shape[1] == 4 and k.shape[1] == 2                    # GQA handed over as is
    return _varlen_reference(q, k, v, cu_q, softmax_scale)


def _fake_torch_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                       window_size=(-1, -1), enable_gqa=False):
    assert window_size == (-1, 0) and enable_gqa and key.shape[1] == 2
    return _varlen_reference(query, key, value, cu_seq_q, scale)


def _fake_old_torch_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                           return_aux=None, scale=None):
    assert is_causal and key.shape[1] == query.shape[1]           # no enable_gqa: K/V repeated
    return _varlen_reference(query, key, value, cu_seq_q, scale)


@pytest.mark.parametrize("backend, fake", [("flash_attn", _fake_flash), ("torch_varlen", _fake_torch_varlen),
                                           ("torch_varlen", _fake_old_torch_varlen)])
def test_varlen_backends_pass_layouts_and_flags_correctly(monkeypatch, backend, fake):
    # The CUDA-only kernels replaced by CPU fakes with their real signatures: checks the
    # (1, h, N, D) ↔ (N, h, D) layouts, cu_seqlens, causal/window flags and the GQA handling.
    import prolix.trainer.model as policy

    monkeypatch.setattr(policy, "resolve_attn_backend", lambda name, *args, **kw: name)
    monkeypatch.setattr(policy, "_flash_attn_varlen", lambda: fake)
    monkeypatch.setattr(policy, "_torch_varlen", lambda: (fake, frozenset(inspect.signature(fake).parameters)))
    model, ref = packed_and_reference("llama")
    records = make_records()
    with torch.no_grad():
        hidden = forward_hidden(model, pack(records), attn_backend=backend)
        torch.testing.assert_close(hidden, torch.cat(reference_hidden(ref, records)), **TOL[torch.float32])


def test_unknown_attention_backend_is_rejected():
    model = tiny_model("qwen2")
    with pytest.raises(ValueError, match="attn_backend"):
        forward_hidden(model, pack(make_records()), attn_backend="xformers")
    with pytest.raises(ValueError, match="needs CUDA"):
        forward_hidden(model, pack(make_records()), attn_backend="torch_varlen")


def test_logit_softcapping_head_is_rejected():
    model = tiny_model("qwen2")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        lm_head_weight(model)


# ----------------------------------------------------------------------------- load / save


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model, ref = packed_and_reference("qwen2")
    (tmp_path / "src").mkdir()
    path = save_policy(model, tmp_path / "ckpt")
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    assert "prolix" not in (path / "config.json").read_text()                  # loaders use their default
    default = load_policy(path)   # the per-device default: bf16 on CUDA, fp32 on CPU
    if torch.cuda.is_available():
        assert default.dtype == torch.bfloat16 and default.device.type == "cuda"
    else:
        assert default.dtype == torch.float32 and default.device.type == "cpu"
    del default
    loaded = load_policy(path, dtype=torch.float32, device="cpu")
    batch = pack(make_records())
    with torch.no_grad():
        torch.testing.assert_close(forward_hidden(loaded, batch), forward_hidden(model, batch), atol=0, rtol=0)
        # and plain transformers reads the same checkpoint
        plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = batch.input_ids[None, :9]
        torch.testing.assert_close(plain(input_ids=ids).logits, ref(input_ids=ids).logits, atol=0, rtol=0)


def test_save_copies_the_tokenizer_of_the_source_directory(tmp_path):
    model = tiny_model("llama", tied=True)
    src = save_policy(model, tmp_path / "src")
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    loaded = load_policy(src, dtype=torch.float32, device="cpu", gradient_checkpointing=True)
    assert loaded.model.gradient_checkpointing
    assert lm_head_weight(loaded) is loaded.get_input_embeddings().weight        # still tied after reload
    dst = save_policy(loaded, tmp_path / "dst")
    assert json.loads((dst / "tokenizer_config.json").read_text()) == {"model_max_length": 512}


def test_load_policy_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        load_policy(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(tiny_model("qwen2").config.to_json_string())
    with pytest.raises(FileNotFoundError, match="empty.*holds no weights"):
        load_policy(empty)
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="weights.bin"):
        load_policy(a_file)


# ----------------------------------------------------------------------------- CUDA


CUDA_BACKENDS = ("flash_attn", "torch_varlen", "sdpa_block_mask", "sdpa_per_sequence")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA attention backends need a GPU")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_backends_match_per_sequence_reference_in_bf16(family, backend):
    from prolix.trainer.model import resolve_attn_backend

    try:
        resolve_attn_backend(backend, torch.device("cuda"), torch.bfloat16)
    except ValueError as e:
        pytest.skip(str(e))
    model = tiny_model(family).to("cuda", torch.bfloat16)
    ref = copy.deepcopy(model)
    prepare_policy(model, liger=False)
    records = make_records()
    batch = pack(records).to("cuda")
    with torch.no_grad():
        hidden = forward_hidden(model, batch, attn_backend=backend)
        expected = torch.cat([ref.model(input_ids=torch.as_tensor(r.token_ids, device="cuda")[None])
                              .last_hidden_state[0] for r in records])
    # both bf16: at most a few bf16 ulps of the activations apart
    torch.testing.assert_close(hidden.float(), expected.float(), **TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_load_policy_defaults_to_bf16_on_cuda(tmp_path):
    path = save_policy(tiny_model("llama"), tmp_path / "ckpt")
    model = load_policy(path, liger=False)          # liger patches module globals: not in a shared process
    assert model.dtype == torch.bfloat16 and model.device.type == "cuda"
    batch = pack(make_records()).to("cuda")
    assert logprobs(model, batch).isfinite().all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels are Triton-on-CUDA only")
def test_liger_kernels_keep_hidden_states_on_cuda(monkeypatch):
    pytest.importorskip("liger_kernel")
    from transformers.models.qwen2 import modeling_qwen2

    # Liger swaps RoPE / RMSNorm / MLP at module level; restore them for the tests that follow.
    for name in ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP"):
        monkeypatch.setattr(modeling_qwen2, name, getattr(modeling_qwen2, name))
    model = tiny_model("qwen2").to("cuda", torch.bfloat16)
    prepare_policy(model, liger=False)
    batch = pack(make_records()).to("cuda")
    with torch.no_grad():
        expected = forward_hidden(model, batch)                  # before the module-level patch
        prepare_policy(model, liger=True)
        got = forward_hidden(model, batch)
    torch.testing.assert_close(got.float(), expected.float(), **TOL[torch.bfloat16])
