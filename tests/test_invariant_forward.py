"""The batch-invariant mode of the policy forward and the torch sampler (`algorithm.batch_invariant`).

Bits are compared (`torch.equal` on the int32 view), never tolerances. T = ROW_BLOCK, the row
block of the operator set: row counts sweep 1, T − 1, T, T + 1 and 3T + 5; sequences are packed
in several orders (so at several offsets), alone and in micro-batch plans of different shapes.
The model is a tiny random Qwen2 (hidden 64, 2 layers, 4 query / 2 key-value heads), fp32.
With the mode off the same comparisons find mismatches on this CPU (the stock GEMM takes another
kernel for a one-row call; SiLU's scalar tail differs from its vector body).
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen2Config

from prolix.trainer.bitwise_check import check_bitwise, format_report
from prolix.trainer.cli import main as cli_main
from prolix.trainer.invariant import attention, batch_invariant_ops, block_attention
from prolix.trainer.invariant.attention import QUERY_TILE
from prolix.trainer.invariant.ops import BMM_BLOCK, ROW_BLOCK
from prolix.trainer.model import head_inputs, logprobs, prepare_policy
from prolix.trainer.packing import SequenceRecord, pack
from prolix.trainer.rollout.engines import SamplingConfig, TorchSampler

pytestmark = pytest.mark.usefixtures("one_thread")          # conftest.py: tiny models, one thread

T = ROW_BLOCK
VOCAB = 301
LENGTHS = (2, T - 1, T, T + 1, 3 * T + 5)
PLANS = ([[0, 1, 2, 3, 4]], [[4, 3, 2, 1, 0]], [[2, 0], [4, 1, 3]], [[3], [1, 4, 0], [2]])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


@pytest.fixture(scope="module")
def model():
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512)
    torch.manual_seed(0)
    return prepare_policy(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), liger=False)


@pytest.fixture(scope="module")
def records():
    g = torch.Generator().manual_seed(1)
    return [SequenceRecord(token_ids=torch.randint(0, VOCAB, (n,), generator=g), response_start=1, advantage=0.0)
            for n in LENGTHS]


def per_sequence(values: torch.Tensor, recs: list[SequenceRecord]) -> list[torch.Tensor]:
    return list(values.split([len(r.token_ids) for r in recs]))


def mismatches(model, records, what: str, batch_invariant: bool) -> int:
    """Sequences whose `what` ("hidden" or "logp") differs in any bit between being computed alone
    and inside each micro-batch plan."""
    def run(recs):
        with torch.no_grad():
            if what == "hidden":
                return per_sequence(head_inputs(model, pack(recs), batch_invariant=batch_invariant)[0], recs)
            return per_sequence(logprobs(model, pack(recs), batch_invariant=batch_invariant), recs)
    alone = [run([r])[0] for r in records]
    bad = 0
    for plan in PLANS:
        for idx in plan:
            for i, got in zip(idx, run([records[i] for i in idx])):
                bad += not torch.equal(bits(got), bits(alone[i]))
    return bad


def test_operators_give_each_row_the_same_bits_whatever_the_row_count():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(3 * T + 5, 48, generator=g), torch.randn(40, 48, generator=g)
    ops = {"linear": lambda a: F.linear(a, w), "matmul": lambda a: a @ w.T, "silu": F.silu,
           "rms": lambda a: a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6),
           "softmax": lambda a: a.softmax(-1), "exp_cos": lambda a: a.exp() + a.cos()}
    perm = torch.randperm(x.shape[0], generator=g)
    with batch_invariant_ops():
        for name, op in ops.items():
            full = op(x)
            for n in LENGTHS + (1,):
                assert torch.equal(bits(op(x[:n])), bits(full[:n])), (name, n)
                assert torch.equal(bits(op(x[-n:])), bits(full[-n:])), (name, n)       # another offset
            assert torch.equal(bits(op(x[perm])), bits(full[perm])), name


def test_a_query_attends_alike_alone_and_among_others():
    g = torch.Generator().manual_seed(3)
    n, h, h_kv, d = 3 * T + 5, 4, 2, 16
    q, k, v = torch.randn(n, h, d, generator=g), torch.randn(n, h_kv, d, generator=g), torch.randn(n, h_kv, d, generator=g)
    starts, visible = torch.zeros(n, dtype=torch.long), torch.arange(1, n + 1)
    full = block_attention(q, k, v, starts, visible, scaling=0.25)
    for i in (0, T - 2, T - 1, T, n - 1):                   # one query alone, over only its own keys
        one = block_attention(q[i:i + 1], k[:i + 1], v[:i + 1], starts[:1], visible[i:i + 1], scaling=0.25)
        assert torch.equal(bits(one), bits(full[i:i + 1])), i
    shifted = torch.cat([torch.randn(7, h_kv, d, generator=g), k])            # the sequence at offset 7
    shifted_v = torch.cat([torch.randn(7, h_kv, d, generator=g), v])
    moved = block_attention(q, shifted, shifted_v, starts + 7, visible, scaling=0.25)
    assert torch.equal(bits(moved), bits(full))


def test_a_query_attends_alike_in_a_whole_and_in_a_padded_batched_matmul_call():
    """Short sequences, enough of them that the tiles × key-value heads fill more than one
    BMM_BLOCK call (whole calls and a padded last one) and reach the end of the key rows."""
    g = torch.Generator().manual_seed(6)
    lengths, h, h_kv, d = [3, 40] * 90 + [37], 4, 2, 16
    n = sum(lengths)
    q, k, v = torch.randn(n, h, d, generator=g), torch.randn(n, h_kv, d, generator=g), torch.randn(n, h_kv, d, generator=g)
    first = torch.tensor([0] + lengths[:-1]).cumsum(0)
    starts = torch.repeat_interleave(first, torch.tensor(lengths))
    visible = torch.arange(n) - starts + 1
    assert n // QUERY_TILE * h_kv > 2 * BMM_BLOCK
    full = block_attention(q, k, v, starts, visible, scaling=0.25)
    for s in (0, 1, 2, 90, len(lengths) - 1):               # a sequence alone
        a, b = int(first[s]), int(first[s]) + lengths[s]
        one = block_attention(q[a:b], k[a:b], v[a:b], starts[a:b] - a, visible[a:b], scaling=0.25)
        assert torch.equal(bits(one), bits(full[a:b])), s


@pytest.mark.parametrize("tile_blocks", [1, 7, 1 << 20])
def test_grouping_and_splitting_the_tiles_changes_no_bit(monkeypatch, tile_blocks):
    """Sequences of 1 to 11 key blocks: the tiles go to groups by block count (`_tile_groups`), and
    a group to calls of at most TILE_BLOCKS tile-blocks. Every split gives the bits of one call
    over everything (computed first with the limit lifted), and matches float64 attention."""
    g = torch.Generator().manual_seed(8)
    lengths, h, h_kv, d = [1, 5, 33, 64, 97, 350, 2], 4, 2, 16
    n = sum(lengths)
    q, k, v = torch.randn(n, h, d, generator=g), torch.randn(n, h_kv, d, generator=g), torch.randn(n, h_kv, d, generator=g)
    first = torch.tensor([0] + lengths[:-1]).cumsum(0)
    starts = torch.repeat_interleave(first, torch.tensor(lengths))
    visible = torch.arange(n) - starts + 1
    monkeypatch.setattr(attention, "_tile_groups", lambda n_blocks: [torch.arange(n_blocks.numel())])
    whole = block_attention(q, k, v, starts, visible, scaling=0.25)          # one call, every tile at 11 blocks
    monkeypatch.undo()
    monkeypatch.setattr(attention, "TILE_BLOCKS", tile_blocks)
    out = block_attention(q, k, v, starts, visible, scaling=0.25)
    assert torch.equal(bits(out), bits(whole))
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    kk, vv = k.double().repeat_interleave(h // h_kv, 1), v.double().repeat_interleave(h // h_kv, 1)
    scores = torch.einsum("mhd,nhd->hmn", q.double(), kk) * 0.25
    scores = scores.masked_fill(~((j <= i) & (starts[None] == starts[:, None])), float("-inf"))
    ref = torch.einsum("hmn,nhd->mhd", scores.softmax(-1), vv)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6


def test_a_sliding_window_that_hides_whole_key_blocks_gives_finite_windowed_attention():
    """Window 3: a late query's tile walks key blocks none of its queries sees; its output is the
    float64 windowed softmax's (no NaN), and a query alone still gets the bits it gets among others."""
    g = torch.Generator().manual_seed(4)
    n, h, d, window = 3 * T + 5, 2, 8, 3
    q, k, v = torch.randn(n, h, d, generator=g), torch.randn(n, 1, d, generator=g), torch.randn(n, 1, d, generator=g)
    starts, visible = torch.zeros(n, dtype=torch.long), torch.arange(1, n + 1)
    out = block_attention(q, k, v, starts, visible, scaling=d ** -0.5, window=window)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    scores = torch.einsum("mhd,nd->hmn", q.double(), k[:, 0].double()) * d ** -0.5
    scores = scores.masked_fill(~((j <= i) & (j >= i - window)), float("-inf"))
    ref = torch.einsum("hmn,nd->mhd", scores.softmax(-1), v[:, 0].double())
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6
    for m in (T + 1, n - 1):
        one = block_attention(q[m:m + 1], k[:m + 1], v[:m + 1], starts[:1], visible[m:m + 1], scaling=d ** -0.5,
                              window=window)
        assert torch.equal(bits(one), bits(out[m:m + 1])), m


