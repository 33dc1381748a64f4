"""The data report: what was read, kept, dropped and cut, token length statistics, batching efficiency."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from sft_jax.data.formats import decode
from sft_jax.data.pack import SFTDataset, bucket_batches, bucket_for, bucket_lengths, packing_rows

OPEN, CLOSE = "⟦", "⟧"  # wrap supervised spans in the decoded example


@dataclasses.dataclass
class SplitReport:
    """Counts and statistics of one split (train or eval)."""

    read: int  # rows read from the sources
    dropped: dict[str, int]  # reason -> rows dropped (bad rows in skip mode, too long, ...)
    truncated: int  # kept documents whose prompt was cut from the left
    kept: int  # examples kept, before source weights
    documents: int  # documents per epoch, after source weights
    prompt_lengths: dict[str, float]  # L_Q: tokens outside responses (mean, p50, p95, max)
    response_lengths: dict[str, float]  # L_A: response tokens incl. closing eos (mean, p50, p95, max)
    tokens: int  # tokens in all documents
    supervised_tokens: int  # tokens that are training targets
    supervised_fraction: float  # supervised_tokens / tokens
    batching: str  # "packing" or "buckets at batch size B"
    efficiency: float  # non-padding tokens / all tokens in the batches of one epoch
    example: str  # first document decoded, supervised spans wrapped in ⟦ ⟧
    errors: list[str]  # first messages of dropped bad rows
    read_by_source: dict[str, int] = dataclasses.field(default_factory=dict)  # rows read per source
    to_eval: int = 0  # train only: examples carved from the rows read into eval (data.eval_fraction)
    max_segments_seen: int = 0  # packing: the most documents in one row (<= data.max_segments_per_row)
    formats: dict = dataclasses.field(default_factory=dict)  # source -> [format read, data.columns applied or None]


@dataclasses.dataclass
class DataReport:
    train: SplitReport
    eval: SplitReport | None

    def to_dict(self) -> dict:
        return report_to_dict(self)

    def to_json(self) -> str:
        return report_to_json(self)

    def to_markdown(self) -> str:
        return report_to_markdown(self)


def report_to_dict(report: DataReport) -> dict:
    """JSON-serialisable dict of the report."""
    return dataclasses.asdict(report)


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    if len(lengths) == 0:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}
    return {
        "mean": round(float(np.mean(lengths)), 2),
        "p50": float(np.percentile(lengths, 50)),
        "p95": float(np.percentile(lengths, 95)),
        "max": float(np.max(lengths)),
    }


def supervised_targets(dataset: SFTDataset) -> int:
    """Supervised tokens that are targets: a document's first token has no predecessor to predict it."""
    return int(dataset.supervised.sum() - dataset.supervised[dataset.offsets[:-1]].sum()) if len(dataset) else 0


def efficiency(dataset: SFTDataset, mode, max_length, buckets, batch_size, seed, shuffle=True) -> float:
    """Non-padding share of the batch tokens of one epoch under `mode` (the run's plan for `seed`)."""
    if len(dataset) == 0:
        return 0.0
    lengths = dataset.lengths
    if mode == "packing":
        total = len(packing_rows(lengths, max_length, seed, shuffle)) * max_length
    else:
        pads = bucket_lengths(buckets, max_length)
        batches = bucket_batches(lengths, batch_size, seed, 0, shuffle)
        total = sum(batch_size * bucket_for(int(lengths[b].max()), pads) for b in batches)
    return round(float(lengths.sum()) / total, 4)


def marked_example(dataset: SFTDataset, tokenizer, i: int = 0) -> str:
    """Document i decoded, with each run of supervised target tokens wrapped in ⟦ ⟧."""
    if len(dataset) == 0:
        return ""
    tokens, supervised = dataset.doc(i)
    supervised = supervised.copy()
    supervised[0] = False  # never a target
    parts, start = [], 0
    for t in range(1, len(tokens) + 1):
        if t == len(tokens) or supervised[t] != supervised[start]:
            text = decode(tokenizer, tokens[start:t])
            parts.append(OPEN + text + CLOSE if supervised[start] else text)
            start = t
    return "".join(parts)


