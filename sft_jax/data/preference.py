"""Preference pairs through the data path: formats, rendering with loss masks, the length policy, the pair
batch layout and the preference section of the data report.

Formats (data.format, or detected from the columns when "auto"; data.columns names other columns as ours):

    preference  TRL's prompt / chosen / rejected. Either all strings (prompt = one user message, each
                response one assistant message), or chat message lists (TRL's conversational pairs): `prompt`
                a list of messages and `chosen` / `rejected` each one assistant message; without `prompt`
                ("implicit prompt"), `chosen` and `rejected` are whole conversations whose common messages are
                the prompt.
    sharegpt    LLaMA-Factory's pairs: `conversations` (or `messages`) ShareGPT turns ({from, value}, see
                sft_jax.data.formats), alternating from the user and ending with a user turn, an optional
                `system` column, and `chosen` / `rejected` each one assistant message object {from, value}.
    hh          Anthropic HH full-text pairs: `chosen` and `rejected` are whole transcripts
                "\\n\\nHuman: ...\\n\\nAssistant: ...". They are split at the last "\\n\\nAssistant:" inside
                their common prefix; the text before it is parsed into user/assistant turns at the
                "\\n\\nHuman:" / "\\n\\nAssistant:" markers, the text after it is each response.
    Auto: `prompt` present -> preference; else a `conversations` or `messages` column -> sharegpt; else chat
    lists in `chosen` -> preference; else strings -> hh.

Both halves are rendered with the SFT chat template into prompt + response + eos; only the final response
and its eos are targets (the prompt, earlier assistant turns included, never is). Both halves of a pair share
one row of the batch (distinct segments, so they never attend to each other): data.max_length bounds the
pair, chosen + rejected. A pair longer than that loses the same number of tokens from the left of both
prompts (data.truncation=prompt_left) or is dropped (truncation=drop, reason too_long); a pair whose
responses cannot fit with one prompt token each is dropped (reason response_too_long).

Batches: a row holds whole pairs (packing: best fit of pair lengths; buckets: one pair per row), so a pair
never straddles a micro-batch, process or shard. The arrays are documented in
sft_jax/objectives/preference_losses.py; `global_batch_size` counts rows, so the pairs per batch vary and
a loss is normalised by `pair_mask.sum()` over the global batch.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np

from sft_jax.data.config import DataError
from sft_jax.data.formats import (
    MESSAGE_LISTS,
    FieldError,
    Names,
    Renderer,
    chat_template,
    check_prompt_tokens,
    columns_hint,
    decode,
    message,
    messages_at,
    sharegpt_messages,
)
from sft_jax.data.iterator import BatchIterator, eval_batches
from sft_jax.data.pack import SFTDataset, assemble, best_fit_rows, bucket_for, bucket_lengths, packing_rows
from sft_jax.data.report import OPEN, CLOSE, formats_cell, length_stats
from sft_jax.data.rows import DEMO_SOURCES, BadRows, Rows, locate, open_parts, parse_sources
from sft_jax.data.sources import CHUNK, _weighted_indices, held_out, source_columns
from sft_jax.models.heads import reward_read_position

PREFERENCE_FORMATS = ("preference", "sharegpt", "hh")
HH_ASSISTANT, HH_HUMAN = "\n\nAssistant:", "\n\nHuman:"


# ----------------------------------------------------------------------------------------------- formats


def detect_preference_format(columns, where: str, sample: dict | None = None, mapping: dict | None = None) -> str:
    """Pick sharegpt, preference or hh from a source's columns (named as data.columns maps them) and, without a
    prompt, the type of `chosen` in its first row."""
    mapping = mapping or {}
    columns = set(columns)
    ours = {({theirs: field for field, theirs in mapping.items()}).get(c, c) for c in columns}
    if not {"chosen", "rejected"} <= ours:
        raise DataError(f"{where}: cannot detect a preference format from columns {sorted(columns)}; expected "
                        "'prompt'+'chosen'+'rejected' (preference), 'conversations'+'chosen'+'rejected' "
                        "(sharegpt) or 'chosen'+'rejected' (hh), or set data.format"
                        + columns_hint(columns, sample, ("prompt", "chosen", "rejected")))
    if "prompt" in ours:
        return "preference"
    if "messages" in ours or set(MESSAGE_LISTS) & columns:
        return "sharegpt"
    chosen = sample.get(mapping.get("chosen", "chosen")) if isinstance(sample, dict) else None
    return "preference" if isinstance(chosen, list) else "hh"


def _field(row: dict, field: str):
    if row.get(field) is None:
        raise FieldError("missing_field", field, "missing")
    return row[field]


def _nonempty(text: str, field: str) -> str:
    if not text.strip():
        raise FieldError("empty_response", field, "empty response")
    return text


def _response_of(value, field: str, names: Names, prompt_len: int = 0) -> str:
    """The assistant text of `chosen`/`rejected` (a string, or messages whose part after the prompt is one
    assistant message)."""
    if isinstance(value, str):
        return _nonempty(value, field)
    if not isinstance(value, list):
        raise FieldError("wrong_type", field, f"expected a string or a list of messages, got {type(value).__name__}")
    messages = messages_at(value, field, names)[prompt_len:]
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise FieldError("wrong_type", field, "expected exactly one assistant message after the prompt, got "
                         f"{[m['role'] for m in messages]}")
    return _nonempty(messages[0]["content"], field)


def to_pair(row, fmt: str, names: Names | None = None) -> dict:
    """Validate one preference row (named as `names` says); returns {"prompt": messages, "chosen": text,
    "rejected": text}."""
    if not isinstance(row, dict):
        raise FieldError("wrong_type", "<row>", f"expected an object, got {type(row).__name__}")
    names = names or Names.of(fmt)
    if fmt == "hh":
        return hh_pair(_field(row, names["chosen"]), _field(row, names["rejected"]), names)
    if fmt == "sharegpt":
        return _sharegpt_pair(row, names)
    if fmt != "preference":
        raise DataError(f"unknown preference format {fmt!r}; expected one of {PREFERENCE_FORMATS}")
    chosen_field, rejected_field = names["chosen"], names["rejected"]
    chosen, rejected = _field(row, chosen_field), _field(row, rejected_field)
    prompt = row.get(names["prompt"])
    if prompt is None:  # implicit prompt: the common messages of two conversations
        if not isinstance(chosen, list):
            raise FieldError("missing_field", names["prompt"], "missing (a string chosen needs a prompt; "
                             "full-text transcripts are data.format=hh)")
        if not isinstance(rejected, list):
            raise FieldError("wrong_type", rejected_field,
                             f"expected a list of messages, got {type(rejected).__name__}")
        c, r = messages_at(chosen, chosen_field, names), messages_at(rejected, rejected_field, names)
        n = 0
        while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
            n += 1
        return {"prompt": c[:n], "chosen": _response_of(chosen, chosen_field, names, n),
                "rejected": _response_of(rejected, rejected_field, names, n)}
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = messages_at(prompt, names["prompt"], names)
    else:
        raise FieldError("wrong_type", names["prompt"],
                         f"expected a string or a list of messages, got {type(prompt).__name__}")
    return {"prompt": messages, "chosen": _response_of(chosen, chosen_field, names),
            "rejected": _response_of(rejected, rejected_field, names)}


def _sharegpt_pair(row: dict, names: Names) -> dict:
    """LLaMA-Factory's pair: ShareGPT turns ending with the user's, and two answers as message objects."""
    prompt = sharegpt_messages(row, names)
    if not prompt or prompt[-1]["role"] != "user":
        field = names.message_list(row)
        raise FieldError("not_alternating", field, "a pair's conversation must end with a user turn, the one "
                         f"{names['chosen']} and {names['rejected']} answer")
    return {"prompt": prompt, "chosen": _answer(row, names["chosen"], names),
            "rejected": _answer(row, names["rejected"], names)}


def _answer(row: dict, field: str, names: Names) -> str:
    """An answer as a message object {from: gpt, value: ...} (or a plain string)."""
    value = _field(row, field)
    if isinstance(value, str):
        return _nonempty(value, field)
    try:
        answer = message(value, names)
    except FieldError as e:
        raise FieldError(e.reason, field + (f".{e.field}" if e.field else ""), e.detail) from None
    if answer["role"] != "assistant":
        raise FieldError("wrong_type", f"{field}.{names['role']}", f"expected an assistant message, got "
                         f"{value[names['role']]!r} ({answer['role']})")
    return answer["content"]


def hh_pair(chosen, rejected, names: Names | None = None) -> dict:
    """Split Anthropic HH full-text transcripts into a shared prompt (as turns) and two responses."""
    names = names or Names.of("hh")
    for field, value in ((names["chosen"], chosen), (names["rejected"], rejected)):
        if not isinstance(value, str):
            raise FieldError("wrong_type", field, f"expected a string, got {type(value).__name__}")
    common = 0
    limit = min(len(chosen), len(rejected))
    while common < limit and chosen[common] == rejected[common]:
        common += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, common)  # the last marker lying wholly inside the common prefix
    if cut < 0:
        raise FieldError("no_marker", names["chosen"],
                         f"no {HH_ASSISTANT!r} inside the text chosen and rejected share")
    start = cut + len(HH_ASSISTANT)
    return {"prompt": hh_turns(chosen[:cut]), "chosen": _nonempty(chosen[start:], names["chosen"]),
            "rejected": _nonempty(rejected[start:], names["rejected"])}


def hh_turns(text: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c' -> user a, assistant b, user c (text before the first
    marker, if any, is a system message)."""
    markers = {HH_HUMAN: "user", HH_ASSISTANT: "assistant"}
    messages, role, at = [], "system", 0
    while True:
        hits = [(text.find(m, at), m) for m in markers if text.find(m, at) >= 0]
        end, marker = min(hits) if hits else (len(text), None)
        content = text[at:end].strip()
        if content or role != "system":
            messages.append({"role": role, "content": content})
        if marker is None:
            return messages
        role, at = markers[marker], end + len(marker)


