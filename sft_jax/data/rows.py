"""Where a source's rows are, and reading them in chunks that know how to name each row in an error.

Source syntax (DataConfig.train / DataConfig.eval):
    "demo"                          the built-in demo tasks (sft_jax.demos.tasks)
    "demo:noisy"                    the same prompts, with the RL demo's flawed training answers (see there)
    "path/to/file.jsonl"            a local .jsonl, .json (a JSON array, or JSON lines), .parquet or .csv file
    "shards/*.parquet"              a glob of such files: one source, its files read in sorted order
    "dir", "dir:split"              a folder written by `datasets`' save_to_disk: a Dataset, or a DatasetDict and
                                    one of its splits (default "train"); read memory-mapped by load_from_disk
    "dir", "dir:config:split"       a dataset folder as `datasets.load_dataset(dir)` reads it (parquet, JSON lines,
                                    JSON or csv files under data/ or named by split, or as its README's configs
                                    say); "dir:split" when the split is not also a config's name
    "owner/name[:config[:split]]"   a Hugging Face hub dataset (split defaults to "train")
    "spec@2.5" or {"path": spec, "weight": 2.5}
                                    weight w: per epoch the source contributes floor(w) copies of each
                                    example plus a seeded round(frac(w) * n) subset, so 0.5 halves and 2 doubles
    {"path": spec, "columns": {...}}
                                    the source's own data.columns (instead of data.columns)
    a list of the above             a mixture

`locate` resolves a source to the files it reads; the cache (sft_jax.data.cache) hashes exactly those files and
the build (sft_jax.data.sources) reads exactly those, so what is fingerprinted is what is read. Local files are
read here rather than by `datasets`' loaders so an error can name the file and its 1-based line or row: JSON
lines are streamed in chunks (see sources._build), parquet is read a record batch at a time with pyarrow, csv
through `datasets.load_dataset` with every column read as a string (empty cells as ""). Datasets that `datasets`
opens (save_to_disk folders, hub datasets, csv) are read a batch at a time from their Arrow files, never
converted to JSON or held whole.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections import Counter

from sft_jax.data.config import DataError, check_columns

DEMO_SOURCES = ("demo", "demo:noisy")  # generated, not read; both evaluate on the demo's correct held-out split

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
GLOB_CHARACTERS = "*?["


# ------------------------------------------------------------------------------------------- source specs


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    name: str
    weight: float = 1.0
    columns: dict | None = None  # the source's own data.columns; None: data.columns applies


def parse_sources(spec) -> list[SourceSpec]:
    """Parse DataConfig.train/eval into a list of weighted sources."""
    entries = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not entries:
        raise DataError("data: empty source list")
    out = []
    for entry in entries:
        columns = None
        if isinstance(entry, dict):
            unknown = set(entry) - {"path", "weight", "columns"}
            if "path" not in entry or unknown:
                raise DataError(f"data source {entry!r}: expected keys 'path' and optional 'weight', 'columns'")
            name, weight, columns = entry["path"], entry.get("weight", 1.0), entry.get("columns")
            check_columns(columns, f"data source {name!r}: columns")
        elif isinstance(entry, str):
            name, weight = entry, 1.0
            head, sep, tail = entry.rpartition("@")
            if sep and _is_number(tail):
                name, weight = head, float(tail)
        else:
            raise DataError(f"data source {entry!r}: expected a string or a {{path, weight, columns}} mapping")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
            raise DataError(f"data source {name!r}: weight must be a positive number, got {weight!r}")
        out.append(SourceSpec(str(name), float(weight), columns))
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------ where the rows are


@dataclasses.dataclass(frozen=True)
class Location:
    """Where one source's rows are."""

    name: str  # the source as written
    kind: str  # demo | files (local files, read in order) | saved (a save_to_disk Dataset) | hub
    files: tuple = ()  # files: the files read; saved: the files of the folder load_from_disk reads
    folder: str | None = None  # saved: that folder (a DatasetDict's split folder)
    hub: tuple = ()  # hub: (repo, config or None, split)


