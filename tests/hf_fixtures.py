"""Tiny HF GPT-2 models and a tiny byte-level BPE tokenizer, built offline for tests."""

from __future__ import annotations

import numpy as np

EOS = "<|endoftext|>"
EOS_ID = 0  # the tokenizer's first special token; the tiny models use it as bos/eos/pad
TINY = dict(vocab_size=300, n_positions=64, n_layer=2, n_head=4, n_embd=64)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Instruction: add two numbers. Response: the sum is four.",
    "JAX and Flax train GPT-2 models; Hugging Face loads them back.",
    "Hello world! How are you today? I am fine, thank you.",
] * 20


def hf_config(**overrides):
    from transformers import GPT2Config as HFGPT2Config

    fields = dict(TINY, bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    fields.update(overrides)
    return HFGPT2Config(**fields)


def make_hf_model(seed: int = 0, bias_std: float = 0.02, **overrides):
    """A random GPT2LMHeadModel in float32, eval mode. HF inits biases to zero and LayerNorm to
    (1, 0); we randomise them too (``bias_std``) so a swapped bias or scale cannot hide."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(hf_config(**overrides)).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=gen) * bias_std)
            elif ".ln_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def save_hf_model(model, directory, **kwargs):
    model.save_pretrained(str(directory), **kwargs)
    return directory


def byte_bpe(special_tokens, vocab_size: int = 300, texts=TEXTS):
    """A byte-level BPE (GPT-2 style) ``tokenizers.Tokenizer`` trained here on ``texts``, with
    ``special_tokens`` first in its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def train_tokenizer(vocab_size: int = 300):
    """A byte-level BPE (GPT-2 style) wrapped as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tok = byte_bpe([EOS], vocab_size)
    assert tok.token_to_id(EOS) == EOS_ID
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)


def torch_logits(model, tokens, attention_mask=None, position_ids=None) -> np.ndarray:
    import torch

    as_t = lambda a: None if a is None else torch.as_tensor(np.array(a), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=as_t(tokens), attention_mask=as_t(attention_mask), position_ids=as_t(position_ids))
    return out.logits.float().numpy()
