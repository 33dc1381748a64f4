"""Where examples come from: source specs, readers that know line numbers, and the bad-row policy.

Source syntax (DataConfig.train / DataConfig.eval):
    "demo"                          the built-in demo tasks (sft_jax.data.demo)
    "path/to/file.jsonl"            local .jsonl, .json (a JSON array, or JSON lines), .parquet or .csv
    "owner/name[:config[:split]]"   a Hugging Face hub dataset (split defaults to "train")
    "spec@2.5" or {"path": spec, "weight": 2.5}
                                    weight w: per epoch the source contributes floor(w) copies of each
                                    example plus a seeded round(frac(w) * n) subset, so 0.5 halves and 2 doubles
    a list of the above             a mixture

Local .json/.jsonl files are parsed here rather than by `datasets`' JSON loader so an error can name the
1-based line; .parquet and .csv go through `datasets.load_dataset` (csv with every column read as a string,
empty cells as ""), hub datasets through `datasets.load_dataset(name, config, split=split)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter

from sft_jax.data.config import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    name: str
    weight: float = 1.0


def parse_sources(spec) -> list[SourceSpec]:
    """Parse DataConfig.train/eval into a list of weighted sources."""
    entries = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not entries:
        raise DataError("data: empty source list")
    out = []
    for entry in entries:
        if isinstance(entry, dict):
            unknown = set(entry) - {"path", "weight"}
            if "path" not in entry or unknown:
                raise DataError(f"data source {entry!r}: expected keys 'path' and optional 'weight'")
            name, weight = entry["path"], entry.get("weight", 1.0)
        elif isinstance(entry, str):
            name, weight = entry, 1.0
            head, sep, tail = entry.rpartition("@")
            if sep and _is_number(tail):
                name, weight = head, float(tail)
        else:
            raise DataError(f"data source {entry!r}: expected a string or a {{path, weight}} mapping")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
            raise DataError(f"data source {name!r}: weight must be a positive number, got {weight!r}")
        out.append(SourceSpec(str(name), float(weight)))
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class BadRows:
    """The on_bad_example policy: raise one DataError, or count the row under its reason and go on."""

    def __init__(self, mode: str):
        self.mode = mode
        self.dropped: Counter = Counter()  # reason -> rows dropped
        self.examples: list[str] = []  # first few messages, shown in the report

    def bad(self, reason: str, message: str) -> None:
        if self.mode == "error":
            raise DataError(message)
        self.dropped[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(message)


@dataclasses.dataclass
class RawSource:
    """Rows of one source as python dicts, plus how to name row i in an error message."""

    name: str
    rows: list  # dicts, or None for a row that failed to parse (already counted by BadRows)
    locations: list[str] | None  # per row, e.g. "train.jsonl line 7"; None -> "{name} row {i + 1}"
    fmt: str | None = None  # set by the demo source; others are detected or configured

    def where(self, i: int) -> str:
        return self.locations[i] if self.locations is not None else f"{self.name} row {i + 1}"


def load_source(name: str, bad: BadRows) -> RawSource:
    """Read a local file or hub dataset (not "demo") into python rows."""
    if name.endswith(LOCAL_SUFFIXES):
        if not os.path.isfile(name):
            raise DataError(f"{name}: no such file")
        if os.path.getsize(name) == 0:
            bad.bad("empty_file", f"{name}: empty file, no examples")
            return RawSource(name, [], [])
        if name.endswith(".jsonl"):
            return _read_json_lines(name, bad)
        if name.endswith(".json"):
            return _read_json(name, bad)
        return _read_tabular(name, bad)
    if os.path.exists(name):
        raise DataError(f"{name}: unsupported file type; expected one of {LOCAL_SUFFIXES}")
    return _read_hub(name)


def _read_json_lines(path: str, bad: BadRows) -> RawSource:
    rows, locations = [], []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines separate nothing; they are not examples
            where = f"{path} line {line_no}"
            rows.append(None)
            locations.append(where)
            try:
                rows[-1] = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad.bad("malformed_json", f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})")
            except json.JSONDecodeError as e:
                bad.bad("malformed_json", f"{where}: malformed JSON ({e.msg} at column {e.colno})")
    if not rows:
        bad.bad("empty_file", f"{path}: empty file, no examples")
    return RawSource(path, rows, locations)


def _read_json(path: str, bad: BadRows) -> RawSource:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.lstrip().startswith("["):
        return _read_json_lines(path, bad)  # `datasets` also accepts JSON lines in a .json file
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        # One array: a syntax error makes the whole file unreadable, so it is an error even in skip mode.
        raise DataError(f"{path} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
    if not rows:
        bad.bad("empty_file", f"{path}: empty file, no examples")
    return RawSource(path, rows, [f"{path} item {i + 1}" for i in range(len(rows))])


def _read_tabular(path: str, bad: BadRows) -> RawSource:
    import datasets

    if path.endswith(".csv"):
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        # Strings everywhere: pandas would otherwise turn an answer like "42" into an int.
        features = datasets.Features({column: datasets.Value("string") for column in header})
        ds = datasets.load_dataset("csv", data_files=path, split="train", features=features, keep_default_na=False)
    else:
        ds = datasets.load_dataset("parquet", data_files=path, split="train")
    rows = ds.to_list()
    if not rows:
        bad.bad("empty_file", f"{path}: empty file, no examples")
    return RawSource(path, rows, None)


def _read_hub(name: str) -> RawSource:
    import datasets

    repo, config, split = (name.split(":") + [None, None])[:3]
    ds = datasets.load_dataset(repo, config or None, split=split or "train")
    return RawSource(name, ds.to_list(), None)


# ----------------------------------------------------------------------------------- building the datasets


@dataclasses.dataclass
class _Split:
    """Validated examples of one split, before tokenization."""

    conversations: list  # chat messages per example
    source_of: list  # index into the split's sources, per example
    sources: list  # SourceSpec per source
    read: int  # rows read from the sources (for train: before the eval carve)
    bad: BadRows
    read_by_source: dict = dataclasses.field(default_factory=dict)  # source name -> rows read
    to_eval: int = 0  # examples carved from this split into eval (data.eval_fraction)


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
        from sft_jax.data.cache import cached_datasets

        return cached_datasets(cfg, tokenizer, seed=seed, global_batch_size=global_batch_size, build=_build)
    return _build(cfg, tokenizer, seed=seed, global_batch_size=global_batch_size)


def _build(cfg, tokenizer, *, seed: int, global_batch_size=None):
    """build_datasets without the cache: read, tokenize (in worker processes for large splits) and cut."""
    import os

    from sft_jax.data.formats import Renderer, chat_template
    from sft_jax.data.report import DataReport

    renderer = Renderer(tokenizer, None if cfg.template is None else chat_template(cfg))
    train = _read_split(cfg, cfg.train, "train", seed)
    if cfg.eval is not None:
        eval_split = _read_split(cfg, cfg.eval, "heldout", seed)
    elif all(s.name == "demo" for s in train.sources):
        eval_split = _read_split(cfg, "demo", "heldout", seed)  # the demo has a disjoint held-out split
    elif cfg.eval_fraction > 0:
        eval_split = _carve(train, cfg.eval_fraction)
        if not eval_split.conversations:  # too few examples for the fraction to hold any: no eval
            eval_split = None
    else:
        eval_split = None
    batch_size = global_batch_size or 8
    num_proc = cfg.num_proc or os.cpu_count() or 1
    if len(train.conversations) < PARALLEL_MIN:  # spawning workers costs more than it saves
        num_proc = 1
    with Encoder(cfg, renderer, num_proc) as encoder:
        train_ds, train_report = _encode_split(train, cfg, renderer, seed, batch_size, weighted=True, encoder=encoder)
        eval_ds, eval_report = (None, None)
        if eval_split is not None:
            eval_ds, eval_report = _encode_split(
                eval_split, cfg, renderer, seed, batch_size, weighted=False, encoder=encoder
            )
    return train_ds, eval_ds, DataReport(train_report, eval_report)


def _read_split(cfg, spec, demo_split: str, seed: int) -> _Split:
    from sft_jax.data.demo import make_demo_examples
    from sft_jax.data.formats import detect_format, to_messages

    bad = BadRows(cfg.on_bad_example)
    split = _Split([], [], parse_sources(spec), 0, bad)
    for k, source in enumerate(split.sources):
        if source.name == "demo":
            n = cfg.demo_train_examples if demo_split == "train" else cfg.demo_eval_examples
            raw = RawSource("demo", make_demo_examples(n, seed, demo_split), None, fmt="demo")
        else:
            raw = load_source(source.name, bad)
        fmt = cfg.format if cfg.format != "auto" else raw.fmt
        if fmt is None:
            keys = {key for row in raw.rows if isinstance(row, dict) for key in row}
            fmt = detect_format(keys, raw.name) if raw.rows else "chat"
        add_rows(split, raw, k, lambda row: to_messages(row, fmt))
    return split


def add_rows(split: _Split, raw: RawSource, k: int, convert) -> None:
    """Validate the rows of source k with `convert` (row -> example, raising FieldError) into `split`; a bad
    row goes to the split's BadRows, named by its file and line."""
    from sft_jax.data.formats import FieldError

    split.read += len(raw.rows)
    name = split.sources[k].name
    split.read_by_source[name] = split.read_by_source.get(name, 0) + len(raw.rows)
    for i, row in enumerate(raw.rows):
        if row is None:
            continue  # unparseable line, already counted
        raw.rows[i] = None  # release each raw row once converted: halves the peak for large files
        try:
            example = convert(row)
        except FieldError as e:
            split.bad.bad(e.reason, f"{raw.where(i)}: {e}")
            continue
        split.conversations.append(example)
        split.source_of.append(k)


