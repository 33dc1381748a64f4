"""The tokenized cache: build_datasets' result written once per fingerprint, then memory-mapped by every process.

Layout, under data.cache_dir (default $SFT_JAX_DATA_CACHE or ~/.cache/sft_jax/data):

    <fingerprint>/                one folder per fingerprint, complete or absent
        meta.json                 what the fingerprint covers, sizes, build time
        report.json               the data report (bad-row, drop and truncation counts included)
        train.tokens.npy          uint16 (vocabularies up to 65,536 tokens) or int32 [N_tok]
        train.supervised.npy      bool [N_tok]: the token is a training target
        train.offsets.npy         int64 [N_docs + 1]: document i is tokens[offsets[i]:offsets[i + 1]]
        train.response_tokens.npy int32 [N_docs]
        train.examples.jsonl      chat messages per document, one JSON line each (read on demand)
        train.examples.offsets.npy int64 [N_docs + 1]: byte offsets of those lines
        eval.*                    the same for the eval split, when there is one
    <fingerprint>.lock            flock'ed by the one process that builds

The fingerprint hashes everything the arrays depend on: the data config (sources, weights, format, columns,
template text, length policy, max_length, batching, ...), every local file a source reads (its path, size and
SHA-256: each file a glob matches, each shard of a dataset folder's split, each file of a save_to_disk folder,
as sft_jax.data.rows.locate names them), the tokenizer (its full serialisation and eos), the seed and the
report's batch size. A mismatch means another folder, so a stale cache is never reused (a changed shard
rebuilds; touching nothing, or only a file's time, reuses it); data.cache=rebuild builds anew even on a match.
Hub datasets are fingerprinted by name only (their revision is not known before download): after a hub
dataset changes, use rebuild.

Building: the first process to take the lock builds into <fingerprint>.tmp.<pid>.<random>/ and renames it
into place (atomic on POSIX filesystems), so a killed build leaves only a tmp folder, never a usable half
cache; the next builder removes such leftovers. The build streams: each chunk of tokenized rows is appended
to the files as it comes (SplitWriter), so no process holds the raw rows, the chat messages or the token
arrays of the whole dataset. Other processes (on this host, or on other hosts when the
filesystem supports flock, e.g. NFSv4 or Lustre) block on the lock and then memory-map the finished folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import secrets
import shutil
import sys
import time

import numpy as np

from sft_jax.data.config import DataError
from sft_jax.data.rows import locate, parse_sources
from sft_jax.runtime import faults

VERSION = 2  # bump when the layout or the meaning of the arrays or the report changes
ARRAYS = ("tokens", "supervised", "offsets", "response_tokens")
_NOT_HASHED = ("cache", "cache_dir", "num_proc", "prefetch")  # do not change the arrays


def cache_root(cfg) -> str:
    root = cfg.cache_dir or os.environ.get("SFT_JAX_DATA_CACHE") or os.path.join("~", ".cache", "sft_jax", "data")
    if "://" in root:
        raise DataError(f"data.cache_dir={root!r}: expected a local or shared filesystem path, not a URL")
    return os.path.abspath(os.path.expanduser(root))


def fingerprint(cfg, tokenizer, *, seed: int, global_batch_size) -> tuple[str, dict]:
    """(hex digest, the JSON-able inputs it hashes)."""
    from sft_jax.data.formats import chat_template

    config = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_HASHED}
    config["template"] = None if cfg.template is None else chat_template(cfg)  # the text, not the path
    files = {}
    for spec in (cfg.train, cfg.eval):
        for source in parse_sources(spec) if spec is not None else []:
            for path in locate(source.name).files:
                files[path] = {"bytes": os.path.getsize(path), "sha256": file_digest(path)}
    backend = tokenizer.backend_tokenizer.to_str()
    inputs = {
        "version": VERSION,
        "config": config,
        "files": files,
        "tokenizer": hashlib.sha256(backend.encode()).hexdigest(),
        "eos_token": tokenizer.eos_token,
        "tokenizer_size": len(tokenizer),
        "seed": seed,
        "global_batch_size": global_batch_size,
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=list).encode()).hexdigest()
    return digest[:32], inputs


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cached_datasets(cfg, tokenizer, *, seed: int, global_batch_size, build):
    """build(cfg, tokenizer, seed=..., global_batch_size=..., folder=...)'s (train, eval, report), through the
    cache; `build` writes the split files into `folder` (sources._build)."""
    root = cache_root(cfg)
    digest, inputs = fingerprint(cfg, tokenizer, seed=seed, global_batch_size=global_batch_size)
    final = os.path.join(root, digest)
    if cfg.cache == "auto" and _complete(final):
        return load(final)
    os.makedirs(root, exist_ok=True)
    asked = time.time()
    with open(final + ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process to build the data cache {final}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # Built while we waited (by the process that held the lock): use it, even under `rebuild`.
            if _complete(final) and (cfg.cache == "auto" or os.stat(final).st_mtime >= asked):
                return load(final)
            _build_locked(cfg, tokenizer, root, digest, inputs, seed, global_batch_size, build)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return load(final)


def _build_locked(cfg, tokenizer, root, digest, inputs, seed, global_batch_size, build) -> None:
    final = os.path.join(root, digest)
    for name in os.listdir(root):  # leftovers of killed builds: we hold the lock, so nobody writes them
        if name.startswith(digest + ".tmp."):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    faults.before_cache_build()
    start = time.perf_counter()
    tmp = os.path.join(root, f"{digest}.tmp.{os.getpid()}.{secrets.token_hex(4)}")
    os.makedirs(tmp)
    try:
        # The build writes the arrays into tmp as it goes (SplitWriter) and returns them memory-mapped.
        train, eval_, report = build(cfg, tokenizer, seed=seed, global_batch_size=global_batch_size, folder=tmp)
        faults.after_cache_write()
        sizes = {name: {"documents": len(ds), "tokens": int(ds.offsets[-1])}
                 for name, ds in (("train", train), ("eval", eval_)) if ds is not None}
        from sft_jax.data.report import report_to_json

        with open(os.path.join(tmp, "report.json"), "w", encoding="utf-8") as f:
            f.write(report_to_json(report))
        meta = {"fingerprint": digest, "inputs": inputs, "splits": sizes, "build_seconds": time.perf_counter() - start}
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:  # written last
            json.dump(meta, f, indent=2, default=list)
        if os.path.isdir(final):  # data.cache=rebuild: move the old one aside first
            old = f"{final}.tmp.old.{secrets.token_hex(4)}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"built the data cache {final} ({_size_mb(final):.0f} MB) in {time.perf_counter() - start:.1f} s")


class SplitWriter:
    """A split's documents appended to the cache files as the build produces them (the build's on-disk store;
    sources._InMemory is the in-memory one): only per-document lengths stay in memory until finish()."""

    def __init__(self, folder: str, split: str, vocab_size: int):
        self.folder, self.split, self.vocab_size = folder, split, vocab_size
        token_dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
        self._tokens = _NpyWriter(self._path("tokens"), token_dtype)
        self._supervised = _NpyWriter(self._path("supervised"), np.bool_)
        self._examples = open(self._path("examples.jsonl", ext=""), "wb")
        self._lengths, self._responses, self._example_sizes = [], [], []

    def _path(self, name: str, ext: str = ".npy") -> str:
        return os.path.join(self.folder, f"{self.split}.{name}{ext}")

    def add(self, chunk) -> None:
        """Append an EncodedChunk built with json_examples (its examples are JSON lines)."""
        self.append(chunk.tokens, chunk.supervised, chunk.lengths, chunk.responses, chunk.examples,
                    chunk.example_sizes)

    def append(self, tokens, supervised, lengths, responses, examples: bytes, example_sizes) -> None:
        """Append documents: their flat tokens and loss mask, per-document lengths and response tokens, and
        their JSON lines (joined) with each line's size."""
        self._tokens.write(tokens)
        self._supervised.write(supervised)
        self._examples.write(examples)
        self._lengths.append(lengths)
        self._responses.append(responses)
        self._example_sizes.append(example_sizes)

    def finish(self):
        """Close the files and memory-map them as an SFTDataset."""
        self._tokens.close()
        self._supervised.close()
        self._examples.close()
        for name, sizes in (("offsets", self._lengths), ("examples.offsets", self._example_sizes)):
            offsets = np.zeros(sum(map(len, sizes)) + 1, np.int64)
            np.cumsum(np.concatenate(sizes), out=offsets[1:])
            np.save(self._path(name), offsets)
        np.save(self._path("response_tokens"), np.concatenate(self._responses).astype(np.int32))
        self._lengths, self._responses, self._example_sizes = [], [], []
        return _load_split(self.folder, self.split)

    def select(self, dataset, indices, block: int = 16384):
        """Rewrite the split as the documents at `indices` (source weights repeat some), a block at a time."""
        out = SplitWriter(self.folder, self.split + ".selected", self.vocab_size)
        with open(dataset.examples.path, "rb") as examples:
            for lo in range(0, len(indices), block):
                part = dataset.select(indices[lo : lo + block], examples=False)
                lines = [dataset.examples.raw(i, examples) for i in indices[lo : lo + block].tolist()]
                sizes = np.fromiter(map(len, lines), np.int64, len(lines))
                out.append(part.tokens, part.supervised, part.lengths, part.response_tokens, b"".join(lines), sizes)
        out.finish()
        for name in os.listdir(self.folder):
            if name.startswith(self.split + ".selected."):  # the old maps keep the replaced files' inodes
                os.replace(os.path.join(self.folder, name),
                           os.path.join(self.folder, self.split + name[len(self.split + ".selected") :]))
        return _load_split(self.folder, self.split)

    def discard(self) -> None:
        for f in (self._tokens, self._supervised, self._examples):
            f.close()
        for name in os.listdir(self.folder):
            if name.startswith(self.split + "."):
                os.remove(os.path.join(self.folder, name))


