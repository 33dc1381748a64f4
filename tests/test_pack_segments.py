"""data.max_segments_per_row: the packer never puts more documents in a row than the cap,
and without the cap it packs exactly as before (best fit by room alone)."""

import numpy as np
import pytest

from sft_jax.data.config import DataConfig, DataError
from sft_jax.data.pack import best_fit_rows, default_max_segments, packing_rows


def test_rows_never_exceed_the_segment_cap():
    lengths = np.random.default_rng(0).integers(1, 40, size=2000)
    for cap in (1, 3, 8):
        rows = packing_rows(lengths, 256, seed=0, shuffle=True, max_segments=cap)
        assert max(map(len, rows)) == cap
        assert sorted(d for r in rows for d in r) == list(range(len(lengths)))  # every document once
        assert all(lengths[r].sum() <= 256 for r in rows)
    # the default cap is capacity // 16: 16 for rows of 256, here binding on short documents
    rows = packing_rows(np.full(100, 4), 256, seed=0, shuffle=False)
    assert default_max_segments(256) == 16 and max(map(len, rows)) == 16


def test_a_loose_cap_packs_like_best_fit_by_room():
    lengths = np.random.default_rng(1).integers(30, 600, size=500)
    order = np.random.default_rng(2).permutation(500)
    loose = best_fit_rows(lengths, 1024, order, max_segments=1024)
    assert best_fit_rows(lengths, 1024, order) == loose  # the default 64 does not bind at these lengths
    assert max(map(len, loose)) < 64


def test_negative_cap_is_a_config_error():
    with pytest.raises(DataError, match="data.max_segments_per_row"):
        DataConfig(max_segments_per_row=-1)