# --------------------------------------------------------------------------------------- the pair dataset


@dataclasses.dataclass
class PairDataset:
    """Tokenized pairs: documents 2i (chosen) and 2i + 1 (rejected) of `docs` are pair i; each ends with eos."""

    docs: SFTDataset
    prompt_tokens: np.ndarray  # int32 [N_pairs]: prompt tokens of each half after truncation
    pairs: list | None = None  # {"prompt", "chosen", "rejected"} per pair

    def __len__(self) -> int:
        return len(self.docs) // 2

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each pair as laid out in a row: chosen + rejected."""
        return self.docs.lengths[0::2] + self.docs.lengths[1::2]

    def response_lengths(self, half: int) -> np.ndarray:
        """Response tokens incl. eos of the chosen (half 0) or rejected (half 1) halves."""
        return self.docs.lengths[half::2] - self.prompt_tokens

    def select(self, indices) -> PairDataset:
        indices = np.asarray(indices, dtype=np.int64)
        docs = self.docs.select(np.stack([2 * indices, 2 * indices + 1], axis=1).reshape(-1))
        pairs = None if self.pairs is None else [self.pairs[i] for i in indices]
        return PairDataset(docs, self.prompt_tokens[indices], pairs)


def assemble_pairs(dataset: PairDataset, rows: list, width: int, pairs_per_row: int) -> dict[str, np.ndarray]:
    """Rows of pair ids -> the batch layout of sft_jax.objectives.preference_losses (Kp = pairs_per_row)."""
    batch = assemble(dataset.docs, [[d for p in row for d in (2 * p, 2 * p + 1)] for row in rows], width)
    pair_mask = np.zeros((len(rows), pairs_per_row), np.float32)
    reward_index = np.zeros((len(rows), 2 * pairs_per_row), np.int32)
    lengths = dataset.docs.lengths
    for r, row in enumerate(rows):
        if len(row) > pairs_per_row:
            raise ValueError(f"row {r} holds {len(row)} pairs > pairs_per_row={pairs_per_row}")
        at = 0
        for j, p in enumerate(row):
            pair_mask[r, j] = 1.0
            for half in (0, 1):
                n = int(lengths[2 * p + half])
                reward_index[r, 2 * j + half] = reward_read_position(at, n)  # the token before the closing eos
                at += n
    batch["pair_mask"], batch["reward_index"] = pair_mask, reward_index
    return batch


def pair_cap(max_length: int, max_segments_per_row: int) -> int:
    """Pairs per packed row such that their 2 segments each stay within data.max_segments_per_row
    (the static segment count of the fused attention paths)."""
    from sft_jax.data.pack import default_max_segments

    return max(1, (max_segments_per_row or default_max_segments(max_length)) // 2)


class PreferenceBatchIterator(BatchIterator):
    """BatchIterator over pairs (same arguments, same determinism and resume); `global_batch_size` counts
    rows. Kp (pairs_per_row) is fixed for the run: the most pairs any row of the packing plan holds."""

    def __init__(self, dataset: PairDataset, **kwargs):
        kwargs["max_segments"] = pair_cap(kwargs["max_length"], kwargs.get("max_segments", 0))
        super().__init__(dataset, **kwargs)
        self.pairs_per_row = max(len(row) for row in self._rows) if self.mode == "packing" else 1

    def _assemble(self, rows: list, width: int) -> dict[str, np.ndarray]:
        return assemble_pairs(self.dataset, rows, width, self.pairs_per_row)


def preference_eval_batches(dataset: PairDataset, *, batch_size: int, max_length: int, mode: str = "packing", **kwargs):
    """One deterministic pass over the pairs in order (see sft_jax.data.iterator.eval_batches)."""
    kwargs["max_segments"] = cap = pair_cap(max_length, kwargs.get("max_segments", 0))
    pairs_per_row = 1
    if mode == "packing":
        pairs_per_row = max(len(r) for r in best_fit_rows(dataset.lengths, max_length, np.arange(len(dataset)), cap))
    layout = lambda ds, rows, width: assemble_pairs(ds, rows, width, pairs_per_row)  # noqa: E731
    return eval_batches(dataset, batch_size=batch_size, max_length=max_length, mode=mode, assemble_rows=layout, **kwargs)


# ----------------------------------------------------------------------------------- building the datasets


def build_preference_datasets(cfg, tokenizer, *, n_positions: int, vocab_size: int, seed: int):
    """Read, validate, render, tokenize and cut preference pairs; returns (train, eval | None, report)."""
    if cfg.max_length > n_positions:
        raise DataError(f"data.max_length={cfg.max_length} exceeds the model's n_positions={n_positions}")
    if len(tokenizer) > vocab_size:
        raise DataError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
                        "token ids would index past the embedding table")
    renderer = Renderer(tokenizer, None if cfg.template is None else chat_template(cfg))
    train = _read_pairs(cfg, cfg.train)
    if cfg.eval is not None:
        eval_split = _read_pairs(cfg, cfg.eval)
    elif cfg.eval_fraction > 0:
        eval_split = _carve(train, cfg.eval_fraction)
        eval_split = eval_split if eval_split.conversations else None
    else:
        eval_split = None
    train_ds, train_report = _encode_pairs(train, cfg, renderer, seed, weighted=True)
    eval_ds, eval_report = (None, None) if eval_split is None else _encode_pairs(eval_split, cfg, renderer, seed,
                                                                                 weighted=False)
    return train_ds, eval_ds, PreferenceReport(train_report, eval_report)


@dataclasses.dataclass
class _Split:
    """Validated pairs of one split, held in memory."""

    conversations: list  # pairs, {"prompt", "chosen", "rejected"}
    source_of: list  # index into the split's sources, per pair
    sources: list  # SourceSpec per source
    read: int  # rows read from the sources (for train: before the eval carve)
    bad: BadRows
    formats: dict = dataclasses.field(default_factory=dict)  # source name -> (format read, data.columns or None)


def _read_pairs(cfg, spec) -> _Split:
    """Every pair of the sources in `spec`; a bad row goes to the split's BadRows, named by its file and line."""
    if cfg.format not in ("auto",) + PREFERENCE_FORMATS:
        raise DataError(f"data.format={cfg.format!r} is not a preference format; use auto or one of "
                        f"{PREFERENCE_FORMATS}")
    split = _Split([], [], parse_sources(spec), 0, BadRows(cfg.on_bad_example))
    for k, source in enumerate(split.sources):
        if source.name in DEMO_SOURCES:
            raise DataError(f"data.train={source.name}: the built-in demo has no preference pairs; give a file of "
                            f"pairs")
        parts = [_held(part, split.bad) for part in open_parts(locate(source.name), split.bad)]
        for part in parts:
            split.read += len(part)
            if not len(part):
                split.bad.bad("empty_file", f"{part.name}: empty file, no examples")
        if not any(map(len, parts)):
            continue
        columns = source_columns(source, cfg)
        fmt = cfg.format
        if fmt == "auto":
            keys = set().union(*(part.columns() for part in parts))
            sample = next((part.sample() for part in parts if part.sample() is not None), None)
            fmt = detect_preference_format(keys, source.name, sample, columns)
        split.formats[source.name] = (fmt, columns)
        names = Names.of(fmt, columns)
        for part in parts:
            for row, where in zip(part.rows, part.wheres):
                if row is None:
                    continue  # a malformed line, counted when read
                try:
                    pair = to_pair(row, fmt, names)
                except FieldError as e:
                    split.bad.bad(e.reason, f"{where}: {e}")
                    continue
                split.conversations.append(pair)
                split.source_of.append(k)
    return split