def _carve(train: _Split, fraction: float) -> _Split:
    """Move examples whose content hash falls below `fraction` from train into a new eval split."""
    import zlib

    held = [
        zlib.crc32(json.dumps(m, sort_keys=True, ensure_ascii=False).encode()) % 1_000_000 < fraction * 1_000_000
        for m in train.conversations
    ]
    eval_split = _Split([], [], train.sources, 0, BadRows(train.bad.mode))
    keep_c, keep_s = [], []
    for messages, source, is_held in zip(train.conversations, train.source_of, held):
        if is_held:
            eval_split.conversations.append(messages)
            eval_split.source_of.append(source)
        else:
            keep_c.append(messages)
            keep_s.append(source)
    train.conversations, train.source_of = keep_c, keep_s
    eval_split.read = train.to_eval = sum(held)  # train.read stays what was read from the sources
    return eval_split


def _encode_split(split: _Split, cfg, renderer, seed: int, batch_size: int, *, weighted: bool, encoder=None):
    import numpy as np

    from sft_jax.data.pack import SFTDataset
    from sft_jax.data.report import split_report

    if not split.conversations:
        raise DataError(f"data: no usable examples in {[s.name for s in split.sources]} ({dict(split.bad.dropped)})")
    chunks = (encoder or Encoder(cfg, renderer, num_proc=1)).encode(split.conversations)
    dropped, truncated = Counter(split.bad.dropped), 0
    for chunk in chunks:
        dropped.update(chunk.dropped)
        truncated += chunk.truncated
    kept = np.concatenate([chunk.kept + lo for chunk, lo in zip(chunks, range(0, len(split.conversations), CHUNK))])
    if not len(kept):
        raise DataError(f"data: every example was dropped ({dict(dropped)}); raise max_length?")
    lengths = np.concatenate([chunk.lengths for chunk in chunks])
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = {}
    for name in ("tokens", "supervised", "responses"):
        flat[name] = np.concatenate([getattr(chunk, name) for chunk in chunks])
        for chunk in chunks:  # free each chunk's copy now: the flat arrays are the large part of the peak
            setattr(chunk, name, None)
    dataset = SFTDataset(
        flat["tokens"], flat["supervised"], offsets, flat["responses"], [split.conversations[i] for i in kept.tolist()]
    )
    del flat
    if weighted:
        indices = _weighted_indices([split.source_of[i] for i in kept.tolist()], split.sources, seed)
        if not np.array_equal(indices, np.arange(len(dataset))):  # all weights 1: no copy
            dataset = dataset.select(indices)
    report = split_report(
        dataset,
        renderer.tokenizer,
        read=split.read,
        read_by_source=split.read_by_source,
        to_eval=split.to_eval,
        dropped=dropped,
        truncated=truncated,
        kept=len(kept),
        errors=split.bad.examples,
        mode=cfg.batching,
        max_length=cfg.max_length,
        buckets=cfg.buckets,
        batch_size=batch_size,
        seed=seed,
        shuffle=cfg.shuffle,
        max_segments=cfg.max_segments_per_row,
    )
    return dataset, report


