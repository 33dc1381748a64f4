"""Packing, buckets, resumption, multi-host slicing and prefetch of the batch iterator."""

from __future__ import annotations

import numpy as np
import pytest

from sft_jax.data import BatchIterator, SFTDataset, eval_batches
from sft_jax.models.layers.attention import attention_mask

T = 64
KEYS = ("tokens", "targets", "weights", "positions", "segment_ids")


def synthetic_dataset(n: int = 300, seed: int = 0) -> SFTDataset:
    """Documents of 2..T tokens; each token encodes (doc, position) so the tests can trace it back."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, T + 1, size=n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    doc_of = np.repeat(np.arange(n), lengths)
    pos = np.arange(offsets[-1]) - offsets[doc_of]
    tokens = (doc_of * 1000 + pos).astype(np.int32)
    prompt = np.maximum(1, lengths // 2)[doc_of]
    supervised = pos >= prompt  # second half of each document is the "response"
    return SFTDataset(tokens, supervised, offsets, (lengths - np.maximum(1, lengths // 2)).astype(np.int32))


def check_rows(ds: SFTDataset, batch: dict) -> None:
    """Every row holds whole documents with correct targets, weights, positions and an isolating mask."""
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    rows, width = tokens.shape
    mask = np.asarray(attention_mask(seg, seg))[:, 0]  # (rows, T, S): the mask the model builds from the batch
    for r in range(rows):
        for s in np.unique(seg[r]):
            where = np.flatnonzero(seg[r] == s)
            if s == 0:
                assert not batch["weights"][r, where].any()
                continue
            assert (np.diff(where) == 1).all(), "a document is contiguous"
            np.testing.assert_array_equal(pos[r, where], np.arange(len(where)))
            doc = int(tokens[r, where[0]]) // 1000
            doc_tokens, supervised = ds.doc(doc)
            np.testing.assert_array_equal(tokens[r, where], doc_tokens)
            np.testing.assert_array_equal(batch["targets"][r, where[:-1]], doc_tokens[1:])
            np.testing.assert_array_equal(batch["weights"][r, where], np.append(supervised[1:], False))
            # no position may attend outside its document: the mask row is exactly this document's prefix
            for t in where:
                assert set(np.flatnonzero(mask[r, t])) == set(where[where <= t])


@pytest.mark.parametrize("mode", ["packing", "buckets"])
def test_rows_hold_whole_isolated_documents(mode):
    ds = synthetic_dataset()
    it = BatchIterator(ds, global_batch_size=8, seed=1, mode=mode, max_length=T, buckets=(16, 32), prefetch=0)
    rows = []
    for step in range(it.steps_per_epoch):
        batch = it.batch_at(step)
        assert batch["tokens"].shape[1] in ((T,) if mode == "packing" else (16, 32, T))
        check_rows(ds, batch)
        starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
        rows += [sorted(int(t) // 1000 for t in row[start]) for row, start in zip(batch["tokens"], starts)]
    # the first epoch's rows hold every document exactly once (a packed batch may run into the next epoch)
    epoch_rows = rows[: it.rows_per_epoch] if mode == "packing" else rows  # buckets: one padded batch per epoch
    seen = sorted(d for row in epoch_rows for d in row)
    assert seen == list(range(len(ds)))


@pytest.mark.parametrize("mode", ["packing", "buckets"])
def test_resume_gives_the_uninterrupted_batches(mode):
    ds = synthetic_dataset()
    kw = dict(global_batch_size=8, seed=3, mode=mode, max_length=T, buckets=(16, 32))
    full = BatchIterator(ds, **kw)
    reference = [next(full) for _ in range(60)]  # crosses several epochs
    full.close()
    for k in (0, 17, 40):
        resumed = BatchIterator(ds, **kw)
        built = []  # steps the resumed iterator materialises: none before k (O(1) resume, no replay)
        make = resumed.batch_at
        resumed.batch_at = lambda step: built.append(step) or make(step)
        resumed.restore({"epoch": resumed.epoch_of(k), "step": k})
        for expected in reference[k : k + 20]:
            got = next(resumed)
            for key in KEYS:
                np.testing.assert_array_equal(got[key], expected[key])
        assert {"epoch": resumed.epoch_of(k + 20), "step": k + 20}.items() <= resumed.state().items()
        resumed.close()
        assert min(built) == k


@pytest.mark.parametrize("mode", ["packing", "buckets"])
def test_global_batch_is_the_same_for_1_2_4_processes(mode):
    ds = synthetic_dataset()
    for step in (0, 5, 33):
        batches = {}
        for count in (1, 2, 4):
            parts = [
                BatchIterator(ds, global_batch_size=8, seed=2, mode=mode, max_length=T, buckets=(16, 32),
                              process_index=i, process_count=count, prefetch=0).batch_at(step)
                for i in range(count)
            ]
            assert all(p["tokens"].shape[0] == 8 // count for p in parts)
            batches[count] = {key: np.concatenate([p[key] for p in parts]) for key in KEYS}
        for count in (2, 4):
            for key in KEYS:
                np.testing.assert_array_equal(batches[count][key], batches[1][key])


def test_epochs_reshuffle_and_seed_determines_everything():
    ds = synthetic_dataset()
    a = BatchIterator(ds, global_batch_size=4, seed=0, mode="packing", max_length=T, prefetch=0)
    b = BatchIterator(ds, global_batch_size=4, seed=0, mode="packing", max_length=T, prefetch=0)
    c = BatchIterator(ds, global_batch_size=4, seed=1, mode="packing", max_length=T, prefetch=0)
    np.testing.assert_array_equal(a.batch_at(3)["tokens"], b.batch_at(3)["tokens"])
    assert not np.array_equal(a.batch_at(3)["tokens"], c.batch_at(3)["tokens"])
    rows = a.rows_per_epoch
    first = np.concatenate([a.batch_at(s)["tokens"] for s in range(rows // 4)])
    second = np.concatenate([a.batch_at(s)["tokens"] for s in range(rows, rows + rows // 4)])
    assert not np.array_equal(first, second)  # epoch 1 visits rows in another order


def test_no_loop_stops_after_one_epoch_and_pads():
    ds = synthetic_dataset(50)
    it = BatchIterator(ds, global_batch_size=16, seed=0, mode="buckets", max_length=T, loop=False)
    batches = list(it)
    assert len(batches) == it.steps_per_epoch == 4
    assert sum(int((b["segment_ids"][:, 0] > 0).sum()) for b in batches) == 50


def test_prefetch_error_is_raised_not_swallowed():
    ds = synthetic_dataset(20)
    it = BatchIterator(ds, global_batch_size=4, seed=0, mode="packing", max_length=T, prefetch=2)

    def boom(step):
        raise RuntimeError(f"bad step {step}")

    it.batch_at = boom
    with pytest.raises(RuntimeError, match="bad step 0"):
        next(it)
    it.close()


@pytest.mark.parametrize("mode", ["packing", "buckets"])
def test_eval_batches_cover_every_document_once(mode):
    ds = synthetic_dataset(45)
    batches = list(eval_batches(ds, batch_size=8, max_length=T, mode=mode, buckets=(16, 32)))
    assert all(b["tokens"].shape[0] == 8 for b in batches)
    total = sum(float(b["weights"].sum()) for b in batches)
    assert total == sum(int(ds.doc(i)[1][1:].sum()) for i in range(len(ds)))
    for b in batches:
        check_rows(ds, b)
    assert sum(int(((b["positions"] == 0) & (b["segment_ids"] > 0)).sum()) for b in batches) == 45


def test_too_long_document_is_rejected():
    with pytest.raises(ValueError, match="max_length"):
        BatchIterator(synthetic_dataset(), global_batch_size=4, seed=0, max_length=T // 2)


def test_packing_resume_at_another_batch_size_continues_from_the_next_unseen_row():
    """4 rows a step for 7 steps, then 6 rows a step: the rows are the 4-row stream's, in order,
    with none skipped or repeated, across an epoch boundary."""
    ds = synthetic_dataset()
    kw = dict(seed=3, mode="packing", max_length=T)
    small = BatchIterator(ds, global_batch_size=4, **kw)
    stream = np.concatenate([next(small)["tokens"] for _ in range(60)])  # the row stream, 240 rows
    small.restore({"step": 0})
    before = [next(small) for _ in range(7)]
    state = small.state()
    assert state["rows"] == 28 and state["global_batch_size"] == 4
    big = BatchIterator(ds, global_batch_size=6, **kw)
    big.restore(state)
    after = [next(big) for _ in range(30)]  # rows 28..207: crosses the first epoch's end
    assert big.rows_per_epoch < 208
    got = np.concatenate([b["tokens"] for b in before + after])
    np.testing.assert_array_equal(got, stream[:len(got)])
    assert big.state()["rows"] == 28 + 30 * 6
    assert big.batch_size_changes == [[7, 4, 6]]
    resumed = BatchIterator(ds, global_batch_size=6, **kw)  # a second resume keeps the history and position
    resumed.restore(big.state())
    np.testing.assert_array_equal(next(resumed)["tokens"], stream[208:214])
    assert resumed.batch_size_changes == [[7, 4, 6]]


def test_buckets_refuse_another_batch_size():
    from sft_jax.data import DataError

    ds = synthetic_dataset()
    kw = dict(seed=3, mode="buckets", max_length=T, buckets=(16, 32))
    it = BatchIterator(ds, global_batch_size=4, **kw)
    next(it)
    with pytest.raises(DataError, match=r"step 1 .*global_batch_size=4.*asks for 8.*resume with train.global_batch_size=4"):
        BatchIterator(ds, global_batch_size=8, **kw).restore(it.state())