def locate(name: str) -> Location:
    """Resolve a source name (see the module doc) to its files, or to a hub dataset."""
    if name in DEMO_SOURCES:
        return Location(name, "demo")
    path = os.path.expanduser(name)
    if any(c in path for c in GLOB_CHARACTERS) and not os.path.exists(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"{name}: no files match")
        return Location(name, "files", _readable(name, files))
    if path.endswith(LOCAL_SUFFIXES):
        if not os.path.isfile(path):
            raise DataError(f"{name}: no such file")
        return Location(name, "files", (path,))
    folder, selector = path, ""
    if not os.path.isdir(path) and ":" in path:  # "dir:split", "dir:config:split"
        folder, selector = path.split(":", 1)
    if os.path.isdir(folder):
        return _locate_folder(name, folder, selector)
    if os.path.exists(path):
        raise DataError(f"{name}: unsupported file type; expected one of {LOCAL_SUFFIXES}, a folder or a glob")
    if name.startswith((os.sep, ".", "~")):
        raise DataError(f"{name}: no such file or folder")
    repo, config, split = (name.split(":") + [None, None])[:3]
    return Location(name, "hub", hub=(repo, config or None, split or "train"))


def _readable(name: str, files) -> tuple:
    unreadable = [f for f in files if not f.endswith(LOCAL_SUFFIXES)]
    if unreadable:
        raise DataError(f"{name}: {unreadable[0]}: unsupported file type; expected one of {LOCAL_SUFFIXES}")
    return tuple(files)


def _locate_folder(name: str, folder: str, selector: str) -> Location:
    """A save_to_disk folder (Dataset or DatasetDict), else a dataset folder as load_dataset reads it."""
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        with open(os.path.join(folder, "dataset_dict.json"), encoding="utf-8") as f:
            splits = json.load(f)["splits"]
        split = selector or "train"
        if split not in splits:
            raise DataError(f"{name}: no split {split!r} in this save_to_disk DatasetDict; its splits: {splits}")
        return _saved(name, os.path.join(folder, split))
    if os.path.isfile(os.path.join(folder, "state.json")):
        if selector:
            raise DataError(f"{name}: {folder} holds one save_to_disk Dataset, which has no splits to pick from")
        return _saved(name, folder)
    return Location(name, "files", _readable(name, dataset_folder_files(name, folder, selector)))


def _saved(name: str, folder: str) -> Location:
    """What load_from_disk reads: its state (which names the Arrow files), the features, the Arrow files."""
    with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
        arrow = [os.path.join(folder, entry["filename"]) for entry in json.load(f)["_data_files"]]
    metadata = [os.path.join(folder, "state.json"), os.path.join(folder, "dataset_info.json")]
    return Location(name, "saved", tuple(arrow + [f for f in metadata if os.path.isfile(f)]), folder=folder)


def dataset_folder_files(name: str, folder: str, selector: str) -> list[str]:
    """The files of one split, as `datasets.load_dataset(folder, config, split=split)` would read them."""
    import datasets

    parts = selector.split(":") if selector else []
    if len(parts) > 2:
        raise DataError(f"{name}: expected {folder}, {folder}:split or {folder}:config:split")
    try:
        builder = datasets.load_dataset_builder(folder)
    except (FileNotFoundError, ValueError) as e:  # no data files it knows, or a README it cannot read
        raise DataError(f"{name}: neither a save_to_disk folder nor a dataset folder `datasets` can read ({e})") from e
    configs = list(builder.builder_configs)
    if len(parts) == 1 and parts[0] not in configs:
        parts = ["", parts[0]]  # "dir:split"
    config, split = (parts + ["", ""])[:2]
    if config and config not in configs:
        raise DataError(f"{name}: no config {config!r} in {folder}; its configs: {configs}")
    if config and config != builder.config.name:
        builder = datasets.load_dataset_builder(folder, config)
    data_files = builder.config.data_files or {}
    split = split or "train"
    if split not in data_files:
        raise DataError(f"{name}: no split {split!r} in {folder}; its splits: {sorted(data_files)}")
    return [str(f) for f in data_files[split]]


