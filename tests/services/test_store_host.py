"""The host tier's numba index: exact lookups at scale and under collisions, row reuse, tombstones, headers."""

from __future__ import annotations

import functools

import numpy as np

from services.store.host import HostTier

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


def _mix(fids: np.ndarray) -> np.ndarray:
    """numpy copy of ``host._mix`` (murmur3's finaliser), to pick fids that start probing in the same slot."""
    x = fids.astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> _S33)
        x = x * _M1
        x = x ^ (x >> _S33)
        x = x * _M2
        x = x ^ (x >> _S33)
    return x


def _distinct(values: np.ndarray) -> np.ndarray:
    """``np.unique`` by one sort: numpy 2.4's ``np.unique`` takes ~10x as long on 10 M int64 values."""
    s = np.sort(values)
    return s[np.concatenate([[True], s[1:] != s[:-1]])]


@functools.cache
def _collider_pool(bits: int, seed: int) -> np.ndarray:
    """Distinct fids whose hashes are 0 in the low ``bits`` bits: one probe chain in any index up to 2**bits."""
    rng = np.random.default_rng(seed)
    mask = np.uint64((1 << bits) - 1)
    found = []
    for _ in range(4):
        candidates = rng.integers(0, 2**62, 1 << 22, dtype=np.int64)
        found.append(candidates[(_mix(candidates) & mask) == np.uint64(0)])
    return _distinct(np.concatenate(found))


def _colliding_fids(n: int, bits: int = 12, seed: int = 1) -> np.ndarray:
    pool = _collider_pool(bits, seed)
    assert len(pool) >= n
    return pool[:n]


def test_mix_copy_agrees_with_the_compiled_hash():
    from services.store.host import _mix as compiled_mix

    fids = np.array([0, 1, -1, 2**62, -(2**63) + 5, 123456789], np.int64)
    assert [int(compiled_mix(f)) for f in fids] == [int(h) for h in _mix(fids)]


def test_ten_million_random_fids_get_distinct_rows_that_find_and_fids_of_read_back():
    fids = _distinct(np.random.default_rng(0).integers(-(2**63) + 2, 2**63 - 1, 10_000_000))
    host = HostTier(1)
    rows = host.insert(fids)
    assert len(host) == len(fids)
    assert len(_distinct(rows)) == len(fids) and rows.min() >= 0
    assert np.array_equal(host.find(fids), rows)
    assert np.array_equal(host.fids_of(rows), fids)
    # Inserting again returns the same rows and creates nothing.
    assert np.array_equal(host.insert(fids[::1000]), rows[::1000])
    assert len(host) == len(fids)


def test_fids_that_collide_in_a_tiny_index_still_resolve_exactly():
    colliders = _colliding_fids(600)
    host = HostTier(2, capacity=16)
    rows = np.concatenate([host.insert(colliders[i : i + 1]) for i in range(len(colliders))])
    assert len(np.unique(rows)) == len(colliders)
    assert len(host._index) <= 1 << 12  # every fid starts probing in the same slot: one long chain
    assert np.array_equal(host.find(colliders), rows)
    assert np.array_equal(host.fids_of(rows), colliders)
    # Erasing every other one leaves tombstones all along the chain; the rest still resolve.
    erased = host.erase(colliders[::2])
    assert np.array_equal(erased, rows[::2])
    assert np.array_equal(host.find(colliders[1::2]), rows[1::2])
    assert (host.find(colliders[::2]) == -1).all()


def test_thousands_of_single_inserts_and_erases_through_a_tiny_index_resolve_exactly():
    rng = np.random.default_rng(2)
    universe = np.unique(np.concatenate([_colliding_fids(300, bits=10, seed=3), rng.integers(0, 2**62, 300)]))
    host = HostTier(1, capacity=16)
    model: dict[int, int] = {}
    for _ in range(5000):
        fid = int(rng.choice(universe))
        if fid in model and rng.random() < 0.5:
            assert host.erase(np.array([fid], np.int64))[0] == model.pop(fid)
        else:
            row = int(host.insert(np.array([fid], np.int64))[0])
            assert model.setdefault(fid, row) == row
    expected = np.array([model.get(int(f), -1) for f in universe], np.int64)
    assert np.array_equal(host.find(universe), expected)


def test_erased_rows_are_reused_by_later_inserts():
    host = HostTier(3, capacity=16)
    rows = host.insert(np.arange(1, 11, dtype=np.int64))
    freed = host.erase(np.array([2, 5, 9], np.int64))
    assert np.array_equal(freed, rows[[1, 4, 8]])
    assert len(host) == 7
    reused = host.insert(np.array([100, 200, 300], np.int64))
    assert set(reused.tolist()) == set(freed.tolist())
    assert len(host) == 10 and host._next_row == 10
    assert np.array_equal(host.fids_of(reused), [100, 200, 300])
    assert (host.find(np.array([2, 5, 9], np.int64)) == -1).all()