# ---------------------------------------------------------------------------------- tokenizing in chunks

CHUNK = 2048  # conversations per tokenization chunk: bounds the python lists alive at once
PARALLEL_MIN = 32768  # train conversations below which tokenizing stays in this process


@dataclasses.dataclass
class EncodedChunk:
    """One chunk of conversations tokenized and cut by the length policy, as flat arrays."""

    tokens: object  # int32 [N_tok] of the kept documents, concatenated
    supervised: object  # bool [N_tok]
    lengths: object  # int64 [kept]
    responses: object  # int32 [kept]: response tokens per kept document
    kept: object  # int64 [kept]: index of each kept document within the chunk
    dropped: Counter
    truncated: int


def encode_chunk(conversations: list, cfg, renderer, check: bool = False) -> EncodedChunk:
    """Tokenize `conversations` and apply the length policy (truncation, drops) of `cfg`."""
    import itertools

    import numpy as np

    from sft_jax.data.formats import check_prompt_tokens, encode_documents

    docs = encode_documents(
        conversations, renderer, train_on_prompt=cfg.train_on_prompt, last_turn_only=cfg.last_turn_only
    )
    if check:
        check_prompt_tokens(conversations, docs, renderer)
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
    return EncodedChunk(
        flat(tokens, np.int32),
        flat(supervised, np.bool_),
        lengths,
        np.asarray(responses, np.int32),
        np.asarray(kept, np.int64),
        dropped,
        truncated,
    )