def split_report(
    dataset: SFTDataset,
    tokenizer,
    *,
    read: int,
    read_by_source: dict | None = None,
    to_eval: int = 0,
    dropped: dict,
    truncated: int,
    kept: int,
    errors: list,
    mode: str,
    max_length: int,
    buckets,
    batch_size: int,
    seed: int,
    shuffle: bool,
    max_segments: int = 0,
    formats: dict | None = None,
) -> SplitReport:
    """Statistics of one split's final dataset."""
    responses = dataset.response_tokens
    supervised = supervised_targets(dataset)
    tokens = int(dataset.lengths.sum())
    return SplitReport(
        read=read,
        dropped=dict(sorted(dropped.items())),
        truncated=truncated,
        kept=kept,
        documents=len(dataset),
        prompt_lengths=length_stats(dataset.lengths - responses),
        response_lengths=length_stats(responses),
        tokens=tokens,
        supervised_tokens=supervised,
        supervised_fraction=round(supervised / tokens, 4) if tokens else 0.0,
        batching="packing" if mode == "packing" else f"buckets at batch size {batch_size}",
        efficiency=efficiency(dataset, mode, max_length, buckets, batch_size, seed, shuffle),
        example=marked_example(dataset, tokenizer),
        errors=list(errors),
        read_by_source=dict(read_by_source or {}),
        to_eval=to_eval,
        max_segments_seen=max(map(len, packing_rows(dataset.lengths, max_length, seed, shuffle, max_segments)),
                              default=0)
        if mode == "packing" else 0,
        formats={name: list(read) for name, read in (formats or {}).items()},
    )


def report_to_markdown(report: DataReport) -> str:
    """The report as Markdown, as printed by `python -m sft_jax.data` and written by the trainer."""
    lines = ["# Data report", ""]
    for name, split in (("train", report.train), ("eval", report.eval)):
        if split is None:
            continue
        dropped = ", ".join(f"{k}: {v}" for k, v in split.dropped.items()) or "none"
        read = f"{split.read}"
        if len(split.read_by_source) > 1:
            read += " (" + ", ".join(f"{k}: {v}" for k, v in split.read_by_source.items()) + ")"
        elif name == "eval" and not split.read_by_source:
            read += " (carved from train)"
        lines += [
            f"## {name}",
            "",
            "| | |",
            "|---|---|",
            f"| examples read | {read} |",
            *([f"| format | {formats_cell(split.formats)} |"] if split.formats else []),
            *([f"| moved to eval (data.eval_fraction) | {split.to_eval} |"] if split.to_eval else []),
            f"| kept | {split.kept} |",
            f"| dropped | {sum(split.dropped.values())} ({dropped}) |",
            f"| truncated (prompt cut) | {split.truncated} |",
            f"| documents per epoch | {split.documents} |",
            f"| tokens | {split.tokens} |",
            f"| supervised tokens | {split.supervised_tokens} ({split.supervised_fraction:.1%}) |",
            f"| {split.batching} efficiency | {split.efficiency:.1%} |",
            *([f"| most documents in one row | {split.max_segments_seen} |"] if split.batching == "packing" else []),
            "",
            "| tokens per document | mean | p50 | p95 | max |",
            "|---|---|---|---|---|",
        ]
        for label, stats in (("prompt (L_Q)", split.prompt_lengths), ("response (L_A)", split.response_lengths)):
            lines.append(f"| {label} | " + " | ".join(_length(stats[k]) for k in ("mean", "p50", "p95", "max")) + " |")
        if split.errors:
            lines += ["", "First dropped rows:", ""] + [f"- {e}" for e in split.errors]
        lines += ["", f"Example (supervised spans in {OPEN} {CLOSE}):", "", "```", split.example, "```", ""]
    return "\n".join(lines)


def formats_cell(formats: dict) -> str:
    """The format read from each source and the data.columns applied, e.g.
    "a.jsonl: sharegpt; b.jsonl: chat (data.columns messages=dialog)"."""
    cells = []
    for name, (fmt, columns) in formats.items():
        cell = fmt + (" (data.columns " + ", ".join(f"{k}={v}" for k, v in columns.items()) + ")" if columns else "")
        cells.append(cell if len(formats) == 1 else f"{name}: {cell}")
    return "; ".join(cells)


def _length(x: float) -> str:
    """A token length for Markdown: an integer as is, anything else with 1 decimal (--json keeps all)."""
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def report_to_json(report: DataReport) -> str:
    return json.dumps(report_to_dict(report), indent=2, ensure_ascii=False)
