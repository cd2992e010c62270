"""The predictor's replica rows: fp32, fp16 or int8 storage, always float32 lookups."""

from __future__ import annotations

import numpy as np
import pytest

from freshet.replica import RowMap


@pytest.mark.parametrize(
    ("dtype", "bound", "bytes_per_value"), [("fp32", 0.0, 4), ("fp16", 1e-3, 2), ("int8", 0.5 / 127, 1)]
)
def test_rows_round_trip_within_the_storage_precision(dtype: str, bound: float, bytes_per_value: int):
    rng = np.random.default_rng(2)
    rows = RowMap(9, dtype)
    fids = rng.choice(1 << 40, 3000, replace=False).astype(np.int64)
    values = rng.normal(scale=0.3, size=(3000, 9)).astype(np.float32)
    rows.put(fids, values)
    got = rows.lookup(np.concatenate([fids[:50], np.array([7], np.int64)]))
    assert got.dtype == np.float32
    row_max = np.abs(values[:50]).max(axis=1, keepdims=True)
    assert np.all(np.abs(got[:50] - values[:50]) <= bound * row_max + 1e-7)
    np.testing.assert_array_equal(got[50], 0.0)  # unknown fid: the default embedding
    assert rows._slab.itemsize == bytes_per_value


def test_int8_rows_take_a_quarter_of_the_fp32_slab_plus_their_scales():
    fids, values = np.arange(4096, dtype=np.int64), np.ones((4096, 16), np.float32)
    fp32, int8 = RowMap(16, "fp32"), RowMap(16, "int8")
    fp32.put(fids, values)
    int8.put(fids, values)
    index = 100 * 4096  # the dict index is the same for both
    assert int8.nbytes() - index == pytest.approx((16 + 4) / 64 * (fp32.nbytes() - index))


def test_an_unknown_replica_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="replica dtype must be one of"):
        RowMap(4, "bf16")