# ---------------------------------------------------------------------------------------- the bad rows


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


# ------------------------------------------------------------------------------------------ reading rows


@dataclasses.dataclass
class RowChunk:
    """Consecutive rows of one file or dataset of a source, as the build processes them."""

    name: str  # the file, or the source for a dataset
    rows: list  # raw JSON lines (bytes) when `line_nos` is set; else parsed rows
    fmt: str | None  # the source's format; None: only parse and collect columns (the JSON-lines scan)
    carve: float = 0.0  # data.eval_fraction held out by content hash (0: none)
    line_nos: list | None = None  # 1-based line of each raw row
    item: bool = False  # rows are the items of one JSON array: named "item N", not "row N"
    start: int = 0  # index of rows[0] in its file or dataset
    columns: dict | None = None  # the source's data.columns

    def where(self, i: int) -> str:
        if self.line_nos is not None:
            return f"{self.name} line {self.line_nos[i]}"
        return f"{self.name} {'item' if self.item else 'row'} {self.start + i + 1}"

    def parsed(self):
        """(i, row or None, what is wrong with a JSON line or None) per row."""
        for i, row in enumerate(self.rows):
            if self.line_nos is None:
                yield i, row, None
            else:
                yield i, *parse_line(row)


class Part:
    """One file or dataset of a source: its row count, columns and first row, and its rows in chunks."""

    name: str
    json_lines = False  # JSON lines: rows and columns are known after a first pass over the file (sources._survey)

    def __len__(self) -> int:
        raise NotImplementedError

    def columns(self) -> set:
        raise NotImplementedError

    def sample(self) -> dict | None:
        """The first row (its messages tell chat from sharegpt)."""
        raise NotImplementedError

    def chunks(self, size: int, fmt: str | None, carve: float, columns: dict | None):
        raise NotImplementedError


class JsonLines(Part):
    json_lines = True

    def __init__(self, path: str):
        self.name = path

    def __len__(self) -> int:
        """Lines, blank ones included: the rows are counted by the scan."""
        with open(self.name, "rb") as f:
            return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b""))

    def chunks(self, size, fmt, carve, columns):
        rows, line_nos = [], []
        for line_no, raw in nonblank_lines(self.name):
            rows.append(raw)
            line_nos.append(line_no)
            if len(rows) == size:
                yield RowChunk(self.name, rows, fmt, carve, line_nos=line_nos, columns=columns)
                rows, line_nos = [], []
        if rows:
            yield RowChunk(self.name, rows, fmt, carve, line_nos=line_nos, columns=columns)


class Rows(Part):
    """Rows held in memory: a JSON array file, or the demo."""

    def __init__(self, name: str, rows: list, item: bool = False):
        self.name, self.rows, self.item = name, rows, item

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self) -> set:
        return {key for row in self.rows if isinstance(row, dict) for key in row}

    def sample(self):
        return next((row for row in self.rows if isinstance(row, dict)), None)

    def chunks(self, size, fmt, carve, columns):
        for lo in range(0, len(self.rows), size):
            yield RowChunk(self.name, self.rows[lo : lo + size], fmt, carve, item=self.item, start=lo, columns=columns)


class Parquet(Part):
    """A parquet file, a record batch at a time."""

    def __init__(self, path: str):
        import pyarrow.parquet as pq

        self.name, self.file = path, pq.ParquetFile(path)

    def __len__(self) -> int:
        return self.file.metadata.num_rows

    def columns(self) -> set:
        return set(self.file.schema_arrow.names)

    def sample(self):
        return next((arrow_rows(batch)[0] for batch in self.file.iter_batches(batch_size=1)), None)

    def chunks(self, size, fmt, carve, columns):
        start = 0
        for batch in self.file.iter_batches(batch_size=size):
            yield RowChunk(self.name, arrow_rows(batch), fmt, carve, start=start, columns=columns)
            start += batch.num_rows