def test_erase_of_an_absent_fid_returns_minus_one_and_changes_nothing():
    host = HostTier(1)
    rows = host.insert(np.array([7, 8], np.int64))
    assert host.erase(np.array([9], np.int64)).tolist() == [-1]
    assert len(host) == 2
    # A fid repeated in one call is erased once; its second occurrence is already absent.
    assert host.erase(np.array([7, 7], np.int64)).tolist() == [rows[0], -1]
    assert len(host) == 1
    assert host.find(np.array([7, 8], np.int64)).tolist() == [-1, rows[1]]


def test_a_tombstone_does_not_hide_a_fid_inserted_after_it_in_the_same_chain():
    a, b, c = _colliding_fids(3).tolist()
    host = HostTier(1, capacity=16)
    row_a = host.insert(np.array([a], np.int64))[0]
    row_b = host.insert(np.array([b], np.int64))[0]
    assert host.erase(np.array([a], np.int64))[0] == row_a
    assert host.find(np.array([b, a], np.int64)).tolist() == [row_b, -1]
    # The next colliding fid takes the tombstone's slot; both stay findable.
    row_c = host.insert(np.array([c], np.int64))[0]
    assert host.find(np.array([a, b, c], np.int64)).tolist() == [-1, row_b, row_c]
    # Re-inserting b (already present, behind the reused slot) keeps its row.
    assert host.insert(np.array([b], np.int64))[0] == row_b
    assert len(host) == 2


def test_random_batched_inserts_and_erases_agree_with_a_dict_model():
    rng = np.random.default_rng(4)
    universe = np.unique(
        np.concatenate([_colliding_fids(200, bits=10, seed=3), rng.integers(-(2**62), 2**62, 2000)])
    )
    host = HostTier(2, capacity=16)
    model: dict[int, int] = {}
    for step in range(20_000):
        batch = np.unique(rng.choice(universe, int(rng.integers(1, 9))))
        if rng.random() < 0.45:
            out = host.erase(batch)
            assert out.tolist() == [model.pop(int(f), -1) for f in batch]
        else:
            out = host.insert(batch)
            live = set(model.values())
            for fid, row in zip(batch.tolist(), out.tolist(), strict=True):
                if fid in model:
                    assert model[fid] == row
                else:
                    assert row >= 0 and row not in live  # a new fid never shares a live row
                    model[fid] = row
                    live.add(row)
        assert len(host) == len(model)
        if step % 1000 == 999:
            expected = np.array([model.get(int(f), -1) for f in universe], np.int64)
            assert np.array_equal(host.find(universe), expected)
            live_rows = host.live_rows()
            assert sorted(live_rows.tolist()) == sorted(model.values())
            assert sorted(host.fids_of(live_rows).tolist()) == sorted(model)


def test_find_gather_copies_the_columns_of_present_fids_and_leaves_misses_alone():
    host = HostTier(3)
    fids = np.array([11, 22, 33], np.int64)
    rows = host.insert(fids)
    host.floats[rows, 2:] = np.arange(9, dtype=np.float32).reshape(3, 3)
    out = np.full((4, 2), -7.0, np.float32)
    got = host.find_gather(np.array([22, 99, 11, 33], np.int64), out, col=1)
    assert got.tolist() == [rows[1], -1, rows[0], rows[2]]
    assert out.tolist() == [[4, 5], [-7, -7], [1, 2], [7, 8]]


def test_changed_rows_returns_exactly_the_rows_with_versions_above_since():
    host = HostTier(1)
    rows = host.insert(np.arange(100, 110, dtype=np.int64))
    assert host.versions[rows].tolist() == [0] * 10  # fresh rows start at version 0
    host.versions[rows] = np.arange(1, 11)
    assert sorted(host.changed_rows(0).tolist()) == sorted(rows.tolist())
    assert sorted(host.changed_rows(7).tolist()) == sorted(rows[7:].tolist())
    assert host.changed_rows(10).size == 0
    assert sorted(host.changed_rows(-5).tolist()) == sorted(rows.tolist())
    host.erase(np.array([108], np.int64))  # an erased row is no longer changed
    assert sorted(host.changed_rows(7).tolist()) == sorted([rows[7], rows[9]])


def test_live_rows_matches_the_size_after_inserts_and_erases():
    host = HostTier(1, capacity=16)
    host.insert(np.arange(50, dtype=np.int64))
    host.erase(np.arange(0, 50, 3, dtype=np.int64))
    live = host.live_rows()
    assert len(live) == len(host) == 50 - 17
    assert set(host.fids_of(live).tolist()) == set(range(50)) - set(range(0, 50, 3))


def test_nbytes_grows_with_the_rows_held():
    host = HostTier(4, capacity=16)
    sizes = [host.nbytes()]
    for start in range(0, 4000, 1000):
        host.insert(np.arange(start, start + 1000, dtype=np.int64))
        sizes.append(host.nbytes())
    assert all(a < b for a, b in zip(sizes, sizes[1:], strict=False))
    # At least the slab itself: fid words plus width floats per row.
    assert sizes[-1] >= 4000 * (2 + 4) * 4