class _NpyWriter:
    """A 1-D .npy file written in pieces: its header, which holds the length, goes last into the space kept for
    it (a 1-D header is 128 bytes for any length, numpy pads it to a multiple of 64)."""

    HEADER = 128

    def __init__(self, path: str, dtype):
        self.dtype, self.n = np.dtype(dtype), 0
        self.f = open(path, "wb")
        self.f.write(b"\0" * self.HEADER)

    def write(self, array) -> None:
        array = np.ascontiguousarray(array, self.dtype)
        self.f.write(array.data)
        self.n += len(array)

    def close(self) -> None:
        if self.f.closed:
            return
        header = io.BytesIO()
        descr = np.lib.format.dtype_to_descr(self.dtype)
        np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": (self.n,)})
        assert len(header.getvalue()) == self.HEADER, header.getvalue()
        self.f.seek(0)
        self.f.write(header.getvalue())
        self.f.close()


def _complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "meta.json"))


def load(folder: str):
    """(train, eval | None, report) of a complete cache folder, arrays memory-mapped read-only."""
    from sft_jax.data.report import DataReport, SplitReport

    with open(os.path.join(folder, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
        splits = json.load(f)["splits"]
    train = _load_split(folder, "train")
    eval_ = _load_split(folder, "eval") if "eval" in splits else None
    split_report = lambda d: None if d is None else SplitReport(**d)  # noqa: E731
    return train, eval_, DataReport(split_report(report["train"]), split_report(report["eval"]))


def _load_split(folder: str, split: str):
    from sft_jax.data.pack import SFTDataset

    arrays = [np.load(os.path.join(folder, f"{split}.{name}.npy"), mmap_mode="r") for name in ARRAYS]
    examples = Examples(os.path.join(folder, f"{split}.examples.jsonl"))
    return SFTDataset(*arrays, examples=examples if len(examples) else None)


class Examples:
    """Read-only list of a split's chat messages, each parsed from its JSON line when asked for."""

    def __init__(self, path: str):
        self.path = path
        self._offsets = np.load(path[: -len(".jsonl")] + ".offsets.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range [0, {len(self)})")
        lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
        with open(self.path, "rb") as f:
            f.seek(lo)
            return json.loads(f.read(hi - lo))

    def raw(self, i: int, f) -> bytes:
        """Example i's JSON line, read from the open file `f`."""
        f.seek(int(self._offsets[i]))
        return f.read(int(self._offsets[i + 1] - self._offsets[i]))

    def __iter__(self):
        with open(self.path, "rb") as f:
            for _ in range(len(self)):
                yield json.loads(f.readline())


def _size_mb(folder: str) -> float:
    return sum(e.stat().st_size for e in os.scandir(folder)) / 1e6


def _log(message: str) -> None:
    print(f"sft_jax: {message}", file=sys.stderr, flush=True)

