"""Tests of ``TieredTable`` in memory: collisionless rows, initial values, Adagrad, versions, export paging."""

from __future__ import annotations

import math

import numpy as np

from services.store.optimizers import AdagradConfig
from services.store.table import initial_values
from services.store.tables import TableSpec
from services.store.tiered import TieredTable

_CFG = TableSpec(
    name="fm",
    dim=4,
    optimizer=AdagradConfig(learning_rate=0.2, initial_accumulator=0.1, eps=0.0),
    init_scale=0.01,
    seed=3,
)


def _table(capacity: int = 8) -> TieredTable:
    # A small capacity makes every test exercise slab growth.
    return TieredTable(_CFG)


def _initial(fids) -> np.ndarray:
    return initial_values(np.asarray(fids, np.int64), _CFG.dim, _CFG.init_scale, _CFG.seed)


class _ReferenceAdagrad:
    """Adagrad on a dict of rows, one float at a time in float64: the specification the table must meet."""

    def __init__(self, cfg: TableSpec) -> None:
        self.cfg = cfg
        self.values: dict[int, list[float]] = {}
        self.accum: dict[int, list[float]] = {}

    def push(self, fids: list[int], grads: list[list[float]]) -> None:
        summed: dict[int, list[float]] = {}
        for fid, grad in zip(fids, grads, strict=True):
            acc = summed.setdefault(fid, [0.0] * self.cfg.dim)
            for d in range(self.cfg.dim):
                acc[d] += grad[d]
        for fid, grad in summed.items():
            if fid not in self.values:
                self.values[fid] = [float(x) for x in _initial([fid])[0]]
                self.accum[fid] = [self.cfg.optimizer.initial_accumulator] * self.cfg.dim
            for d in range(self.cfg.dim):
                self.accum[fid][d] += grad[d] * grad[d]
                self.values[fid][d] -= self.cfg.optimizer.learning_rate * grad[d] / math.sqrt(self.accum[fid][d])


