"""Tokenized documents, and how they are laid out in rows: packing plans, bucket plans, row assembly.

Packing plan (computed once per seed, from the lengths only): documents are shuffled with the seed and
placed one by one by online best fit: each goes into the open row with the least room that still holds it,
or opens a new row. The set of rows is then fixed for the whole run; each epoch visits the rows in a new
seeded order. Fixing the rows keeps rows-per-epoch constant, which is what lets the iterator map a global
step to (epoch, rows) in O(1).

Bucket plan (per epoch): documents are shuffled with (seed, epoch), cut into chunks of 64 batches, each chunk
sorted by length and cut into batches (so a batch holds similar lengths), and the batches are shuffled. A
batch is padded to the smallest bucket length that holds its longest document. The number of batches,
ceil(n_docs / batch_size), is the same every epoch.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

CHUNK_BATCHES = 64  # buckets: batches per length-sorted chunk; larger = less padding, less randomness
FILLER = 0  # token/target id at padding positions; never read, because weight and segment id are 0 there


@dataclasses.dataclass
class SFTDataset:
    """Tokenized documents stored flat: document i is tokens[offsets[i]:offsets[i + 1]]."""

    tokens: np.ndarray  # int32 [N_tok]
    supervised: np.ndarray  # bool [N_tok]: the token is a training target (response token or closing eos)
    offsets: np.ndarray  # int64 [N_docs + 1]
    response_tokens: np.ndarray  # int32 [N_docs]: tokens inside response pieces (L_A), for the report
    examples: list | None = None  # chat messages per document (e.g. for generation-based evaluation)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_lists(cls, tokens: list, supervised: list, response_tokens, examples=None) -> SFTDataset:
        """From per-document lists of token ids and supervised flags."""
        lengths = np.fromiter((len(t) for t in tokens), np.int64, len(tokens))
        offsets = np.zeros(len(tokens) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = lambda lists, dtype: np.fromiter((x for l in lists for x in l), dtype, int(offsets[-1]))  # noqa: E731
        return cls(flat(tokens, np.int32), flat(supervised, np.bool_), offsets,
                   np.asarray(response_tokens, np.int32), examples)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, supervised) of document i."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.tokens[lo:hi], self.supervised[lo:hi]

    def select(self, indices, examples: bool = True) -> SFTDataset:
        """A dataset of the documents at `indices` (repeats allowed), in that order (without examples: none)."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # flat source index of every output token: start of its document + position within it
        starts = np.repeat(self.offsets[:-1][indices] - offsets[:-1], lengths)
        flat = starts + np.arange(offsets[-1], dtype=np.int64)
        chosen = None if self.examples is None or not examples else [self.examples[i] for i in indices]
        return SFTDataset(self.tokens[flat], self.supervised[flat], offsets, self.response_tokens[indices], chosen)


def default_max_segments(capacity: int) -> int:
    """data.max_segments_per_row when unset (0): one document per 16 tokens of row, at least 1.
    The fused packed attention (model.attention=cudnn_packed) makes the same default."""
    return max(1, capacity // 16)


def best_fit_rows(lengths: np.ndarray, capacity: int, order: np.ndarray, max_segments: int = 0) -> list[list[int]]:
    """Pack documents, taken in `order`, into rows of `capacity` tokens by online best fit; a row
    holds at most `max_segments` documents (0: ``default_max_segments(capacity)``)."""
    cap = max_segments or default_max_segments(capacity)
    smallest = int(lengths.min()) if len(lengths) else 1
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, row id) of rows that can still take a document
    for doc in order.tolist():
        need = int(lengths[doc])
        i = bisect.bisect_left(room, (need, -1))
        if i == len(room):
            rows.append([doc])
            free, row = capacity - need, len(rows) - 1
        else:
            free, row = room.pop(i)
            rows[row].append(doc)
            free -= need
        if free >= smallest and len(rows[row]) < cap:  # full rows (room or segments) are closed for good
            bisect.insort(room, (free, row))
    return rows


def packing_rows(lengths: np.ndarray, capacity: int, seed: int, shuffle: bool, max_segments: int = 0) -> list[list[int]]:
    """The run's fixed packing plan (see module docstring)."""
    order = np.random.default_rng([seed, 7]).permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    return best_fit_rows(lengths, capacity, order, max_segments)


def bucket_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, shuffle: bool) -> list[np.ndarray]:
    """Epoch `epoch`'s batches of document ids for bucketed batching (see module docstring)."""
    n = len(lengths)
    if not shuffle:
        return [np.arange(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    rng = np.random.default_rng([seed, 11, epoch])
    order = rng.permutation(n)
    batches = []
    chunk = batch_size * CHUNK_BATCHES
    for lo in range(0, n, chunk):
        part = order[lo : lo + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def bucket_lengths(buckets, max_length: int) -> tuple[int, ...]:
    """The pad lengths in use: configured buckets below max_length, then max_length itself."""
    return tuple(sorted({b for b in buckets if b < max_length} | {max_length}))


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket that holds `length` tokens."""
    return buckets[bisect.bisect_left(buckets, length)]


def assemble(dataset: SFTDataset, rows: list, width: int) -> dict[str, np.ndarray]:
    """Lay out rows (each a list of document ids, [] for an all-padding row) as a batch [len(rows), width]."""
    shape = (len(rows), width)
    batch = {
        "tokens": np.full(shape, FILLER, np.int32),
        "targets": np.full(shape, FILLER, np.int32),
        "weights": np.zeros(shape, np.float32),
        "positions": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
    }
    for r, docs in enumerate(rows):
        at = 0
        for segment, doc in enumerate(docs, start=1):
            tokens, supervised = dataset.doc(doc)
            n = len(tokens)
            if at + n > width:
                raise ValueError(f"document {doc} of {n} tokens does not fit row {r} at {at} (width {width})")
            batch["tokens"][r, at : at + n] = tokens
            # position t predicts token t+1 of the same document; the last position predicts nothing
            batch["targets"][r, at : at + n - 1] = tokens[1:]
            batch["weights"][r, at : at + n - 1] = supervised[1:]
            batch["positions"][r, at : at + n] = np.arange(n)
            batch["segment_ids"][r, at : at + n] = segment
            at += n
    return batch
