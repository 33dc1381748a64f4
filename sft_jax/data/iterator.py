"""Deterministic, resumable, multi-host batch iterator with background prefetch.

Global batch `step` is a pure function of (dataset, seed, mode, sizes, step); the iterator's whole state is
the step (the epoch is derived from it) and, with packing, the rows consumed before it. Each process builds only rows
[process_index * B / P, (process_index + 1) * B / P) of the global batch of B rows, so concatenating the
slices of all P processes gives the same global batch for any P.

Epochs. packing: the fixed rows form one endless stream, epoch e visiting all rows in a seeded order; global
row r is row (r mod R) of epoch r // R, so a batch may end one epoch and start the next and no row is ever
dropped. The position in that stream is kept in rows consumed, so a run resumed with another global batch
size continues from the next unseen row (batch `step` then starts at row rows + (step - resume step) * B). buckets: the unit is a whole batch (its pad length depends on all its rows); epoch e is batches
[e * S, (e + 1) * S) of the stream, S = ceil(n_docs / B), and the one short batch per epoch is filled with
padding rows. With loop=False the iterator stops after one epoch, padding the last batch with empty rows.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator

import numpy as np

from sft_jax.data.config import DataError
from sft_jax.data.pack import (
    SFTDataset,
    assemble,
    bucket_batches,
    bucket_for,
    bucket_lengths,
    best_fit_rows,
    packing_rows,
)

MODES = ("packing", "buckets")


class BatchSizeChangedError(DataError):
    """Resuming bucket batching with another global batch size (its plan is made of whole batches)."""

    def __init__(self, saved: int, now: int, step: int):
        self.saved, self.now, self.step = saved, now, step
        super().__init__(
            f"the checkpoint at step {step} was trained with global_batch_size={saved}, this run asks for {now}; "
            f"data.batching=buckets plans whole batches, so its position cannot carry over to another batch size: "
            f"resume with train.global_batch_size={saved}, or use data.batching=packing, which resumes from the "
            f"next unseen row at any batch size")


class BatchIterator:
    """Yields this process's slice of global batch `step`, then `step + 1`, ...; see module docstring."""

    def __init__(
        self,
        dataset: SFTDataset,
        *,
        global_batch_size: int,
        seed: int,
        mode: str = "packing",
        max_length: int,
        buckets=(128, 256, 512, 1024),
        process_index: int = 0,
        process_count: int = 1,
        step: int = 0,
        shuffle: bool = True,
        loop: bool = True,
        prefetch: int = 2,
        max_segments: int = 0,  # data.max_segments_per_row (0: max_length // 16)
    ):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {MODES}")
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by {process_count} processes")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} outside [0, {process_count})")
        if len(dataset) == 0:
            raise ValueError("empty dataset: no documents to batch")
        longest = int(dataset.lengths.max())
        if longest > max_length:
            raise ValueError(f"a document has {longest} tokens > max_length={max_length}")
        self.dataset, self.mode, self.seed, self.shuffle, self.loop = dataset, mode, seed, shuffle, loop
        self.global_batch_size, self.max_length = global_batch_size, max_length
        self.buckets = bucket_lengths(buckets, max_length)
        per_process = global_batch_size // process_count
        self._slice = slice(process_index * per_process, (process_index + 1) * per_process)
        self._rows = packing_rows(dataset.lengths, max_length, seed, shuffle, max_segments) if mode == "packing" else None
        self._plans: dict[int, object] = {}  # epoch -> row order (packing) or batches (buckets); last two kept
        self._lock = threading.Lock()
        self.step = step
        self._origin = (0, 0)  # (step, rows consumed before it): batch s starts at row rows + (s - step) * B
        self.batch_size_changes: list[list[int]] = []  # [step, old, new] for each resume at another batch size
        self.prefetch = prefetch
        self._worker: _Prefetcher | None = None

    # ---- sizes

    @property
    def rows_per_epoch(self) -> int:
        """Rows in one epoch: packed rows, or documents (one per row) for buckets."""
        return len(self._rows) if self.mode == "packing" else len(self.dataset)

    @property
    def steps_per_epoch(self) -> int:
        """Steps that cover one epoch: ceil(rows_per_epoch / global_batch_size)."""
        return math.ceil(self.rows_per_epoch / self.global_batch_size)

    def first_row(self, step: int) -> int:
        """Packing: index in the row stream of the first row of global batch `step`."""
        origin_step, origin_rows = self._origin
        return origin_rows + (step - origin_step) * self.global_batch_size

    def epoch_of(self, step: int) -> int:
        """Epoch of the first row of global batch `step`."""
        if self.mode == "packing":
            return self.first_row(step) // self.rows_per_epoch
        return step // self.steps_per_epoch

    # ---- pure function of the step

    def _plan(self, epoch: int):
        with self._lock:  # the prefetch thread and a direct batch_at call may share the cache
            if epoch in self._plans:
                return self._plans[epoch]
            if len(self._plans) >= 2:
                self._plans.pop(min(self._plans))
            if self.mode == "packing":
                rng = np.random.default_rng([self.seed, 13, epoch])
                plan = rng.permutation(len(self._rows)) if self.shuffle else np.arange(len(self._rows))
            else:
                plan = bucket_batches(self.dataset.lengths, self.global_batch_size, self.seed, epoch, self.shuffle)
            self._plans[epoch] = plan
            return plan

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch `step`: arrays [global_batch_size / process_count, T]."""
        if self.mode == "packing":
            rows = []
            first = self.first_row(step)
            for r in range(first, first + self.global_batch_size)[self._slice]:
                epoch, k = divmod(r, self.rows_per_epoch)
                end = not self.loop and epoch > 0  # past the single epoch: padding rows
                rows.append([] if end else self._rows[self._plan(epoch)[k]])
            return self._assemble(rows, self.max_length)
        epoch, k = divmod(step, self.steps_per_epoch)
        docs = [] if not self.loop and epoch > 0 else self._plan(epoch)[k].tolist()
        width = bucket_for(max((int(self.dataset.lengths[d]) for d in docs), default=1), self.buckets)
        docs += [None] * (self.global_batch_size - len(docs))  # padding rows of the short batch
        return self._assemble([[] if d is None else [d] for d in docs[self._slice]], width)

    def _assemble(self, rows: list, width: int) -> dict[str, np.ndarray]:
        """Lay out rows of document ids; a subclass with other units (preference pairs) overrides this."""
        return assemble(self.dataset, rows, width)

    # ---- iteration, state

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if not self.loop and self.epoch_of(self.step) > 0:
            raise StopIteration
        if self.prefetch == 0:
            batch = self.batch_at(self.step)
        else:
            if self._worker is None or self._worker.next_step != self.step:
                self.close()
                self._worker = _Prefetcher(self.batch_at, self.step, self.prefetch)
            batch = self._worker.get()
        self.step += 1
        return batch

    def state(self) -> dict:
        """JSON-serialisable state; `restore` of it resumes with exactly the batches that would follow."""
        state = {"epoch": self.epoch_of(self.step), "step": self.step, "global_batch_size": self.global_batch_size,
                 "batch_size_changes": [list(c) for c in self.batch_size_changes]}
        if self.mode == "packing":
            state["rows"] = self.first_row(self.step)
        return state

    def restore(self, state: dict) -> None:
        """Continue after `state`. With packing, a state saved at another global batch size continues
        from its next unseen row; with buckets (a batch is the unit of the plan) that raises
        BatchSizeChangedError."""
        step = int(state["step"])
        saved_batch = int(state.get("global_batch_size", self.global_batch_size))
        if self.mode == "buckets" and saved_batch != self.global_batch_size:
            raise BatchSizeChangedError(saved_batch, self.global_batch_size, step)
        rows = int(state.get("rows", step * saved_batch))
        self.batch_size_changes = [list(c) for c in state.get("batch_size_changes", [])]
        if saved_batch != self.global_batch_size:
            self.batch_size_changes.append([step, saved_batch, self.global_batch_size])
        self.close()
        self.step = step
        self._origin = (step, rows) if self.mode == "packing" else (0, 0)
        if "epoch" in state and int(state["epoch"]) != self.epoch_of(step):
            raise ValueError(f"state {state} is inconsistent: step {step} is in epoch {self.epoch_of(step)}")

    def close(self) -> None:
        """Stop the prefetch thread (it is restarted by the next `next`)."""
        if getattr(self, "_worker", None) is not None:  # __del__ may run on a half-built iterator
            self._worker.stop()
            self._worker = None

    def __del__(self):
        self.close()


class _Prefetcher:
    """Computes make(step), make(step + 1), ... in a daemon thread, at most `depth` ahead."""

    def __init__(self, make, step: int, depth: int):
        self.next_step = step
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, step), daemon=True)
        self._thread.start()

    def _run(self, make, step: int) -> None:
        while not self._stopped.is_set():
            try:
                item = (make(step), None)
            except BaseException as e:  # handed to the consumer, which re-raises it
                item = (None, e)
            while not self._stopped.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is not None:
                return
            step += 1

    def get(self) -> dict[str, np.ndarray]:
        batch, error = self._queue.get()
        if error is not None:
            raise error
        self.next_step += 1
        return batch

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def eval_batches(
    dataset: SFTDataset,
    *,
    batch_size: int,
    max_length: int,
    mode: str = "packing",
    buckets=(128, 256, 512, 1024),
    process_index: int = 0,
    process_count: int = 1,
    max_segments: int = 0,
    assemble_rows=assemble,
) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over `dataset` in order; the last batch is filled with weight-0 padding rows.
    `assemble_rows(dataset, rows, width)` lays out a batch (preference pairs pass their own)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes")
    per_process = batch_size // process_count
    rows = (
        best_fit_rows(dataset.lengths, max_length, np.arange(len(dataset)), max_segments)
        if mode == "packing"
        else [[d] for d in range(len(dataset))]
    )
    lengths, pads = dataset.lengths, bucket_lengths(buckets, max_length)
    for lo in range(0, len(rows), batch_size):
        batch = rows[lo : lo + batch_size]
        width = max_length if mode == "packing" else bucket_for(max(int(lengths[r[0]]) for r in batch), pads)
        batch += [[]] * (batch_size - len(batch))
        yield assemble_rows(dataset, batch[process_index * per_process : (process_index + 1) * per_process], width)
