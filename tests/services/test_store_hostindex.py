"""HostTier: collisionless rows for 10 M fids, tombstones, reuse, and agreement with a dict model."""

from __future__ import annotations

import numpy as np

from services.store.host import HostTier


def test_10_million_random_fids_get_distinct_rows_and_read_back():
    rng = np.random.default_rng(0)
    fids = np.sort(rng.integers(-(2**63) + 2, 2**63 - 1, 10_000_000, dtype=np.int64))
    fids = fids[np.concatenate([[True], np.diff(fids) != 0])]
    host = HostTier(width=1, capacity=len(fids))
    rows = host.insert(fids)
    assert len(host) == len(fids)
    assert (np.diff(np.sort(rows)) != 0).all()  # never two fids on one row
    assert np.array_equal(host.find(fids), rows)
    assert np.array_equal(host.fids_of(rows), fids)
    absent = rng.integers(-(2**63) + 2, 2**63 - 1, 100_000, dtype=np.int64)
    absent = absent[~np.isin(absent, fids)]
    assert (host.find(absent) == -1).all()


def test_long_probe_chains_in_a_tiny_index_resolve_exactly():
    host = HostTier(width=2, capacity=16, max_load=0.95)
    fids = np.arange(0, 4000 * 64, 64, dtype=np.int64)  # regular strides: a weak hash would cluster them
    rows = host.insert(fids)
    host.floats[rows, 2] = fids.astype(np.float32)
    out = np.zeros((len(fids), 1), np.float32)
    assert np.array_equal(host.find_gather(fids, out), rows)
    assert np.array_equal(out[:, 0], fids.astype(np.float32))


def test_erased_rows_are_reused_and_tombstones_do_not_hide_later_fids():
    host = HostTier(width=1, capacity=16)
    first = np.arange(1, 501, dtype=np.int64)
    rows = host.insert(first)
    freed = host.erase(first[:250])
    assert np.array_equal(freed, rows[:250])
    assert (host.find(first[:250]) == -1).all()
    assert np.array_equal(host.find(first[250:]), rows[250:])  # probing walks over tombstones
    second = np.arange(10_001, 10_201, dtype=np.int64)
    reused = host.insert(second)
    assert set(reused.tolist()) <= set(rows[:250].tolist())  # the free rows came back
    assert len(host) == 450
    assert (host.erase(np.array([99_999], np.int64)) == -1).all()


def test_random_inserts_and_erases_agree_with_a_dict_model():
    rng = np.random.default_rng(7)
    host = HostTier(width=1, capacity=16)
    model: dict[int, float] = {}
    universe = rng.integers(0, 2**40, 3000, dtype=np.int64)
    for step in range(300):
        batch = np.unique(rng.choice(universe, rng.integers(1, 80)))
        if rng.random() < 0.6:
            rows = host.insert(batch)
            host.floats[rows, 2] = np.float32(step)
            model.update(dict.fromkeys(batch.tolist(), float(step)))
        else:
            host.erase(batch)
            for fid in batch.tolist():
                model.pop(fid, None)
        assert len(host) == len(model)
    keys = np.array(sorted(model), np.int64)
    out = np.zeros((len(keys), 1), np.float32)
    assert (host.find_gather(keys, out) >= 0).all()
    assert out[:, 0].tolist() == [model[k] for k in keys.tolist()]
    gone = np.setdiff1d(universe, keys)
    assert (host.find(gone) == -1).all()


def test_changed_rows_and_live_rows_follow_versions():
    host = HostTier(width=1, capacity=16)
    rows = host.insert(np.arange(1, 11, dtype=np.int64))
    host.versions[rows] = np.arange(1, 11)
    assert sorted(host.changed_rows(7).tolist()) == sorted(rows[7:].tolist())
    host.erase(np.array([10], np.int64))
    assert sorted(host.changed_rows(7).tolist()) == sorted(rows[7:9].tolist())
    assert len(host.live_rows()) == 9
    small = host.nbytes()
    host.insert(np.arange(100, 5000, dtype=np.int64))
    assert host.nbytes() > small
