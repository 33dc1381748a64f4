"""Tokenize and pack 50,000 alpaca-sized synthetic examples with the GPT-2-style pipeline; print the time.

    python benchmarks/data_throughput.py [--examples 50000] [--max-length 512]

Uses a byte-level BPE trained in-process (vocab 8192), so it needs no network; the work per token is that of
GPT-2's tokenizer. Timed: jsonl parse + validation + rendering + batched tokenization + length policy (in
build_datasets) and the packing plan plus one epoch of batch assembly (BatchIterator).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

from sft_jax.data import BatchIterator, DataConfig, build_datasets
from sft_jax.tokenizer import train_bytelevel_bpe

WORDS = ("the model data train token write explain list give three reasons why summary poem story sea city "
         "health water energy people time year world number system program language answer question").split()


def synthetic_alpaca(n: int, seed: int = 0) -> list[dict]:
    """Alpaca-like sizes: instruction ~12 words, input empty or ~20 words, output ~60 words."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."  # noqa: E731
    return [
        {"instruction": words(rng.randint(5, 20)), "input": words(rng.randint(5, 40)) if rng.random() < 0.4 else "",
         "output": words(rng.randint(10, 120))}
        for _ in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    rows = synthetic_alpaca(args.examples)
    tokenizer = train_bytelevel_bpe([json.dumps(r) for r in rows[:2000]], vocab_size=8192)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "alpaca.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        cfg = DataConfig(train=path, max_length=args.max_length, eval_fraction=0.0)
        start = time.perf_counter()
        train, _, report = build_datasets(cfg, tokenizer, n_positions=1024, vocab_size=len(tokenizer), seed=0)
        built = time.perf_counter()
        it = BatchIterator(train, global_batch_size=32, seed=0, mode="packing", max_length=args.max_length, prefetch=0)
        for step in range(it.steps_per_epoch):
            it.batch_at(step)
        done = time.perf_counter()
    tokens = int(train.lengths.sum())
    print(f"examples: {args.examples}, documents: {len(train)}, tokens: {tokens}, rows: {it.rows_per_epoch}, "
          f"packing efficiency: {report.train.efficiency:.1%}")
    print(f"tokenize+validate: {built - start:.1f} s, pack+assemble one epoch: {done - built:.1f} s, "
          f"total: {done - start:.1f} s ({tokens / (done - start):,.0f} tokens/s)")


if __name__ == "__main__":
    main()
