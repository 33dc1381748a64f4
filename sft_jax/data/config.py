"""The `data:` section of the training config, and the one error every data problem raises."""

from __future__ import annotations

import dataclasses
import typing


class DataError(ValueError):
    """Bad data or data config; the message names the file, the line or row, and the field."""


# Our field names that data.columns maps to a file's names: columns of a row, keys of a message, role names.
COLUMN_FIELDS = {
    "instruction": "alpaca: the instruction",
    "input": "alpaca: the optional input appended to the instruction",
    "output": "alpaca: the response",
    "prompt": "prompt_completion and preference: the prompt (a string or a list of messages)",
    "completion": "prompt_completion: the response (a string, or a list holding one assistant message)",
    "messages": "chat and sharegpt: the list of messages (sharegpt: 'conversations', else 'messages')",
    "system": "sharegpt: the optional system text beside the messages",
    "role": "a message's role key (sharegpt: 'from')",
    "content": "a message's text key (sharegpt: 'value')",
    "user": "the user's role name (sharegpt: 'human' or 'user')",
    "assistant": "the assistant's role name (sharegpt: 'gpt' or 'assistant')",
    "system_role": "the system's role name ('system')",
    "chosen": "preference: the preferred response",
    "rejected": "preference: the other response",
}


def check_columns(columns, where: str) -> None:
    """A data.columns mapping: our field names (COLUMN_FIELDS) to non-empty strings."""
    if columns is None:
        return
    if not isinstance(columns, dict):
        raise DataError(f"{where}={columns!r}: expected a mapping of our field names to the file's names")
    unknown = sorted(set(columns) - set(COLUMN_FIELDS))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; valid fields: {list(COLUMN_FIELDS)}")
    for ours, theirs in columns.items():
        if not isinstance(theirs, str) or not theirs:
            raise DataError(f"{where}.{ours}={theirs!r}: expected the file's name for it, a non-empty string")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to train and evaluate on, how to render it, and how to cut and batch it."""

    # "demo", "demo:noisy" (the RL demo's flawed answers), a local .json/.jsonl/.parquet/.csv file, a glob of
    # them ("shards/*.parquet"), a save_to_disk folder ("dir", "dir:split"), a dataset folder or hub name ("dir" or
    # "owner/name", then ":config:split"), or a list of those; a weight multiplies how often a source is seen per
    # epoch: "file.jsonl@2" or {"path":..., "weight": 2}; a source's own column names: {"path":..., "columns":
    # {...}} (see `columns`).
    train: str | tuple = "demo"
    eval: str | tuple | None = None  # same syntax; None -> carve eval_fraction off train by a content hash
    eval_fraction: float = 0.05  # share of train examples held out when eval is None (0 -> no eval)
    # auto (from the column names) | alpaca | prompt_completion | chat | sharegpt | demo; preference pairs
    # (sft_jax.data.preference): preference (prompt/chosen/rejected) | hh (full-text pairs) | sharegpt
    format: str = "auto"
    # the file's names for our fields (COLUMN_FIELDS: columns, message keys role/content, role names user/assistant/
    # system_role), e.g. {instruction: question, output: answer}; per source in {"path":..., "columns":...}; None: ours
    columns: dict | None = None
    # None -> built-in plain-text template; auto -> the tokenizer's own chat template if it has one (Qwen2.5's
    # ChatML, Llama 3's headers), else the built-in; else a Jinja string or a .jinja path
    template: str | None = None
    max_length: int = 512  # tokens per document and per packed row; must be <= model n_positions
    batching: str = "packing"  # packing | buckets
    max_segments_per_row: int = 0  # packing: documents per row at most; 0 = max_length // 16 (static M of cudnn_packed)
    buckets: tuple[int, ...] = (128, 256, 512, 1024)  # pad lengths for `buckets` (capped at max_length)
    train_on_prompt: bool = False  # also put loss on prompt tokens
    last_turn_only: bool = False  # chat: supervise only the last assistant turn
    truncation: str = "prompt_left"  # prompt_left: keep the whole last response, cut the prompt's left | drop
    on_bad_example: str = "error"  # error: raise DataError at the first bad row | skip: drop and count it
    shuffle: bool = True  # shuffle rows (packing) or batches (buckets) each epoch
    prefetch: int = 2  # batches prepared ahead in a background thread (0 = synchronous)
    demo_train_examples: int = 20000  # size of the built-in demo training set
    demo_eval_examples: int = 500  # size of the built-in demo held-out set
    # Tokenized cache (sft_jax.data.cache): auto: memory-map it if its fingerprint matches, else build it once |
    # off: tokenize in memory every run | rebuild: build it anew even if present.
    cache: str = "auto"
    cache_dir: str | None = None  # None -> $SFT_JAX_DATA_CACHE or ~/.cache/sft_jax/data; one folder per fingerprint
    num_proc: int = 0  # worker processes that tokenize large splits; 0 = one per CPU core

    def __post_init__(self):
        choices = {
            "format": ("auto", "alpaca", "prompt_completion", "chat", "sharegpt", "demo", "preference", "hh"),
            "batching": ("packing", "buckets"),
            "truncation": ("prompt_left", "drop"),
            "on_bad_example": ("error", "skip"),
            "cache": ("auto", "off", "rebuild"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise DataError(f"data.{name}={getattr(self, name)!r}: expected one of {allowed}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise DataError(f"data.eval_fraction={self.eval_fraction}: expected 0 <= eval_fraction < 1")
        if self.max_length < 2:
            raise DataError(f"data.max_length={self.max_length}: expected >= 2")
        if self.num_proc < 0:
            raise DataError(f"data.num_proc={self.num_proc}: expected >= 0 (0 = one per CPU core)")
        if self.max_segments_per_row < 0:
            raise DataError(f"data.max_segments_per_row={self.max_segments_per_row}: expected >= 0 (0 = max_length // 16)")
        if self.prefetch < 0:
            raise DataError(f"data.prefetch={self.prefetch}: expected >= 0")
        if not self.buckets or any(b < 2 for b in self.buckets):
            raise DataError(f"data.buckets={self.buckets}: expected a non-empty list of lengths >= 2")
        check_columns(self.columns, "data.columns")

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        """Build from a YAML `data:` mapping; unknown keys or wrong types raise DataError listing valid keys."""
        hints = typing.get_type_hints(cls)
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise DataError(f"data: unknown key(s) {unknown}; valid keys: {valid}")
        kwargs = {}
        for key, value in d.items():
            if isinstance(value, list):  # YAML lists -> tuples, so the config stays immutable
                value = tuple(value)
            if not _has_type(value, hints[key]):
                raise DataError(f"data.{key}={value!r}: expected {hints[key]}; valid keys: {valid}")
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """Plain dict (lists for tuples), e.g. for writing next to a checkpoint."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _has_type(value, hint) -> bool:
    """Shallow isinstance check against a type hint (unions, tuples, None); ints are accepted as floats."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return True
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if origin in (str, bool, tuple, dict) and isinstance(value, origin):
            if origin is tuple and typing.get_args(option)[:1] == (int,):
                return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            return True
    return False


_UnionType = type(int | None)
