"""Where examples come from: source specs, readers that know line numbers, and the bad-row policy.

Source syntax (DataConfig.train / DataConfig.eval):
    "demo"                          the built-in demo tasks (sft_jax.demos.tasks)
    "path/to/file.jsonl"            local .jsonl, .json (a JSON array, or JSON lines), .parquet or .csv
    "owner/name[:config[:split]]"   a Hugging Face hub dataset (split defaults to "train")
    "spec@2.5" or {"path": spec, "weight": 2.5}
                                    weight w: per epoch the source contributes floor(w) copies of each
                                    example plus a seeded round(frac(w) * n) subset, so 0.5 halves and 2 doubles
    a list of the above             a mixture

Local .json/.jsonl files are parsed here rather than by `datasets`' JSON loader so an error can name the
1-based line (JSON-lines files are streamed in chunks, never held whole: see _build); .parquet and .csv go
through `datasets.load_dataset` (csv with every column read as a string, empty cells as ""), hub datasets through `datasets.load_dataset(name, config, split=split)`.
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
    for line_no, raw in _json_lines(path):
        where = f"{path} line {line_no}"
        row, error = _parse_line(raw)
        if error is not None:
            bad.bad("malformed_json", f"{where}: {error}")
        rows.append(row)
        locations.append(where)
    if not rows:
        bad.bad("empty_file", f"{path}: empty file, no examples")
    return RawSource(path, rows, locations)


def _json_lines(path: str):
    """(1-based line number, raw bytes) of each non-blank line: blank lines separate nothing, they are not rows."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                yield line_no, raw


def _parse_line(raw: bytes):
    """(row, None) for a JSON line, or (None, what is wrong with it)."""
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg} at column {e.colno})"


def _is_json_lines(name: str) -> bool:
    """A non-empty local file of JSON lines (.jsonl, or a .json file that is not one array): read as a stream."""
    if not (name.endswith((".jsonl", ".json")) and os.path.isfile(name) and os.path.getsize(name) > 0):
        return False
    if name.endswith(".jsonl"):
        return True
    with open(name, encoding="utf-8", errors="replace") as f:
        while block := f.read(1 << 16):
            if block.strip():
                return not block.lstrip().startswith("[")
    return True


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b""))


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
    """Validated examples of one split, held in memory (preference pairs; SFT examples are streamed)."""

    conversations: list  # chat messages (or pairs) per example
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
        from sft_jax.data.cache import SplitWriter

        store = lambda split: SplitWriter(folder, split, len(tokenizer))  # noqa: E731
    train = _Stream(parse_sources(cfg.train), BadRows(cfg.on_bad_example), store("train"))
    eval_spec, carve = cfg.eval, 0.0
    if eval_spec is None and all(s.name == "demo" for s in train.sources):
        eval_spec = "demo"  # the demo has a disjoint held-out split
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

    def add(self, chunk: EncodedChunk, k: int) -> None:
        self.valid += chunk.size
        self.runs.append((k, len(chunk.lengths)))
        self.dropped.update(chunk.dropped)
        self.truncated += chunk.truncated
        self.head += chunk.head[: CHECKED - len(self.head)]
        self.store.add(chunk)


def _read(split: _Stream, cfg, demo_split: str, seed: int, encoder, *, held: _Stream | None = None, carve=0.0):
    """Stream every source of `split` through the encoder; examples held out by `carve` go to `held`."""
    from sft_jax.demos.tasks import make_demo_examples
    from sft_jax.data.formats import detect_format

    for k, source in enumerate(split.sources):
        if _is_json_lines(source.name):
            n_rows, fmt = _scan(source.name, cfg, split.bad, encoder)
            chunks = _line_chunks(source.name, fmt, carve)
        else:
            if source.name == "demo":
                n = cfg.demo_train_examples if demo_split == "train" else cfg.demo_eval_examples
                raw = RawSource("demo", make_demo_examples(n, seed, demo_split), None, fmt="demo")
            else:
                raw = load_source(source.name, split.bad)
            fmt = cfg.format if cfg.format != "auto" else raw.fmt
            if fmt is None:
                keys = {key for row in raw.rows if isinstance(row, dict) for key in row}
                fmt = detect_format(keys, raw.name) if raw.rows else "chat"
            n_rows, chunks = len(raw.rows), _row_chunks(raw, fmt, carve)
        split.read += n_rows
        split.read_by_source[source.name] = split.read_by_source.get(source.name, 0) + n_rows
        for done in encoder.map(chunks, n_rows):
            for reason, message in done.errors:
                split.bad.bad(reason, message)
            split.add(done.train, k)
            if held is not None:
                held.add(done.held, k)
    if held is not None:
        held.read = split.to_eval = held.valid


