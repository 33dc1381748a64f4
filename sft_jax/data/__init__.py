"""sft_jax data pipeline: sources -> chat messages -> token documents with loss masks -> packed batches.

    train, eval, report = build_datasets(cfg, tokenizer, n_positions=1024, vocab_size=50257, seed=0)
    batches = BatchIterator(train, global_batch_size=32, seed=0, mode=cfg.batching, max_length=cfg.max_length)
    print(report_to_markdown(report))

Modules: config (DataConfig, DataError), rows (source specs, where their rows are, reading them in chunks, bad
rows), sources (build_datasets: streaming, validating, tokenizing), cache (the tokenized cache), formats (formats,
column names, chat template, segment tokenization), preference (pairs), run (the data each training command
builds), pack (documents, packing and bucket plans), iterator (BatchIterator, eval_batches), report. The built-in
demo tasks are a source (``demo``) from sft_jax.demos.tasks.
"""

from sft_jax.data.config import DataConfig, DataError
from sft_jax.data.formats import (BUILTIN_TEMPLATE, chat_template, decode, encode_prompt, messages_of, resolve_template,
                                 turn_end_token_id)
from sft_jax.data.iterator import BatchIterator, eval_batches
from sft_jax.data.pack import SFTDataset
from sft_jax.data.report import DataReport, report_to_dict, report_to_markdown
from sft_jax.data.sources import build_datasets

__all__ = [
    "BUILTIN_TEMPLATE",
    "BatchIterator",
    "DataConfig",
    "DataError",
    "DataReport",
    "SFTDataset",
    "build_datasets",
    "chat_template",
    "resolve_template",
    "turn_end_token_id",
    "decode",
    "encode_prompt",
    "eval_batches",
    "messages_of",
    "report_to_dict",
    "report_to_markdown",
]