def _carve(train: _Split, fraction: float) -> _Split:
    """Move pairs whose content hash falls below `fraction` from train into a new eval split."""
    held = [held_out(pair, fraction) for pair in train.conversations]
    eval_split = _Split([], [], train.sources, 0, BadRows(train.bad.mode), dict(train.formats))
    keep_c, keep_s = [], []
    for pair, source, is_held in zip(train.conversations, train.source_of, held):
        if is_held:
            eval_split.conversations.append(pair)
            eval_split.source_of.append(source)
        else:
            keep_c.append(pair)
            keep_s.append(source)
    train.conversations, train.source_of = keep_c, keep_s
    eval_split.read = sum(held)  # train.read stays what was read from the sources
    return eval_split


class _HeldRows(Rows):
    """A part's rows held in memory (pairs are), JSON lines parsed, with each row's name in an error message."""

    def __init__(self, name: str, rows: list, wheres: list):
        super().__init__(name, rows)
        self.wheres = wheres


def _held(part, bad: BadRows) -> _HeldRows:
    rows, wheres = [], []
    for chunk in part.chunks(CHUNK, None, 0.0, None):
        for i, row, error in chunk.parsed():
            if error is not None:
                bad.bad("malformed_json", f"{chunk.where(i)}: {error}")
            rows.append(row)
            wheres.append(chunk.where(i))
    return _HeldRows(part.name, rows, wheres)


