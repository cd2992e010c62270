"""The replica's rows: a vectorised fid index matching a dict, fp32/fp16/int8 storage, bit-exact export."""

from __future__ import annotations

import numpy as np
import pytest

from freshet.delta import Delta
from freshet.models import ModelConfig
from freshet.replica import Replica, RowMap, SortedIndex


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
    index = 16 * 4096  # the sorted index is the same for both
    assert int8.nbytes() - index == pytest.approx((16 + 4) / 64 * (fp32.nbytes() - index))


def test_an_unknown_replica_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="replica dtype must be one of"):
        RowMap(4, "bf16")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lookups_match_a_dict_under_random_puts_with_repeats_and_merges(seed: int):
    rng = np.random.default_rng(seed)
    rows = RowMap(3)
    rows._index.min_pending = 64  # merge often: the main/pending split is what is under test
    reference: dict[int, np.ndarray] = {}
    universe = rng.integers(-(1 << 62), 1 << 62, 5000, dtype=np.int64)
    for step in range(200):
        n = int(rng.integers(0, 300))
        fids = rng.choice(universe[: 500 + 25 * step], n)  # repeats within and across puts
        values = rng.normal(size=(n, 3)).astype(np.float32)
        rows.put(fids, values)
        for fid, row in zip(fids.tolist(), values, strict=True):
            reference[fid] = row  # a repeated fid within a put keeps its last row, as in a dict
        probe = rng.choice(universe, 400)
        expected = np.stack([reference.get(f, np.zeros(3, np.float32)) for f in probe.tolist()])
        np.testing.assert_array_equal(rows.lookup(probe), expected)
        assert len(rows) == len(reference)
    fids, values = rows.export()
    assert fids.tolist() == sorted(reference)
    np.testing.assert_array_equal(values, np.stack([reference[f] for f in fids.tolist()]))


def test_the_index_merges_pending_keys_once_they_outgrow_an_eighth_of_the_main_array():
    index = SortedIndex(min_pending=10)
    index.insert(np.arange(0, 100, 2, dtype=np.int64), np.arange(50, dtype=np.int64))
    assert len(index._pkeys) == 0 and len(index._keys) == 50  # 50 > 10: merged at once
    index.insert(np.array([5, 3], np.int64), np.array([50, 51], np.int64))
    assert index._pkeys.tolist() == [3, 5]
    np.testing.assert_array_equal(index.find(np.array([3, 4, 5, 6, 7], np.int64)), [51, 2, 50, 3, -1])


def _replica(dtype: str = "fp32") -> Replica:
    return Replica(ModelConfig(), dtype)


def _delta(fids: np.ndarray, values: np.ndarray, sequence: int = 1) -> Delta:
    return Delta("fm", "fm", 0, sequence, 0, sequence, fids, values)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_equal_rows_is_bit_exact_after_the_storage_rounding(dtype: str):
    rng = np.random.default_rng(5)
    replica = _replica(dtype)
    fids = rng.choice(1 << 40, 100, replace=False).astype(np.int64)
    values = rng.normal(scale=0.3, size=(100, 9)).astype(np.float32)
    replica.apply(_delta(fids, values))
    assert replica.equal_rows("fm", fids[::-1], values[::-1])
    nudged = values.copy()
    nudged[17, 3] = np.nextafter(nudged[17, 3], np.float32(1)) if dtype == "fp32" else nudged[17, 3] + 0.1
    assert not replica.equal_rows("fm", fids, nudged)
    assert not replica.equal_rows("fm", fids[1:], values[1:])  # a row the replica holds in excess


def test_a_delta_of_the_wrong_width_changes_nothing():
    replica = _replica()
    replica.apply(_delta(np.array([1], np.int64), np.ones((1, 9), np.float32)))
    with pytest.raises(ValueError, match="floats"):
        replica.apply(_delta(np.array([2], np.int64), np.ones((1, 4), np.float32), sequence=2))
    assert len(replica) == 1 and replica.shard_sequences == {0: 1}