class Encoder:
    """encode_chunk over chunks of CHUNK conversations, in `num_proc` worker processes when that helps.

    Workers are spawned (not forked: the caller may hold jax's threads) once per Encoder and reused for the
    train and eval splits. Results come back in order, so the output does not depend on num_proc.
    """

    def __init__(self, cfg, renderer, num_proc: int):
        self.cfg, self.renderer, self.num_proc = cfg, renderer, num_proc
        self._pool = None

    def encode(self, conversations: list) -> list[EncodedChunk]:
        chunks = [conversations[lo : lo + CHUNK] for lo in range(0, len(conversations), CHUNK)]
        first = encode_chunk(chunks[0], self.cfg, self.renderer, check=True)
        if len(chunks) == 1 or self.num_proc <= 1:
            return [first] + [encode_chunk(c, self.cfg, self.renderer) for c in chunks[1:]]
        if self._pool is None:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.num_proc, initializer=_init_worker, initargs=(self.cfg, self.renderer))
        return [first] + list(self._pool.imap(_encode_in_worker, chunks[1:]))

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


def _init_worker(cfg, renderer) -> None:
    _WORKER.update(cfg=cfg, renderer=renderer)


def _encode_in_worker(conversations: list) -> EncodedChunk:
    return encode_chunk(conversations, _WORKER["cfg"], _WORKER["renderer"])


def _weighted_indices(source_of: list[int], sources: list[SourceSpec], seed: int):
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