def _encode_pairs(split: _Split, cfg, renderer, seed: int, *, weighted: bool):
    from sft_jax.data.formats import encode_documents

    if not split.conversations:
        raise DataError(f"data: no usable pairs in {[s.name for s in split.sources]} ({dict(split.bad.dropped)})")
    conversations = [pair["prompt"] + [{"role": "assistant", "content": pair[half]}]
                     for pair in split.conversations for half in ("chosen", "rejected")]
    docs = encode_documents(conversations, renderer, train_on_prompt=False, last_turn_only=True)
    check_prompt_tokens(conversations, docs, renderer)
    dropped, truncated = Counter(split.bad.dropped), 0
    kept, tokens, supervised, prompts = [], [], [], []
    for i in range(len(split.conversations)):
        halves = []
        for d in (2 * i, 2 * i + 1):  # cut each document after its closing eos (template text there is no target)
            end = max(np.flatnonzero(docs.supervised[d])) + 1
            halves.append((docs.tokens[d][:end], docs.supervised[d][:end], docs.last_response_start[d]))
        (c_ids, c_sup, start), (r_ids, r_sup, r_start) = halves
        if start != r_start or c_ids[:start] != r_ids[:start]:
            raise DataError("template: the prompt of a pair renders to different tokens before its chosen and "
                            "rejected responses; the template must render the prompt independently of the response")
        cut = -(-(len(c_ids) + len(r_ids) - cfg.max_length) // 2)  # from each prompt
        if cut > 0:
            if cfg.truncation == "drop":
                dropped["too_long"] += 1
                continue
            if cut >= start:  # at least one prompt token must stay to predict the first response token
                dropped["response_too_long"] += 1
                continue
            truncated += 1
        cut = max(cut, 0)
        kept.append(i)
        tokens += [c_ids[cut:], r_ids[cut:]]
        supervised += [c_sup[cut:], r_sup[cut:]]
        prompts.append(start - cut)
    if not kept:
        raise DataError(f"data: every pair was dropped ({dict(dropped)}); raise max_length?")
    prompt_tokens = np.asarray(prompts, np.int32)
    responses = [len(t) - p for t, p in zip(tokens, np.repeat(prompt_tokens, 2))]
    dataset = PairDataset(SFTDataset.from_lists(tokens, supervised, responses), prompt_tokens,
                          [split.conversations[i] for i in kept])
    if weighted:
        dataset = dataset.select(_weighted_indices([split.source_of[i] for i in kept], split.sources, seed))
    report = PreferenceSplitReport(
        read=split.read,
        kept=len(kept),
        dropped=dict(sorted(dropped.items())),
        truncated=truncated,
        pairs=len(dataset),
        prompt_lengths=length_stats(dataset.prompt_tokens),
        chosen_lengths=length_stats(dataset.response_lengths(0)),
        rejected_lengths=length_stats(dataset.response_lengths(1)),
        rows=_rows_stat(dataset, cfg, seed),
        example=marked_pair(dataset, renderer.tokenizer),
        errors=list(split.bad.examples),
        formats={name: list(read) for name, read in split.formats.items()},
    )
    return dataset, report


def _rows_stat(dataset: PairDataset, cfg, seed: int) -> dict:
    """Rows per epoch, the most pairs in one row, and the non-padding share of the rows' tokens (buckets: each
    pair padded to its own bucket, a lower bound on the padding of real batches)."""
    lengths = dataset.lengths
    if cfg.batching == "packing":
        rows = packing_rows(lengths, cfg.max_length, seed, cfg.shuffle, pair_cap(cfg.max_length, cfg.max_segments_per_row))
        n, most, total = len(rows), max(len(r) for r in rows), len(rows) * cfg.max_length
    else:
        pads = bucket_lengths(cfg.buckets, cfg.max_length)
        n, most, total = len(dataset), 1, sum(bucket_for(int(length), pads) for length in lengths)
    return {"rows": n, "max_pairs_per_row": most, "efficiency": round(float(lengths.sum()) / total, 4)}


def marked_pair(dataset: PairDataset, tokenizer, i: int = 0) -> str:
    """Pair i decoded: the prompt once, then each response with its targets wrapped in ⟦ ⟧."""
    if not len(dataset):
        return ""
    out = []
    for half, name in ((0, "chosen"), (1, "rejected")):
        tokens, _ = dataset.docs.doc(2 * i + half)
        start = int(dataset.prompt_tokens[i])
        if half == 0:
            out.append(decode(tokenizer, tokens[:start]))
        out.append(f"[{name}] {OPEN}{decode(tokenizer, tokens[start:])}{CLOSE}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- report


@dataclasses.dataclass
class PreferenceSplitReport:
    read: int  # rows read from the sources
    kept: int  # pairs kept, before source weights
    dropped: dict[str, int]  # reason -> pairs dropped (bad rows in skip mode, too_long, response_too_long)
    truncated: int  # kept pairs whose prompts were cut from the left
    pairs: int  # pairs per epoch, after source weights
    prompt_lengths: dict[str, float]  # prompt tokens per half after truncation (mean, p50, p95, max)
    chosen_lengths: dict[str, float]  # chosen response tokens incl. eos
    rejected_lengths: dict[str, float]  # rejected response tokens incl. eos
    rows: dict  # rows per epoch, most pairs in one row, non-padding share of the rows' tokens
    example: str  # first pair decoded, targets wrapped in ⟦ ⟧
    errors: list[str]  # first messages of dropped bad rows
    formats: dict = dataclasses.field(default_factory=dict)  # source -> [format read, data.columns applied or None]


@dataclasses.dataclass
class PreferenceReport:
    train: PreferenceSplitReport
    eval: PreferenceSplitReport | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def to_markdown(self) -> str:
        """The preference section of the data report."""
        lines = ["# Preference pairs", ""]
        for name, split in (("train", self.train), ("eval", self.eval)):
            if split is None:
                continue
            dropped = ", ".join(f"{k}: {v}" for k, v in split.dropped.items()) or "none"
            lines += [f"## {name}", "", "| | |", "|---|---|",
                      f"| pairs read | {split.read} |",
                      *([f"| format | {formats_cell(split.formats)} |"] if split.formats else []),
                      f"| kept | {split.kept} |",
                      f"| dropped | {sum(split.dropped.values())} ({dropped}) |",
                      f"| truncated (prompts cut) | {split.truncated} |", f"| pairs per epoch | {split.pairs} |",
                      f"| rows per epoch | {split.rows['rows']} (at most {split.rows['max_pairs_per_row']} pairs "
                      f"a row, {split.rows['efficiency']:.1%} non-padding) |",
                      "", "| tokens | mean | p50 | p95 | max |", "|---|---|---|---|---|"]
            for label, s in (("prompt", split.prompt_lengths), ("chosen", split.chosen_lengths),
                             ("rejected", split.rejected_lengths)):
                lines.append(f"| {label} | {s['mean']} | {s['p50']} | {s['p95']} | {s['max']} |")
            if split.errors:
                lines += ["", "First dropped rows:", ""] + [f"- {e}" for e in split.errors]
            lines += ["", f"Example (targets in {OPEN} {CLOSE}):", "", "```", split.example, "```", ""]
        return "\n".join(lines)
