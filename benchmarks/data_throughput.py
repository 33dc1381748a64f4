"""Tokenize, cache and pack alpaca-sized synthetic examples; print times and peak resident memory.

    python benchmarks/data_throughput.py [--examples 50000] [--max-length 512] [--num-proc 0] [--workdir DIR]
                                         [--phases memory,build,cached] [--epoch] [--source jsonl|arrow]

Writes the examples to DIR/alpaca.jsonl (kept and reused when DIR is given) and trains a byte-level BPE of
8,192 tokens on the first 2,000 rows in-process (no network; the work per token is that of GPT-2's tokenizer).
With --source arrow the phases read the same rows from DIR/alpaca_arrow, a folder written by `datasets`'
save_to_disk (generated once per size, a batch at a time), instead of the JSON-lines file.
Each phase runs in a fresh python process, so its peak RSS is its own:

    memory   build_datasets with data.cache=off (everything in memory, as before the cache)
    build    build_datasets with data.cache=rebuild: tokenize in worker processes, write the cache
    cached   build_datasets with the cache present (memory-mapped), then the packing plan and the first batch:
             the data work a second run does before its first train step
    floor    only what no build can skip: JSON-parse every line and BPE-tokenize its three texts (no
             template, validation, length policy or writing), the fast tokenizer's batched call in
             chunks of 2,048 rows using every core: a lower bound on any build's time on this machine

"process" is the phase's whole wall time (imports included), CPU its user + system seconds over all its
processes. Memory: "main" is the phase process's peak RSS (`ru_maxrss`); "workers" the largest peak (VmHWM) of its
child processes (the tokenizing workers and multiprocessing's resource tracker); "all" the largest sum of the RSS of the main process and all its workers at one moment, sampled
every 50 ms from /proc (the figure to hold against a memory budget; "main + workers" adds their separate peaks, an
upper bound). A spawned worker's own `ru_maxrss` is not used: Linux carries the parent's RSS at fork into the
child's `ru_maxrss` across exec, so it reports the parent's size, not the worker's. With --epoch a phase also
assembles one epoch of batches.
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
import threading
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


def prepare(workdir: str, n: int, source: str = "jsonl") -> None:
    """DIR/alpaca.jsonl with n rows and DIR/tokenizer (and for --source arrow DIR/alpaca_arrow), unless already
    there for this n."""
    from sft_jax.models.tokenizer import train_bytelevel_bpe

    stamp = os.path.join(workdir, "examples.txt")
    if not (os.path.exists(stamp) and open(stamp).read() == str(n)):
        with open(os.path.join(workdir, "alpaca.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in synthetic_alpaca(n))
        tokenizer = train_bytelevel_bpe([json.dumps(r) for r in synthetic_alpaca(2000)], vocab_size=8192)
        tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
        with open(stamp, "w") as f:
            f.write(str(n))
    arrow_stamp = os.path.join(workdir, "arrow_examples.txt")
    if source == "arrow" and not (os.path.exists(arrow_stamp) and open(arrow_stamp).read() == str(n)):
        import shutil

        import datasets

        # from_generator writes Arrow a batch at a time into its own cache folder; save_to_disk then writes the
        # folder users have (data-0000N-of-0000M.arrow shards, state.json, dataset_info.json)
        staging = os.path.join(workdir, "arrow_staging")
        dataset = datasets.Dataset.from_generator(synthetic_alpaca, gen_kwargs={"n": n}, cache_dir=staging)
        shutil.rmtree(os.path.join(workdir, "alpaca_arrow"), ignore_errors=True)
        dataset.save_to_disk(os.path.join(workdir, "alpaca_arrow"))
        del dataset
        shutil.rmtree(staging)
        with open(arrow_stamp, "w") as f:
            f.write(str(n))


def source_path(args) -> str:
    return os.path.join(args.workdir, "alpaca.jsonl" if args.source == "jsonl" else "alpaca_arrow")


def peak_mb(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


class TreeMemory:
    """Samples the RSS of this process and its descendants from /proc until stopped (Linux)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.all_mb, self.worker_peak_mb = interval, 0.0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            total = 0.0
            for pid in self._tree(me):
                fields = self._status(pid)
                total += fields.get("VmRSS", 0.0)
                if pid != me and "VmHWM" in fields:
                    self.worker_peak_mb[pid] = max(self.worker_peak_mb.get(pid, 0.0), fields["VmHWM"])
            self.all_mb = max(self.all_mb, total)
            self._stop.wait(self.interval)

    @staticmethod
    def _status(pid: int) -> dict:
        try:
            with open(f"/proc/{pid}/status") as f:
                return {k: int(v.split()[0]) / 1024 for k, _, v in (line.partition(":") for line in f)
                        if k in ("VmRSS", "VmHWM")}
        except OSError:  # exited between listing and reading
            return {}

    @classmethod
    def _tree(cls, pid: int) -> list[int]:
        out = [pid]
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    for child in f.read().split():
                        out += cls._tree(int(child))
        except OSError:
            pass
        return out


