"""The demo's character-level tokenizer: exact round trips, portable save/load, the chat format."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from prolix.trainer.demo import worked_answer
from prolix.trainer.tasks import SourceConfig, make_source
from prolix.trainer.tokenizer import (
    DEFAULT_ALPHABET,
    SPECIAL_TOKENS,
    SYSTEM_PROMPT,
    build_char_tokenizer,
    format_prompt,
)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


# Text that spells a special token ("<unk>", "<|im_end|>") encodes to that token, as in every HF
# tokenizer (the chat template relies on it); the identity holds for all other text.
@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=DEFAULT_ALPHABET, max_size=200).filter(lambda t: not any(s in t for s in SPECIAL_TOKENS)))
def test_encode_decode_is_the_identity_one_token_per_character(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


def test_whitespace_runs_and_edges_survive(tok):
    for text in ["  lead", "trail  ", "a\n\n\tb", " . , ", "\n", "<answer> -4 </answer>\n", "<|im_x|> <unk"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_special_tokens_have_fixed_ids_and_unknown_characters_map_to_unk(tok):
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3]
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert len(tok) == len(SPECIAL_TOKENS) + len(DEFAULT_ALPHABET)
    assert tok.encode("1é2", add_special_tokens=False) == [tok.convert_tokens_to_ids("1"), tok.unk_token_id,
                                                           tok.convert_tokens_to_ids("2")]
    ids = tok.encode("<|im_start|>hi<|im_end|><|endoftext|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-2:] == [2, 0] and len(ids) == 5  # specials are single tokens
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_alphabet_with_repeated_characters_is_rejected():
    with pytest.raises(ValueError, match="repeated"):
        build_char_tokenizer("abca")


def test_save_and_autotokenizer_load_round_trip(tmp_path):
    original = build_char_tokenizer(save_dir=str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Calculate ( 56 + -33 ) - 84.\n<answer>-61</answer>"
    assert loaded.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id) == (0, 0, 3)
    assert format_prompt(loaded, "q") == format_prompt(original, "q")
    # Portable for transformers 4.x (vLLM): a class it knows, special tokens as a list it reads.
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert "extra_special_tokens" not in cfg and "chat_template" in cfg
    assert (tmp_path / "tokenizer.json").is_file()


def test_chat_template_is_qwen_style(tok):
    ids = format_prompt(tok, "Calculate 1 + 2.")
    assert tok.decode(ids) == (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
                               "<|im_start|>user\nCalculate 1 + 2.<|im_end|>\n<|im_start|>assistant\n")
    short = format_prompt(tok, "Calculate 1 + 2.", system_prompt=None)
    assert tok.decode(short) == "<|im_start|>user\nCalculate 1 + 2.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.unk_token_id not in ids


@pytest.mark.parametrize("name", ["chain_sum", "basic_arithmetic"])
def test_default_alphabet_covers_the_demo_tasks(tok, name):
    src = make_source(SourceConfig(kind="reasoning_gym", name=name, heldout_size=0))
    for p in src.sample(300, random.Random(0)):
        ids = tok.encode(p.prompt + worked_answer(p), add_special_tokens=False)
        assert tok.unk_token_id not in ids, p.prompt
