"""The embedded demo's character-level tokenizer (no download) and the prompt format.

`build_char_tokenizer(alphabet)` makes a Hugging Face fast tokenizer with one token per character:
a `tokenizers` WordLevel model over the alphabet, a Split pre-tokenizer that isolates every
character (spaces and newlines included: no normaliser, no whitespace handling) and a Fuse
decoder that concatenates tokens back. Encoding then decoding any string over the alphabet is the
identity, except that text spelling a special token ("<|im_end|>") encodes to that one token, as
in every HF tokenizer (the chat template relies on it); a character outside the alphabet becomes
the unk token.

Vocabulary (ids are stable: the demo's model is built for `len(tokenizer)`):

    0 "<|endoftext|>"  eos and pad (prolix packs without padding, so pad never masks an eos)
    1 "<|im_start|>"   2 "<|im_end|>"   3 "<unk>"
    4 ...              the alphabet's characters, in order

A completion ends with eos ("<|endoftext|>"), so the demo's supervised warm start appends it to
each worked answer. The chat template is Qwen's layout without its default system prompt:

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n

`save_dir` (or `save_tokenizer`) writes a portable directory: tokenizer.json plus a
tokenizer_config.json that names `PreTrainedTokenizerFast`, lists the special tokens as
`additional_special_tokens` and embeds the chat template (plus chat_template.jinja), so that
transformers 4.x (vLLM's pinned versions) as well as 5.x load it with `AutoTokenizer`. transformers
5's own `save_pretrained` writes `TokenizersBackend` and a list-valued `extra_special_tokens`,
which transformers 4.x cannot read.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "IM_START",
    "IM_END",
    "SPECIAL_TOKENS",
    "DEFAULT_ALPHABET",
    "CHAT_TEMPLATE",
    "SYSTEM_PROMPT",
    "build_char_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
    "format_prompt",
]

EOS_TOKEN = PAD_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END, UNK_TOKEN)  # ids 0..3

# Printable ASCII plus newline and tab: covers reasoning-gym's chain_sum and basic_arithmetic
# questions (digits, letters, " ()*+-./:=?"), the worked answers and the <answer> tags.
DEFAULT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n\t"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Short on purpose: the demo's tiny model reads it on every prompt.
SYSTEM_PROMPT = "Think step by step, then give the final answer in <answer></answer>."


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET, save_dir: str | None = None) -> PreTrainedTokenizerFast:
    """A character-level HF tokenizer over `alphabet` (see the module docstring for the layout).

    alphabet: the characters that get a token each, in id order from 4; no duplicates.
    save_dir: if given, the tokenizer is also written there (`save_tokenizer`).
    Returns a `PreTrainedTokenizerFast` with eos = pad = "<|endoftext|>", unk = "<unk>", the
    "<|im_start|>"/"<|im_end|>" special tokens and the chat template.
    """
    if not isinstance(alphabet, str) or not alphabet:
        raise ValueError(f"alphabet must be a non-empty string, got {alphabet!r}")
    dupes = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if dupes:
        raise ValueError(f"alphabet has repeated characters {dupes!r}")
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *alphabet))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every character its own pre-token; "[\s\S]" because Oniguruma's "." skips newlines.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # " ." must decode as " ."
    )
    if save_dir is not None:
        save_tokenizer(hf, save_dir)
    return hf


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, save_dir: str) -> None:
    """`save_pretrained`, then rewrite tokenizer_config.json so transformers 4.x loads it too."""
    tokenizer.save_pretrained(save_dir)
    path = os.path.join(save_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):  # transformers 5 wrote a list; 4.x expects a dict under this key
        cfg["additional_special_tokens"] = extra
    elif extra:
        cfg["extra_special_tokens"] = extra
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if tokenizer.chat_template:
        cfg["chat_template"] = tokenizer.chat_template
    for key in ("backend", "is_local", "local_files_only"):  # loader state, not tokenizer config
        cfg.pop(key, None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


def format_prompt(tokenizer, problem_prompt: str, system_prompt: str | None = SYSTEM_PROMPT) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant header.

    system_prompt: None or "" omits the system turn (shorter prompts for tiny models).
    """
    messages = [{"role": "user", "content": problem_prompt}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already spells every special token; a BOS/EOS added here would be wrong.
    return tokenizer.encode(text, add_special_tokens=False)


def load_tokenizer(path: str | Path):
    """The tokenizer saved in `path`, as its files declare it.

    transformers 5's AutoTokenizer swaps in the registered class for some model types (qwen2
    among them: `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`), which rebuilds the pre-tokenizer
    and would turn the demo's character tokenizer into Qwen's byte-level one (spaces dropped).
    A tokenizer_config.json that names the generic fast class is therefore loaded as that."""
    config = Path(path) / "tokenizer_config.json"
    declared = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if declared in ("PreTrainedTokenizerFast", "TokenizersBackend") and (Path(path) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