def floor(args) -> dict:
    """The floor phase (see the module doc): parse + tokenize only."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from transformers import PreTrainedTokenizerFast

    backend = PreTrainedTokenizerFast.from_pretrained(os.path.join(args.workdir, "tokenizer")).backend_tokenizer
    start, texts, tokens, rows = time.perf_counter(), [], 0, 0
    with open(os.path.join(args.workdir, "alpaca.jsonl"), "rb") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["instruction"], row["input"], row["output"]]
            rows += 1
            if rows % 2048 == 0:
                tokens += sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))
                texts = []
    tokens += sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))
    return {"phase": "floor", "documents": rows, "tokens": tokens, "build_datasets_s": round(time.perf_counter() - start, 1),
            "plan_and_first_batch_s": 0.0, "epoch_s": None, "efficiency": float("nan")}


def phase(args) -> None:
    """One phase in this process; prints one JSON line."""
    memory = TreeMemory()
    if args.phase == "floor":
        result = floor(args)
        memory.stop()
        print(json.dumps({**result, **usage(memory)}), flush=True)
        return
    from transformers import PreTrainedTokenizerFast

    from sft_jax.data import BatchIterator, DataConfig, build_datasets

    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(args.workdir, "tokenizer"))
    cache = {"memory": "off", "build": "rebuild", "cached": "auto"}[args.phase]
    cfg = DataConfig(train=source_path(args), max_length=args.max_length, eval_fraction=0.0,
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
    memory.stop()
    print(json.dumps({
        "phase": args.phase, "documents": len(train), "tokens": int(train.offsets[-1]), "rows": it.rows_per_epoch,
        "efficiency": report.train.efficiency, "build_datasets_s": round(built - start, 1),
        "plan_and_first_batch_s": round(first - built, 1), "epoch_s": round(done - first, 1) if args.epoch else None,
        **usage(memory),
    }), flush=True)


def usage(memory: TreeMemory) -> dict:
    """CPU seconds and peak memory of this phase process and its children."""
    return {
        "cpu_s": round(sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
                           for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)), 1),
        "peak_rss_mb": round(peak_mb(resource.RUSAGE_SELF)),
        "worker_peak_rss_mb": round(max(memory.worker_peak_mb.values(), default=0)),
        "workers": len(memory.worker_peak_mb), "all_peak_rss_mb": round(memory.all_mb),
        "sum_of_peaks_mb": round(peak_mb(resource.RUSAGE_SELF) + sum(memory.worker_peak_mb.values())),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--num-proc", type=int, default=0, help="tokenizing worker processes (0: one per core)")
    parser.add_argument("--workdir", default=None, help="keep the data, tokenizer and cache here (default: temp)")
    parser.add_argument("--phases", default="memory,build,cached")
    parser.add_argument("--epoch", action="store_true", help="also assemble one epoch of batches")
    parser.add_argument("--source", default="jsonl", choices=("jsonl", "arrow"),
                        help="read the examples from the JSON-lines file or from a save_to_disk folder of them")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "prepare":
        return prepare(args.workdir, args.examples, args.source)
    if args.phase:
        return phase(args)
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = args.workdir or tmp
        os.makedirs(args.workdir, exist_ok=True)
        # In a child process: generating the Arrow folder grows a process to hundreds of MB, and a phase process
        # forked from a parent that large inherits its size in ru_maxrss (see the module doc).
        subprocess.run([sys.executable, __file__, "--phase", "prepare", "--examples", str(args.examples), "--workdir",
                        args.workdir, "--source", args.source], check=True)
        print(f"examples: {args.examples} from {source_path(args)}, max_length: {args.max_length}, cpus: {os.cpu_count()}, "
              f"load average: {os.getloadavg()[0]:.1f}", flush=True)
        for name in args.phases.split(","):
            cmd = [sys.executable, __file__, "--phase", name, "--examples", str(args.examples), "--workdir",
                   args.workdir, "--max-length", str(args.max_length), "--num-proc", str(args.num_proc),
                   "--source", args.source]
            start = time.perf_counter()
            out = subprocess.run(cmd + (["--epoch"] if args.epoch else []), check=True, stdout=subprocess.PIPE,
                                 text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{name:>6}: build_datasets {r['build_datasets_s']:6.1f} s | plan + first batch "
                  f"{r['plan_and_first_batch_s']:5.1f} s | peak RSS: all {r['all_peak_rss_mb']:5d} MB, main "
                  f"{r['peak_rss_mb']:5d} MB, {r['workers']} child processes {r['worker_peak_rss_mb']} MB each at most (main + "
                  f"workers {r['sum_of_peaks_mb']} MB) | process {time.perf_counter() - start:5.1f} s, CPU {r['cpu_s']} s | "
                  f"{r['documents']} docs, {r['tokens']} tokens, packing efficiency "
                  + (f"{r['efficiency']:.1%}" if r["efficiency"] == r["efficiency"] else "-")
                  + (f" | one epoch {r['epoch_s']} s" if r["epoch_s"] is not None else ""), flush=True)


if __name__ == "__main__":
    main()