class ArrowDataset(Part):
    """A `datasets.Dataset` (save_to_disk, hub, csv): its Arrow files read a record batch at a time.

    `datasets` memory-maps these files; iterating the mapped dataset would leave every page read resident in
    this process (RSS grows by the whole file), so the rows are streamed from the files with ordinary reads.
    A dataset with an indices mapping (a select or shuffle not yet flattened, which save_to_disk and
    load_dataset never leave) is read through `datasets` instead."""

    def __init__(self, name: str, dataset):
        self.name, self.dataset = name, dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def columns(self) -> set:
        return set(self.dataset.column_names)

    def sample(self):
        return arrow_rows(self.dataset.with_format("arrow")[:1])[0] if len(self.dataset) else None

    def chunks(self, size, fmt, carve, columns):
        files = [f["filename"] for f in self.dataset.cache_files]
        if self.dataset._indices is not None or not files:
            batches = self.dataset.with_format("arrow").iter(batch_size=size)  # Arrow tables
        else:
            batches = _stream_batches(files)
        start = 0
        for batch in batches:
            for lo in range(0, batch.num_rows, size):
                rows = arrow_rows(batch.slice(lo, size))
                yield RowChunk(self.name, rows, fmt, carve, start=start, columns=columns)
                start += len(rows)


def _stream_batches(files):
    import pyarrow as pa

    for path in files:
        with pa.OSFile(path) as f:
            yield from pa.ipc.open_stream(f)


def arrow_rows(batch) -> list[dict]:
    """The rows of an Arrow record batch (or table) as python dicts. `datasets` stores a Sequence of a dict (the
    features of many hub datasets' `conversations`) as a struct of lists; such a column becomes the list of dicts
    it stands for."""
    import pyarrow as pa

    rows = batch.to_pylist()
    columnar = [field.name for field in batch.schema if pa.types.is_struct(field.type) and field.type.num_fields
                and all(pa.types.is_list(c.type) or pa.types.is_large_list(c.type) for c in field.type)]
    for row in rows:
        for name in columnar:
            value = row[name]
            if isinstance(value, dict) and len({len(v) for v in value.values() if v is not None}) == 1:
                row[name] = [dict(zip(value, items)) for items in zip(*value.values())]
    return rows


def open_parts(location: Location, bad: BadRows) -> list[Part]:
    """The parts of a located source (not the demo), in reading order; an empty file is a bad row."""
    if location.kind == "saved":
        import datasets

        return [ArrowDataset(location.name, datasets.load_from_disk(location.folder))]
    if location.kind == "hub":
        import datasets

        repo, config, split = location.hub
        return [ArrowDataset(location.name, datasets.load_dataset(repo, config, split=split))]
    parts = []
    for path in location.files:
        if os.path.getsize(path) == 0:
            bad.bad("empty_file", f"{path}: empty file, no examples")
        elif is_json_lines(path):
            parts.append(JsonLines(path))
        elif path.endswith(".json"):
            parts.append(_json_array(path))
        elif path.endswith(".parquet"):
            parts.append(Parquet(path))
        else:
            parts.append(ArrowDataset(path, _csv(path)))
    return parts


def is_json_lines(path: str) -> bool:
    """A .jsonl file, or a .json file that is not one array: read as a stream."""
    if path.endswith(".jsonl"):
        return True
    if not path.endswith(".json"):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        while block := f.read(1 << 16):
            if block.strip():
                return not block.lstrip().startswith("[")
    return True


def _json_array(path: str) -> Rows:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        # One array: a syntax error makes the whole file unreadable, so it is an error even in skip mode.
        raise DataError(f"{path} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
    return Rows(path, rows, item=True)


def _csv(path: str):
    import csv

    import datasets

    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    # Strings everywhere: pandas would otherwise turn an answer like "42" into an int.
    features = datasets.Features({column: datasets.Value("string") for column in header})
    return datasets.load_dataset("csv", data_files=path, split="train", features=features, keep_default_na=False)


def nonblank_lines(path: str):
    """(1-based line number, raw bytes) of each non-blank line: blank lines separate nothing, they are not rows."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                yield line_no, raw


def parse_line(raw: bytes):
    """(row, None) for a JSON line, or (None, what is wrong with it)."""
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg} at column {e.colno})"
