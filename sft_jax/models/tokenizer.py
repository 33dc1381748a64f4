"""Tokenizers for sft_jax: load an HF tokenizer, train a tiny byte-level BPE, carry the chat template.

GPT-2's tokenizer has no pad token and no chat template. We never need a pad id (padding is marked by
segment id 0 and weight 0 in the batch), and the chat template we train with is stored on the tokenizer
(`tokenizer.chat_template`) so that `apply_chat_template` reproduces the training prompts after export.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast  # AutoTokenizer imports torch: imported where used

EOS = "<|endoftext|>"


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """Load a fast HF tokenizer from a local directory or a hub name (e.g. "gpt2")."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if not tokenizer.is_fast:
        # Batched tokenization and exact byte-level decoding rely on the Rust tokenizer.
        raise ValueError(f"{name_or_path}: a fast (Rust) tokenizer is required, got {type(tokenizer).__name__}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{name_or_path}: tokenizer has no eos_token; SFT needs one to close each response")
    return tokenizer


def train_bytelevel_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE (special token `<|endoftext|>` = eos = bos = unk) on `texts`."""
    bpe = Tokenizer(models.BPE())
    # add_prefix_space=False as in GPT-2: a segment tokenized alone must equal its tokens in context.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        # All 256 byte symbols, so any unicode text is encodable even if absent from `texts`.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS, clean_up_tokenization_spaces=False
    )


def set_chat_template(tokenizer, template: str) -> None:
    """Store the Jinja chat template used in training on the tokenizer (saved by `save_pretrained`)."""
    tokenizer.chat_template = template


def get_chat_template(tokenizer) -> str | None:
    """The tokenizer's chat template, or None when it has none (e.g. stock GPT-2)."""
    return getattr(tokenizer, "chat_template", None)


def read_template(template: str) -> str:
    """A Jinja template given inline or as a path to a file (`.jinja` or any existing file)."""
    if template.endswith((".jinja", ".j2")) or os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            return f.read()
    return template