@pytest.mark.parametrize("what", ["hidden", "logp"])
def test_packed_forward_is_batch_invariant(model, records, what):
    assert mismatches(model, records, what, batch_invariant=True) == 0


def test_the_modes_gradients_are_the_stock_forwards(model, records):
    """The mode promises forward bits; its backward (stock GEMMs for the blocked linears, one
    causal SDPA per sequence for the attention) must still be the gradient of the same function:
    every parameter's gradient of a packed loss agrees with the stock forward's to fp32 rounding."""
    batch = pack(list(records))
    weights = torch.linspace(-1, 1, batch.targets.numel())

    def grads(batch_invariant: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        (logprobs(model, batch, batch_invariant=batch_invariant) * weights).sum().backward()
        out = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return out

    for name, got, ref in zip([n for n, _ in model.named_parameters()], grads(True), grads(False)):
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5, name


class Tok:
    """The sampler's view of a tokenizer: token 0 ends a response (and pads)."""
    eos_token_id, pad_token_id = 0, 0

    def decode(self, ids, skip_special_tokens=True):
        return ""


def test_decode_gives_the_packed_forward_bits(model):
    """The sampler's rollout log-probs are the trainer's old log-probs: one-token decode over the
    KV cache (left-padded rows of different lengths, several rows at once) vs the packed forward."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (1, 9, T - 1, T + 1)]
    sampler = TorchSampler(model, Tok(), max_model_len=T + 40, batch_invariant=True)
    groups = sampler.generate(prompts, SamplingConfig(n=3, temperature=1.0, max_tokens=30, seed=5))
    done = [c for group in groups for c in group]
    recs = [SequenceRecord(token_ids=c.prompt_ids + c.response_ids, response_start=len(c.prompt_ids), advantage=0.0)
            for c in done]
    batch = pack(recs)
    with torch.no_grad():
        trainer = batch.split_responses(logprobs(model, batch, batch_invariant=True))
    for c, old in zip(done, trainer):
        assert torch.equal(bits(torch.tensor(c.response_logprobs, dtype=torch.float32)), bits(old))


def test_check_bitwise_reports_zero_in_the_mode(model):
    prompts = [[5, 6, 7], list(range(1, 40))]
    report = check_bitwise(model, Tok(), prompts, samples=2, max_tokens=8)
    assert set(report) == {"default", "batch_invariant"}
    assert report["batch_invariant"]["alone_vs_packed"] == 0.0 and report["batch_invariant"]["rollout_vs_trainer"] == 0.0
    assert report["default"]["sequences"] == 4 and report["default"]["rollout_vs_trainer"] >= 0.0
    assert format_report(report).splitlines()[2].startswith("batch_invariant")


def test_the_commands_refuse_bad_arguments_in_one_line(tmp_path, capsys):
    assert cli_main(["check-bitwise", str(tmp_path / "missing")]) == 2
    assert cli_main(["bench", "bitwise-step", "--steps", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("prolix check-bitwise: ") and "does not exist" in err[0]
    assert err[1] == "prolix bench bitwise-step: --steps: expected > 2 (the first 2 are start-up), got 2"


def test_packed_attention_values_and_gradients_match_float64():
    """The packed layout's autograd function (`_PackedAttention`: the fixed-block forward, the
    per-sequence SDPA backward) against float64 causal attention, GQA and a window that cuts:
    sequences of 1, 33 and 70 tokens (one, two and three key blocks), values and q/k/v gradients."""
    g = torch.Generator().manual_seed(9)
    lengths, h, h_kv, d = [1, 33, 70], 4, 2, 8
    n = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v = (torch.randn(1, heads, n, d, generator=g, requires_grad=True) for heads in (h, h_kv, h_kv))
    grad = torch.randn(1, n, h, d, generator=g)
    for window in (None, 9):
        out = attention.fixed_block_attention(q, k, v, scaling=d ** -0.5, sliding_window=window, cu_seqlens=cu)
        got = torch.autograd.grad(out, (q, k, v), grad)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        kk, vv = (t.repeat_interleave(h // h_kv, 1) for t in (k64, v64))
        i, j = torch.arange(n)[:, None], torch.arange(n)[None]
        seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        keep = (j <= i) & (seq[:, None] == seq[None]) & ((j > i - window) if window else True)
        scores = (q64 @ kk.transpose(-1, -2) * d ** -0.5).masked_fill(~keep, float("-inf"))
        ref = (scores.softmax(-1) @ vv).transpose(1, 2)                               # [1, N, h, D]
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6, window
        for a, b in zip(got, torch.autograd.grad(ref, (q64, k64, v64), grad.double())):
            assert ((a.double() - b).norm() / b.norm()).item() < 1e-5, window