def _scan(path: str, cfg, bad: BadRows, encoder) -> tuple[int, str]:
    """First pass over a JSON-lines file: (rows, format). Counts its malformed lines (raises at the first one
    in error mode) and collects its columns for the format, as reading it whole did."""
    from sft_jax.data.formats import detect_format

    n_rows, keys = 0, set()
    for done in encoder.map(_line_chunks(path, None, 0.0), _count_lines(path)):
        n_rows += done.rows
        keys |= done.keys
        for reason, message in done.errors:
            bad.bad(reason, message)
    if not n_rows:
        bad.bad("empty_file", f"{path}: empty file, no examples")
    fmt = cfg.format if cfg.format != "auto" else (detect_format(keys, path) if n_rows else "chat")
    return n_rows, fmt


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


def _carve(train: _Split, fraction: float) -> _Split:
    """Move examples whose content hash falls below `fraction` from train into a new eval split."""
    held = [held_out(example, fraction) for example in train.conversations]
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


def held_out(example, fraction: float) -> bool:
    """data.eval_fraction: the example goes to eval when its content hash falls below `fraction`."""
    import zlib

    digest = zlib.crc32(json.dumps(example, sort_keys=True, ensure_ascii=False).encode())
    return digest % 1_000_000 < fraction * 1_000_000


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


# ---------------------------------------------------------------------------------- tokenizing in chunks

CHUNK = 2048  # rows per chunk: bounds the python objects alive at once, in the workers and in transit
PARALLEL_MIN = 32768  # rows in a source below which it is processed in this process (spawning costs more)
CHECKED = 8  # first examples of a split on which check_prompt_tokens verifies the template's tokenization


@dataclasses.dataclass
class RowChunk:
    """CHUNK consecutive rows of one source, as sent to process_chunk."""

    name: str  # the source
    rows: list  # raw JSON lines (bytes) when `line_nos` is set; else parsed rows (None: unparseable, counted)
    fmt: str | None  # the source's format; None: only parse and collect columns (the JSON-lines scan)
    carve: float = 0.0  # data.eval_fraction held out by content hash (0: none)
    line_nos: list | None = None  # 1-based line of each raw row
    locations: list | None = None  # name of each row, when the source has its own (RawSource.locations)
    start: int = 0  # index of rows[0] in the source

    def where(self, i: int) -> str:
        if self.line_nos is not None:
            return f"{self.name} line {self.line_nos[i]}"
        return self.locations[i] if self.locations is not None else f"{self.name} row {self.start + i + 1}"


def _line_chunks(path: str, fmt: str | None, carve: float):
    rows, line_nos = [], []
    for line_no, raw in _json_lines(path):
        rows.append(raw)
        line_nos.append(line_no)
        if len(rows) == CHUNK:
            yield RowChunk(path, rows, fmt, carve, line_nos=line_nos)
            rows, line_nos = [], []
    if rows:
        yield RowChunk(path, rows, fmt, carve, line_nos=line_nos)


def _row_chunks(raw: RawSource, fmt: str, carve: float):
    for lo in range(0, len(raw.rows), CHUNK):
        locations = None if raw.locations is None else raw.locations[lo : lo + CHUNK]
        yield RowChunk(raw.name, raw.rows[lo : lo + CHUNK], fmt, carve, locations=locations, start=lo)


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
    train: EncodedChunk | None = None
    held: EncodedChunk | None = None  # the examples carved for eval


def process_chunk(chunk: RowChunk, cfg, renderer, json_examples: bool = False) -> ChunkResult:
    """Parse (JSON lines), validate, carve and encode one chunk; with chunk.fmt None only parse (the scan).

    A malformed JSON line is reported by the scan only; the second pass skips it."""
    from sft_jax.data.formats import FieldError, to_messages

    out = ChunkResult(len(chunk.rows), set(), [])
    train, held = [], []
    for i, row in enumerate(chunk.rows):
        if chunk.line_nos is not None:
            row, error = _parse_line(row)
            if error is not None:
                if chunk.fmt is None:
                    out.errors.append(("malformed_json", f"{chunk.where(i)}: {error}"))
                continue
        if row is None:
            continue  # unparseable, counted when read
        if chunk.fmt is None:
            if isinstance(row, dict):
                out.keys.update(row)
            continue
        try:
            messages = to_messages(row, chunk.fmt)
        except FieldError as e:
            out.errors.append((e.reason, f"{chunk.where(i)}: {e}"))
            continue
        (held if chunk.carve and held_out(messages, chunk.carve) else train).append(messages)
    if chunk.fmt is not None:
        out.train = encode_chunk(train, cfg, renderer, json_examples)
        out.held = encode_chunk(held, cfg, renderer, json_examples) if chunk.carve else None
    return out


def encode_chunk(conversations: list, cfg, renderer, json_examples: bool = False) -> EncodedChunk:
    """Tokenize `conversations` and apply the length policy (truncation, drops) of `cfg`."""
    import itertools

    import numpy as np

    from sft_jax.data.formats import encode_documents

    docs = encode_documents(
        conversations, renderer, train_on_prompt=cfg.train_on_prompt, last_turn_only=cfg.last_turn_only
    )
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