def _distinct_fids(rng: np.random.Generator, n: int) -> np.ndarray:
    fids = np.unique(rng.integers(0, 2**62, size=n + n // 10, dtype=np.int64))
    rng.shuffle(fids)
    assert len(fids) >= n
    return fids[:n]


def test_200k_distinct_fids_get_distinct_rows_and_read_back_their_own_values():
    rng = np.random.default_rng(0)
    fids = _distinct_fids(rng, 200_000)
    grads = rng.normal(size=(len(fids), _CFG.dim)).astype(np.float32)
    table = _table()

    assert table.push(fids, grads) == len(fids)

    assert len(table) == len(fids)
    accum = np.float32(_CFG.optimizer.initial_accumulator) + grads * grads
    expected = _initial(fids) - np.float32(_CFG.optimizer.learning_rate) * grads / np.sqrt(accum)
    np.testing.assert_allclose(table.pull(fids), expected, rtol=1e-5, atol=1e-7)
    # Reading in another order returns each fid's own row, not the row at the same position.
    perm = rng.permutation(len(fids))
    np.testing.assert_array_equal(table.pull(fids[perm]), table.pull(fids)[perm])
    page = table.export(0, len(fids) + 1)
    assert len(page.fids) == len(fids)
    assert len(np.unique(page.fids)) == len(fids)


def test_unknown_fids_pull_their_initial_value_and_are_not_inserted():
    table = _table()
    known = np.array([10, 20, 30], np.int64)
    table.push(known, np.ones((3, _CFG.dim), np.float32))
    version = table.version
    unknown = np.array([5, 2**40 + 7, 123_456_789], np.int64)

    mixed = np.array([5, 10, 2**40 + 7, 30, 123_456_789], np.int64)
    out = table.pull(mixed)

    np.testing.assert_array_equal(out[[0, 2, 4]], _initial(unknown))
    assert not np.allclose(out[[1, 3]], _initial([10, 30]))
    assert len(table) == 3
    assert table.version == version
    assert len(table.export(0, 100).fids) == 3


def test_initial_values_are_deterministic_bounded_and_differ_between_fids_and_seeds():
    fids = np.arange(1000, dtype=np.int64)
    a = initial_values(fids, 8, 0.01, seed=1)
    assert a.dtype == np.float32 and a.shape == (1000, 8)
    np.testing.assert_array_equal(a, initial_values(fids, 8, 0.01, seed=1))
    assert np.abs(a).max() <= 0.01
    assert len(np.unique(a[:, 0])) == 1000
    assert not np.array_equal(a, initial_values(fids, 8, 0.01, seed=2))


def test_pull_of_an_empty_fid_list_returns_an_empty_matrix():
    out = _table().pull(np.zeros(0, np.int64))
    assert out.shape == (0, _CFG.dim) and out.dtype == np.float32


def test_adagrad_matches_a_reference_over_several_pushes_with_duplicate_fids():
    rng = np.random.default_rng(1)
    table = _table()
    ref = _ReferenceAdagrad(_CFG)
    pool = np.array([1, 2, 3, 5, 8, 13, 2**50, 2**33 + 1], np.int64)
    for _ in range(6):
        fids = rng.choice(pool, size=12, replace=True)  # duplicates within one push
        grads = rng.normal(scale=2.0, size=(12, _CFG.dim)).astype(np.float32)
        updated = table.push(fids, grads)
        ref.push(fids.tolist(), grads.astype(np.float64).tolist())
        assert updated == len(np.unique(fids))

    seen = np.array(sorted(ref.values), np.int64)
    expected = np.array([ref.values[f] for f in seen.tolist()])
    np.testing.assert_allclose(table.pull(seen), expected, rtol=1e-5, atol=1e-6)
    assert len(table) == len(seen)


def test_duplicate_fids_in_one_push_are_summed_before_the_update():
    once, twice = _table(), _table()
    g = np.full((1, _CFG.dim), 0.5, np.float32)
    once.push(np.array([7], np.int64), 2 * g)
    twice.push(np.array([7, 7], np.int64), np.concatenate([g, g]))
    np.testing.assert_array_equal(twice.pull(np.array([7])), once.pull(np.array([7])))
    assert twice.version == 1


def test_every_written_row_gets_its_own_increasing_version():
    table = _table()
    rng = np.random.default_rng(2)
    all_versions = []
    for step in range(5):
        fids = rng.integers(0, 40, size=25).astype(np.int64)
        before = table.version
        n = table.push(fids, rng.normal(size=(25, _CFG.dim)).astype(np.float32))
        assert table.version == before + n
        page = table.export(before, 1000)
        assert sorted(page.fids.tolist()) == sorted(set(fids.tolist())), step
        np.testing.assert_array_equal(page.versions, np.arange(before + 1, before + n + 1))
        all_versions.extend(page.versions.tolist())
    assert all_versions == sorted(set(all_versions))


def _drain(table: TieredTable, since: int, limit: int, between=None) -> tuple[list[tuple[int, int]], int]:
    """Pages through export from ``since``; calls ``between(page_no)`` after each page. Returns (fid, version)s."""
    got: list[tuple[int, int]] = []
    pages = 0
    while True:
        page = table.export(since, limit)
        assert len(page.fids) <= limit
        assert np.all(np.diff(page.versions) > 0)
        if got and len(page.versions):
            assert page.versions[0] > got[-1][1], "pages must not overlap or go back"
        np.testing.assert_array_equal(page.values, table.pull(page.fids))
        got.extend(zip(page.fids.tolist(), page.versions.tolist(), strict=True))
        since = page.next_version
        pages += 1
        if not page.has_more:
            return got, since
        assert since == got[-1][1]
        if between is not None:
            between(pages)
        assert pages < 1000


def test_export_pages_through_all_changes_in_version_order_without_loss_or_duplicates():
    table = _table()
    rng = np.random.default_rng(3)
    fids = _distinct_fids(rng, 1000)
    for chunk in np.array_split(fids, 7):
        table.push(chunk, rng.normal(size=(len(chunk), _CFG.dim)).astype(np.float32))

    got, cursor = _drain(table, 0, limit=64)

    assert [v for _, v in got] == list(range(1, 1001))
    assert sorted(f for f, _ in got) == sorted(fids.tolist())
    assert cursor == table.version == 1000


def test_export_page_size_equal_to_remaining_rows_ends_with_has_more_false():
    table = _table()
    table.push(np.arange(10, dtype=np.int64), np.ones((10, _CFG.dim), np.float32))
    first = table.export(0, 5)
    second = table.export(first.next_version, 5)
    assert first.has_more and first.next_version == 5
    assert not second.has_more and second.next_version == 10
    assert table.export(second.next_version, 5).fids.size == 0


def test_rows_updated_between_export_pages_show_up_later_with_their_new_version():
    table = _table()
    rng = np.random.default_rng(4)
    fids = np.arange(100, 200, dtype=np.int64)
    table.push(fids, rng.normal(size=(100, _CFG.dim)).astype(np.float32))
    # Rows pushed first get the lowest versions, so 100..129 are on page 1 and 170..199 on page 3+.
    already_read = np.array([100, 105, 129], np.int64)
    not_yet_read = np.array([170, 199], np.int64)
    fresh = np.array([5000], np.int64)

    def reupdate(page_no: int) -> None:
        if page_no == 1:
            touched = np.concatenate([already_read, not_yet_read, fresh])
            table.push(touched, rng.normal(size=(len(touched), _CFG.dim)).astype(np.float32))

    got, cursor = _drain(table, 0, limit=30, between=reupdate)

    versions = [v for _, v in got]
    assert versions == sorted(set(versions))
    counts: dict[int, int] = {}
    for fid, _ in got:
        counts[fid] = counts.get(fid, 0) + 1
    assert set(counts) == set(fids.tolist()) | {5000}
    for fid in already_read.tolist():
        assert counts[fid] == 2, fid  # the old version on page 1, the new one later
    for fid in [*not_yet_read.tolist(), 5000]:
        assert counts[fid] == 1, fid  # its old version was overwritten before it was read
    last_version = {fid: v for fid, v in got}
    for fid in [*already_read.tolist(), *not_yet_read.tolist(), 5000]:
        assert last_version[fid] > 100  # written by the second push
    assert cursor == table.version == 106


def test_export_from_beyond_the_table_version_reports_a_lower_next_version():
    # A reader that was at version 500 meets a restarted store that only reached version 3.
    table = _table()
    table.push(np.array([1, 2, 3], np.int64), np.ones((3, _CFG.dim), np.float32))

    page = table.export(500, 10)

    assert page.fids.size == 0 and not page.has_more
    assert page.next_version == 3 < 500


def test_export_of_an_empty_table_is_empty_at_version_zero():
    page = _table().export(0, 10)
    assert page.fids.size == 0 and page.values.shape == (0, _CFG.dim)
    assert page.next_version == 0 and not page.has_more


def test_export_with_limit_zero_returns_an_empty_page_with_more_to_come():
    table = _table()
    table.push(np.array([1, 2], np.int64), np.ones((2, _CFG.dim), np.float32))
    page = table.export(0, 0)
    assert page.fids.size == 0 and page.has_more and page.next_version == 0
