"""Tokenize, cache and pack alpaca-sized synthetic examples; print times and peak resident memory.

    python benchmarks/data_throughput.py [--examples 50000] [--max-length 512] [--num-proc 0] [--workdir DIR]
                                         [--phases memory,build,cached] [--epoch]

Writes the examples to DIR/alpaca.jsonl (kept and reused when DIR is given) and trains a byte-level BPE of
8,192 tokens on the first 2,000 rows in-process (no network; the work per token is that of GPT-2's tokenizer).
Each phase runs in a fresh python process, so its peak RSS is its own:

    memory   build_datasets with data.cache=off (everything in memory, as before the cache)
    build    build_datasets with data.cache=rebuild: tokenize in worker processes, write the cache
    cached   build_datasets with the cache present (memory-mapped), then the packing plan and the first batch:
             the data work a second run does before its first train step

"process" is the phase's whole wall time (imports included), CPU its user + system seconds over all its
processes. Peak RSS is `ru_maxrss` of the phase's main process; "workers" is the largest tokenizing worker's (each of
the --num-proc workers peaks at about that). With --epoch a phase also assembles one epoch of batches.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

WORDS = ("the model data train token write explain list give three reasons why summary poem story sea city "
         "health water energy people time year world number system program language answer question").split()


def synthetic_alpaca(n: int, seed: int = 0):
    """Alpaca-like sizes: instruction ~12 words, input empty or ~20 words, output ~60 words (a generator)."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."  # noqa: E731
    for _ in range(n):
        yield {"instruction": words(rng.randint(5, 20)),
               "input": words(rng.randint(5, 40)) if rng.random() < 0.4 else "", "output": words(rng.randint(10, 120))}


def prepare(workdir: str, n: int) -> None:
    """DIR/alpaca.jsonl with n rows and DIR/tokenizer, unless already there for this n."""
    from sft_jax.tokenizer import train_bytelevel_bpe

    stamp = os.path.join(workdir, "examples.txt")
    if os.path.exists(stamp) and open(stamp).read() == str(n):
        return
    with open(os.path.join(workdir, "alpaca.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in synthetic_alpaca(n))
    tokenizer = train_bytelevel_bpe([json.dumps(r) for r in synthetic_alpaca(2000)], vocab_size=8192)
    tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
    with open(stamp, "w") as f:
        f.write(str(n))


def peak_mb(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def phase(args) -> None:
    """One phase in this process; prints one JSON line."""
    from transformers import PreTrainedTokenizerFast

    from sft_jax.data import BatchIterator, DataConfig, build_datasets

    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(args.workdir, "tokenizer"))
    cache = {"memory": "off", "build": "rebuild", "cached": "auto"}[args.phase]
    cfg = DataConfig(train=os.path.join(args.workdir, "alpaca.jsonl"), max_length=args.max_length, eval_fraction=0.0,
                     cache=cache, cache_dir=os.path.join(args.workdir, "cache"), num_proc=args.num_proc)
    start = time.perf_counter()
    train, _, report = build_datasets(cfg, tokenizer, n_positions=1024, vocab_size=len(tokenizer), seed=0,
                                      global_batch_size=32)
    built = time.perf_counter()
    it = BatchIterator(train, global_batch_size=32, seed=0, mode="packing", max_length=args.max_length, prefetch=0)
    it.batch_at(0)
    first = time.perf_counter()
    if args.epoch:
        for step in range(1, it.steps_per_epoch):
            it.batch_at(step)
    done = time.perf_counter()
    print(json.dumps({
        "phase": args.phase, "documents": len(train), "tokens": int(train.offsets[-1]), "rows": it.rows_per_epoch,
        "efficiency": report.train.efficiency, "build_datasets_s": round(built - start, 1),
        "plan_and_first_batch_s": round(first - built, 1), "epoch_s": round(done - first, 1) if args.epoch else None,
        "cpu_s": round(sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
                           for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)), 1),
        "peak_rss_mb": round(peak_mb(resource.RUSAGE_SELF)), "worker_peak_rss_mb": round(peak_mb(resource.RUSAGE_CHILDREN)),
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--num-proc", type=int, default=0, help="tokenizing worker processes (0: one per core)")
    parser.add_argument("--workdir", default=None, help="keep the data, tokenizer and cache here (default: temp)")
    parser.add_argument("--phases", default="memory,build,cached")
    parser.add_argument("--epoch", action="store_true", help="also assemble one epoch of batches")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return phase(args)
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = args.workdir or tmp
        os.makedirs(args.workdir, exist_ok=True)
        prepare(args.workdir, args.examples)
        print(f"examples: {args.examples}, max_length: {args.max_length}, cpus: {os.cpu_count()}, "
              f"load average: {os.getloadavg()[0]:.1f}", flush=True)
        for name in args.phases.split(","):
            cmd = [sys.executable, __file__, "--phase", name, "--examples", str(args.examples), "--workdir",
                   args.workdir, "--max-length", str(args.max_length), "--num-proc", str(args.num_proc)]
            start = time.perf_counter()
            out = subprocess.run(cmd + (["--epoch"] if args.epoch else []), check=True, stdout=subprocess.PIPE,
                                 text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{name:>6}: build_datasets {r['build_datasets_s']:6.1f} s | plan + first batch "
                  f"{r['plan_and_first_batch_s']:5.1f} s | peak RSS {r['peak_rss_mb']:6d} MB (workers "
                  f"{r['worker_peak_rss_mb']} MB) | process {time.perf_counter() - start:5.1f} s, CPU {r['cpu_s']} s | "
                  f"{r['documents']} docs, {r['tokens']} tokens, packing efficiency {r['efficiency']:.1%}"
                  + (f" | one epoch {r['epoch_s']} s" if r["epoch_s"] is not None else ""), flush=True)


if __name__ == "__main__":
    main()
