"""Shared helpers for the data tests: a tiny byte-level BPE trained in-process, example writers, strategies."""

from __future__ import annotations

import functools
import json

from hypothesis import strategies as st

from sft_jax.data.formats import BUILTIN_TEMPLATE
from sft_jax.models.tokenizer import set_chat_template, train_bytelevel_bpe

CORPUS = [
    "### System:\nYou are helpful.\n\n### User:\nGive three tips for staying healthy.\n\n### Assistant:\n"
    "Eat well, sleep, and exercise.<|endoftext|>",
    "The quick brown fox jumps over the lazy dog. 0123456789 café naïve 東京 emoji 🙂 tabs\tand\r\nnewlines",
    "Write a poem about the sea. Translate 'hello' to French: bonjour. Sum 12 + 30 = 42.",
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tokenizer = train_bytelevel_bpe(CORPUS * 20, vocab_size=400)
    return tokenizer.backend_tokenizer.to_str()


def small_tokenizer(template: str | None = BUILTIN_TEMPLATE):
    """A fresh copy of a small byte-level BPE (trained once per session), with `template` set."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token=eos,
        bos_token=eos,
        unk_token=eos,
        clean_up_tokenization_spaces=False,
    )
    if template is not None:
        set_chat_template(tokenizer, template)
    return tokenizer


def reloaded(tokenizer, tmp_path):
    """The tokenizer after save_pretrained and AutoTokenizer.from_pretrained, as a user would load it."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    return AutoTokenizer.from_pretrained(tmp_path)


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row, ensure_ascii=False))
            f.write("\n")
    return str(path)


def alpaca_rows(n: int, start: int = 0) -> list[dict]:
    return [
        {"instruction": f"Say the number {i}.", "input": "" if i % 3 else f"Number {i}", "output": f"It is {i}."}
        for i in range(start, start + n)
    ]


# Any unicode except surrogates; the eos text never appears by chance.
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
nonblank = text.filter(lambda s: s.strip() != "")
long_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=200, max_size=600)


@st.composite
def chats(draw, max_turns: int = 4):
    """A chat with an optional system message and 1..max_turns user/assistant turns (user may be empty)."""
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(text)})
    for _ in range(draw(st.integers(1, max_turns))):
        messages.append({"role": "user", "content": draw(text)})
        messages.append({"role": "assistant", "content": draw(nonblank)})
    return messages
