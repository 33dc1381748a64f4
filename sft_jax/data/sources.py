"""Building the datasets: every source streamed in chunks through validation, rendering and tokenization,
the bad-row policy applied in reading order, eval carved off by content hash, source weights applied.

Where the rows come from, and how each row is named in an error, is sft_jax.data.rows; the formats are
sft_jax.data.formats; the tokenized cache the build writes into is sft_jax.data.cache.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections import Counter

from sft_jax.data import cache
from sft_jax.data.config import DataError
from sft_jax.data.rows import DEMO_SOURCES, BadRows, Part, RowChunk, Rows, SourceSpec, locate, open_parts, parse_sources


# ----------------------------------------------------------------------------------- building the datasets


def build_datasets(cfg, tokenizer, *, n_positions: int, vocab_size: int, seed: int, global_batch_size=None):
    """Read, validate, render, tokenize and cut the train and eval data; returns (train, eval | None, report).

    `global_batch_size` only sets the batch size at which bucket padding efficiency is reported (default 8).
    With data.cache on (the default) the result comes from, or is first written to, the tokenized cache
    (sft_jax.data.cache): the same documents, batches and report, held in memory-mapped arrays.
    """
    if cfg.max_length > n_positions:
        raise DataError(f"data.max_length={cfg.max_length} exceeds the model's n_positions={n_positions}")
    if len(tokenizer) > vocab_size:
        raise DataError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
            "token ids would index past the embedding table"
        )
    if cfg.cache != "off":
        return cache.cached_datasets(cfg, tokenizer, seed=seed, global_batch_size=global_batch_size, build=_build)
    return _build(cfg, tokenizer, seed=seed, global_batch_size=global_batch_size)


def _build(cfg, tokenizer, *, seed: int, global_batch_size=None, folder: str | None = None):
    """build_datasets without the cache lookup.

    Sources are streamed in chunks of CHUNK rows to `process_chunk` (in worker processes for large sources),
    which parses, validates, carves, renders, tokenizes and cuts them. The main process counts the bad rows,
    in the order the rows were read, and appends each chunk's documents to its split's store: held in memory,
    or, with `folder`, written to the cache files there as they come (sft_jax.data.cache.SplitWriter), so at
    no time does any process hold every example. Errors come in the same order as reading everything first:
    bad rows of every source (JSON errors of a file before its field errors), then per split the template
    check and the empty-split errors. (One exception: a template that cannot render an example at all now
    fails when that example's chunk is tokenized, before the bad rows of later sources are seen.)
    """
    from sft_jax.data.formats import Renderer, chat_template
    from sft_jax.data.report import DataReport

    renderer = Renderer(tokenizer, None if cfg.template is None else chat_template(cfg))
    if folder is None:
        store = lambda split: _InMemory()  # noqa: E731
    else:
        store = lambda split: cache.SplitWriter(folder, split, len(tokenizer))  # noqa: E731
    train = _Stream(parse_sources(cfg.train), BadRows(cfg.on_bad_example), store("train"))
    eval_spec, carve = cfg.eval, 0.0
    if eval_spec is None and all(s.name in DEMO_SOURCES for s in train.sources):
        eval_spec = "demo"  # the demo has a disjoint held-out split, with the correct answers
    elif eval_spec is None:
        carve = cfg.eval_fraction
    held = _Stream(train.sources, BadRows(cfg.on_bad_example), store("eval")) if carve > 0 else None
    with Encoder(cfg, renderer, cfg.num_proc or os.cpu_count() or 1, json_examples=folder is not None) as encoder:
        _read(train, cfg, "train", seed, encoder, held=held, carve=carve)
        if eval_spec is not None:
            held = _Stream(parse_sources(eval_spec), BadRows(cfg.on_bad_example), store("eval"))
            _read(held, cfg, "heldout", seed, encoder)
    batch_size = global_batch_size or 8
    train_ds, train_report = _finish(train, cfg, renderer, seed, batch_size, weighted=True)
    eval_ds, eval_report = None, None
    if held is not None and (held.valid or eval_spec is not None):
        eval_ds, eval_report = _finish(held, cfg, renderer, seed, batch_size, weighted=False)
    elif held is not None:  # too few examples for the fraction to hold any: no eval
        held.store.discard()
    return train_ds, eval_ds, DataReport(train_report, eval_report)


class _Stream:
    """One split as its chunks come back: counts, the first examples, and the store of its documents."""

    def __init__(self, sources: list, bad: BadRows, store):
        self.sources, self.bad, self.store = sources, bad, store
        self.read, self.read_by_source, self.to_eval = 0, {}, 0
        self.valid = 0  # examples that passed validation, before the length policy
        self.runs: list[tuple[int, int]] = []  # (source index, documents kept) per chunk, in order
        self.dropped, self.truncated = Counter(), 0  # by the length policy
        self.head: list = []  # the first CHECKED examples, to check the template's tokenization on
        self.formats: dict = {}  # source name -> (format read, data.columns applied or None)

    def add(self, chunk: EncodedChunk, k: int) -> None:
        self.valid += chunk.size
        self.runs.append((k, len(chunk.lengths)))
        self.dropped.update(chunk.dropped)
        self.truncated += chunk.truncated
        self.head += chunk.head[: CHECKED - len(self.head)]
        self.store.add(chunk)


def _read(split: _Stream, cfg, demo_split: str, seed: int, encoder, *, held: _Stream | None = None, carve=0.0):
    """Stream every source of `split` through the encoder; examples held out by `carve` go to `held`."""

    for k, source in enumerate(split.sources):
        if source.name in DEMO_SOURCES:
            n = cfg.demo_train_examples if demo_split == "train" else cfg.demo_eval_examples
            parts, fmt = [Rows(source.name, _demo_examples(n, seed, demo_split, source.name == "demo:noisy"))], "demo"
        else:
            parts, fmt = open_parts(locate(source.name), split.bad), None
        columns = source_columns(source, cfg)
        n_rows, fmt = _survey(parts, source, cfg, columns, fmt, split.bad, encoder)
        split.formats[source.name] = (fmt, columns)
        split.read += n_rows
        split.read_by_source[source.name] = split.read_by_source.get(source.name, 0) + n_rows
        chunks = itertools.chain.from_iterable(part.chunks(CHUNK, fmt, carve, columns) for part in parts)
        for done in encoder.map(chunks, n_rows):
            for reason, message in done.errors:
                split.bad.bad(reason, message)
            split.add(done.train, k)
            if held is not None:
                held.add(done.held, k)
    if held is not None:
        held.read = split.to_eval = held.valid
        held.formats = dict(split.formats)


def source_columns(source: SourceSpec, cfg) -> dict | None:
    """The data.columns of a source: its own, else data.columns."""
    return source.columns if source.columns is not None else cfg.columns


def _survey(parts: list[Part], source: SourceSpec, cfg, columns, fmt, bad: BadRows, encoder) -> tuple[int, str]:
    """(rows, format) of a source. JSON-lines files get a first pass that counts their malformed lines (raising
    at the first one in error mode) and collects their columns and first row, as reading them whole did."""
    from sft_jax.data.formats import detect_format

    n_rows, keys, sample = 0, set(), None
    for part in parts:
        if part.json_lines:
            rows = 0
            for done in encoder.map(part.chunks(CHUNK, None, 0.0, None), len(part)):
                rows += done.rows
                keys |= done.keys
                sample = sample if sample is not None else done.sample
                for reason, message in done.errors:
                    bad.bad(reason, message)
        else:
            rows = len(part)
            if rows:
                keys |= part.columns()
                sample = sample if sample is not None else part.sample()
        if not rows:
            bad.bad("empty_file", f"{part.name}: empty file, no examples")
        n_rows += rows
    if cfg.format != "auto":
        return n_rows, cfg.format
    return n_rows, fmt or (detect_format(keys, source.name, sample, columns) if n_rows else "chat")


def _finish(split: _Stream, cfg, renderer, seed: int, batch_size: int, *, weighted: bool):
    """The split's dataset (source weights applied when `weighted`) and its report."""
    import numpy as np

    from sft_jax.data.formats import check_prompt_tokens, encode_documents
    from sft_jax.data.report import split_report

    if not split.valid:
        raise DataError(f"data: no usable examples in {[s.name for s in split.sources]} ({dict(split.bad.dropped)})")
    docs = encode_documents(split.head, renderer, train_on_prompt=cfg.train_on_prompt,
                            last_turn_only=cfg.last_turn_only)
    check_prompt_tokens(split.head, docs, renderer)
    dropped = Counter(split.bad.dropped)
    dropped.update(split.dropped)
    kept = sum(n for _, n in split.runs)
    if not kept:
        raise DataError(f"data: every example was dropped ({dict(dropped)}); raise max_length?")
    dataset = split.store.finish()
    if weighted:
        source_of = np.repeat([k for k, _ in split.runs], [n for _, n in split.runs])
        indices = _weighted_indices(source_of, split.sources, seed)
        if not np.array_equal(indices, np.arange(len(dataset))):  # all weights 1: no copy
            dataset = split.store.select(dataset, indices)
    report = split_report(
        dataset,
        renderer.tokenizer,
        read=split.read,
        read_by_source=split.read_by_source,
        to_eval=split.to_eval,
        dropped=dropped,
        truncated=split.truncated,
        kept=kept,
        errors=split.bad.examples,
        mode=cfg.batching,
        max_length=cfg.max_length,
        buckets=cfg.buckets,
        batch_size=batch_size,
        seed=seed,
        shuffle=cfg.shuffle,
        max_segments=cfg.max_segments_per_row,
        formats=split.formats,
    )
    return dataset, report


class _InMemory:
    """A split's documents held in memory (data.cache=off); SplitWriter in sft_jax.data.cache is the on-disk twin."""

    def __init__(self):
        self.chunks: list[EncodedChunk] = []

    def add(self, chunk: EncodedChunk) -> None:
        self.chunks.append(chunk)

    def finish(self):
        import numpy as np

        from sft_jax.data.pack import SFTDataset

        chunks, self.chunks = self.chunks, []
        lengths = np.concatenate([chunk.lengths for chunk in chunks])
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = {}
        for name in ("tokens", "supervised", "responses"):
            flat[name] = np.concatenate([getattr(chunk, name) for chunk in chunks])
            for chunk in chunks:  # free each chunk's copy now: the flat arrays are the large part of the peak
                setattr(chunk, name, None)
        examples = [messages for chunk in chunks for messages in chunk.examples]
        return SFTDataset(flat["tokens"], flat["supervised"], offsets, flat["responses"], examples)

    def select(self, dataset, indices):
        return dataset.select(indices)

    def discard(self) -> None:
        self.chunks = []


def held_out(example, fraction: float) -> bool:
    """data.eval_fraction: the example goes to eval when its content hash falls below `fraction`."""
    import zlib

    digest = zlib.crc32(json.dumps(example, sort_keys=True, ensure_ascii=False).encode())
    return digest % 1_000_000 < fraction * 1_000_000


# ---------------------------------------------------------------------------------- tokenizing in chunks

CHUNK = 2048  # rows per chunk: bounds the python objects alive at once, in the workers and in transit
PARALLEL_MIN = 32768  # rows in a source below which it is processed in this process (spawning costs more)
CHECKED = 8  # first examples of a split on which check_prompt_tokens verifies the template's tokenization


@dataclasses.dataclass
class EncodedChunk:
    """Examples tokenized and cut by the length policy, as flat arrays, plus what the split's report needs."""

    tokens: object  # int32 [N_tok] of the kept documents, concatenated
    supervised: object  # bool [N_tok]
    lengths: object  # int64 [kept]
    responses: object  # int32 [kept]: response tokens per kept document
    examples: object  # chat messages per kept document: a list, or (json_examples) their JSON lines as bytes
    example_sizes: object  # int64 [kept]: bytes of each JSON line (json_examples), else None
    dropped: Counter
    truncated: int
    size: int  # examples in, kept or not
    head: list  # the first CHECKED examples in


@dataclasses.dataclass
class ChunkResult:
    rows: int  # rows in the chunk
    keys: set  # columns seen (the scan)
    errors: list  # (reason, message) per bad row, in row order
    sample: dict | None = None  # the first row (the scan)
    train: EncodedChunk | None = None
    held: EncodedChunk | None = None  # the examples carved for eval


def process_chunk(chunk: RowChunk, cfg, renderer, json_examples: bool = False) -> ChunkResult:
    """Parse (JSON lines), validate, carve and encode one chunk; with chunk.fmt None only parse (the scan).

    A malformed JSON line is reported by the scan only; the second pass skips it. Rows in prompt_completion
    format separate the prompt from the completion, so only their last assistant turn is a target."""
    from sft_jax.data.formats import FieldError, Names, to_messages

    out = ChunkResult(len(chunk.rows), set(), [])
    names = Names.of(chunk.fmt, chunk.columns) if chunk.fmt is not None else None
    train, held = [], []
    for i, row, error in chunk.parsed():
        if error is not None:
            if chunk.fmt is None:
                out.errors.append(("malformed_json", f"{chunk.where(i)}: {error}"))
            continue
        if chunk.fmt is None:
            if isinstance(row, dict):
                out.keys.update(row)
                out.sample = row if out.sample is None else out.sample
            continue
        try:
            messages = to_messages(row, chunk.fmt, names)
        except FieldError as e:
            out.errors.append((e.reason, f"{chunk.where(i)}: {e}"))
            continue
        (held if chunk.carve and held_out(messages, chunk.carve) else train).append(messages)
    if chunk.fmt is not None:
        last_turn_only = cfg.last_turn_only or chunk.fmt == "prompt_completion"
        out.train = encode_chunk(train, cfg, renderer, json_examples, last_turn_only)
        out.held = encode_chunk(held, cfg, renderer, json_examples, last_turn_only) if chunk.carve else None
    return out


def encode_chunk(conversations: list, cfg, renderer, json_examples: bool = False,
                 last_turn_only: bool = False) -> EncodedChunk:
    """Tokenize `conversations` and apply the length policy (truncation, drops) of `cfg`."""
    import numpy as np

    from sft_jax.data.formats import encode_documents

    docs = encode_documents(conversations, renderer, train_on_prompt=cfg.train_on_prompt, last_turn_only=last_turn_only)
    dropped, truncated = Counter(), 0
    kept, tokens, supervised, responses = [], [], [], []
    for i, (ids, sup, resp, start) in enumerate(
        zip(docs.tokens, docs.supervised, docs.response, docs.last_response_start)
    ):
        cut = len(ids) - cfg.max_length
        if cut > 0:
            if cfg.truncation == "drop":
                dropped["too_long"] += 1
                continue
            if cut >= start:  # at least one prompt token must stay to predict the first response token
                dropped["response_too_long"] += 1
                continue
            ids, sup, resp = ids[cut:], sup[cut:], resp[cut:]
            if resp[0] and docs.response[i][cut - 1]:  # an earlier response lost its start: stop learning it
                sup = list(sup)
                j = 0
                while resp[j]:
                    sup[j] = cfg.train_on_prompt
                    j += 1
            truncated += 1
        kept.append(i)
        tokens.append(ids)
        supervised.append(sup)
        responses.append(sum(resp))
    lengths = np.fromiter((len(t) for t in tokens), np.int64, len(tokens))
    total = int(lengths.sum())
    flat = lambda lists, dtype: np.fromiter(itertools.chain.from_iterable(lists), dtype, total)  # noqa: E731
    examples, sizes = [conversations[i] for i in kept], None
    if json_examples:  # one JSON line per document, as the cache stores them
        lines = [json.dumps(messages, ensure_ascii=False).encode() + b"\n" for messages in examples]
        examples, sizes = b"".join(lines), np.fromiter(map(len, lines), np.int64, len(lines))
    return EncodedChunk(
        flat(tokens, np.int32),
        flat(supervised, np.bool_),
        lengths,
        np.asarray(responses, np.int32),
        examples,
        sizes,
        dropped,
        truncated,
        len(conversations),
        conversations[:CHECKED],
    )


class Encoder:
    """process_chunk over a source's chunks, in `num_proc` worker processes when the source is large.

    Workers are spawned (not forked: the caller may hold jax's threads) at the first large source and reused
    for the rest of the build. Chunks are read lazily as workers take them (the pool's task thread pulls
    the generator and blocks on the pipe), and results come back in order, so the output does not depend on
    num_proc and only the chunks in flight are held.
    """

    def __init__(self, cfg, renderer, num_proc: int, json_examples: bool = False):
        self.cfg, self.renderer, self.num_proc, self.json_examples = cfg, renderer, num_proc, json_examples
        self._pool = None

    def map(self, chunks, rows: int):
        """ChunkResults of `chunks` (an iterable of RowChunk over `rows` rows), in order."""
        if self._pool is None and (self.num_proc <= 1 or rows < PARALLEL_MIN):
            return (process_chunk(chunk, self.cfg, self.renderer, self.json_examples) for chunk in chunks)
        if self._pool is None:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            initargs = (self.cfg, self.renderer, self.json_examples)
            self._pool = ctx.Pool(self.num_proc, initializer=_init_worker, initargs=initargs)
        return self._pool.imap(_process_in_worker, chunks)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None and self._pool is not None:
            self._pool.terminate()
        self.close()


_WORKER: dict = {}


def _init_worker(cfg, renderer, json_examples) -> None:
    _WORKER.update(cfg=cfg, renderer=renderer, json_examples=json_examples)


def _process_in_worker(chunk: RowChunk) -> ChunkResult:
    return process_chunk(chunk, _WORKER["cfg"], _WORKER["renderer"], _WORKER["json_examples"])


def _weighted_indices(source_of, sources: list[SourceSpec], seed: int):
    """Document indices for one epoch: floor(w) copies of each, plus a seeded frac(w) share of the source."""
    import numpy as np

    source_of = np.asarray(source_of)
    out = []
    for k, source in enumerate(sources):
        docs = np.flatnonzero(source_of == k)
        whole, frac = divmod(source.weight, 1.0)
        out += [docs] * int(whole)
        n_extra = round(frac * len(docs))
        if n_extra:
            rng = np.random.default_rng([seed, 17, k])
            out.append(np.sort(rng.choice(docs, size=n_extra, replace=False)))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


DEMO_EXAMPLES = "sft_jax.demos.tasks:make_demo_examples"  # the "demo" source, named as ppo.reward_fn names a reward


def _demo_examples(n: int, seed: int, split: str, noisy: bool) -> list[dict]:
    """The built-in demo tasks (``noisy``: demo:noisy's). Named, not imported, so the data path does not
    depend on the demos."""
    import importlib

    module, _, name = DEMO_EXAMPLES.partition(":")
    return getattr(importlib.import_module(module), name)(n, seed, split, noisy=noisy)

