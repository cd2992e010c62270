"""Tests of ``ColdStore`` on real RocksDB in a tmp dir: round trips, scans, atomic writes, checkpoints, crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rocksdict import Options, Rdict

from services.store.cold import ColdStore, RowBatch

WIDTH = 6
_REPO = Path(__file__).resolve().parents[2]


def _rows(fids, version: int | np.ndarray = 1, seed: int = 0) -> RowBatch:
    fids = np.asarray(fids, np.int64)
    rng = np.random.default_rng(seed)
    n = len(fids)
    versions = np.broadcast_to(np.asarray(version, np.int64), (n,)).copy()
    return RowBatch(
        fids=fids,
        versions=versions,
        freqs=rng.integers(0, 2**32, n, dtype=np.uint32),
        last_seen=rng.integers(0, 2**32, n, dtype=np.uint32),
        data=rng.normal(size=(n, WIDTH)).astype(np.float32),
    )


def _assert_rows_equal(actual: RowBatch, expected: RowBatch) -> None:
    np.testing.assert_array_equal(actual.fids, expected.fids)
    np.testing.assert_array_equal(actual.versions, expected.versions)
    np.testing.assert_array_equal(actual.freqs, expected.freqs)
    np.testing.assert_array_equal(actual.last_seen, expected.last_seen)
    # Bit-exact, not approximately equal: the store must not round-trip through another float type.
    np.testing.assert_array_equal(actual.data.view(np.uint32), expected.data.view(np.uint32))


@pytest.fixture
def store(tmp_path: Path):
    with ColdStore(str(tmp_path / "cold"), WIDTH) as s:
        yield s


def test_100k_rows_read_back_bit_exact_in_the_order_asked(store: ColdStore):
    rng = np.random.default_rng(1)
    fids = rng.choice(2**62, size=100_000, replace=False).astype(np.int64)
    rows = _rows(fids, version=rng.integers(0, 2**62, len(fids)))
    store.put(rows)

    order = rng.permutation(len(fids))
    found, got = store.get(fids[order])

    assert found.all()
    _assert_rows_equal(got, rows.take(order))
    assert len(store) == 100_000


def test_missing_fids_are_reported_not_found_with_zero_rows(store: ColdStore):
    store.put(_rows([10, 30]))

    found, got = store.get(np.array([10, 20, 30, 40], np.int64))

    np.testing.assert_array_equal(found, [True, False, True, False])
    np.testing.assert_array_equal(got.fids, [10, 20, 30, 40])
    _assert_rows_equal(got.take(found), _rows([10, 30]))
    assert not got.data[~found].any() and not got.versions[~found].any()


def test_get_of_no_fids_returns_empty_results(store: ColdStore):
    found, got = store.get(np.zeros(0, np.int64))

    assert found.shape == (0,) and got.data.shape == (0, WIDTH)


def test_putting_a_fid_again_overwrites_its_row_and_the_last_duplicate_wins(store: ColdStore):
    store.put(_rows([5], version=1, seed=1))
    last = _rows([5], version=3, seed=3)
    store.put(RowBatch.concat([_rows([5], version=2, seed=2), last]))

    _, got = store.get(np.array([5]))

    _assert_rows_equal(got, last)
    assert len(store) == 1


def test_delete_removes_rows_and_ignores_missing_fids(store: ColdStore):
    store.put(_rows(np.arange(10)))

    store.delete(np.array([2, 3, 99], np.int64))

    found, _ = store.get(np.arange(10))
    np.testing.assert_array_equal(np.flatnonzero(~found), [2, 3])
    assert len(store) == 8


def test_scan_returns_every_row_in_fid_order_in_batches_and_skips_metadata(store: ColdStore):
    rng = np.random.default_rng(2)
    # Small fids make keys that start with zero bytes, the ones a key-prefix scheme could confuse with metadata.
    fids = np.concatenate([np.arange(0, 300), rng.choice(2**62, 2_200, replace=False) + 300]).astype(np.int64)
    rows = _rows(rng.permutation(fids))
    store.put(rows)
    store.put_meta("ab", b"x" * 30)
    store.put_meta("\x00\x00\x00\x00\x00\x00", b"looks like a small fid")

    batches = list(store.scan(batch_rows=1000))

    assert [len(b) for b in batches] == [1000, 1000, 500]
    scanned = RowBatch.concat(batches)
    _assert_rows_equal(scanned, rows.take(np.argsort(rows.fids)))


def test_scan_of_an_empty_store_yields_nothing(store: ColdStore):
    store.put_meta("m", b"only metadata")

    assert list(store.scan()) == []


def test_scan_started_before_a_write_does_not_see_it(store: ColdStore):
    store.put(_rows(np.arange(100)))
    scan = store.scan(batch_rows=10)

    store.put(_rows(np.arange(100, 200)))
    store.delete(np.arange(50))

    np.testing.assert_array_equal(RowBatch.concat(list(scan)).fids, np.arange(100))


def test_scan_changed_returns_only_rows_newer_than_the_version_in_full_batches(store: ColdStore):
    fids = np.arange(1_000, dtype=np.int64)
    versions = fids % 7
    store.put(_rows(fids, version=versions))

    batches = list(store.scan_changed(since_version=4, batch_rows=100))

    changed = RowBatch.concat(batches)
    np.testing.assert_array_equal(changed.fids, fids[versions > 4])
    assert all(len(b) == 100 for b in batches[:-1]) and 0 < len(batches[-1]) <= 100
    assert (changed.versions > 4).all()
    assert list(store.scan_changed(since_version=6)) == []


def test_write_commits_rows_deletes_and_metadata_together(store: ColdStore):
    store.put(_rows(np.arange(10), version=1))
    before = store.scan()

    store.write(rows=_rows([100, 101], version=2), delete_fids=np.array([0, 1]), meta={"ckpt": b"v2"})

    # A snapshot taken before the write sees none of it; a read after sees all of it.
    np.testing.assert_array_equal(RowBatch.concat(list(before)).fids, np.arange(10))
    found, _ = store.get(np.array([0, 1, 100, 101]))
    np.testing.assert_array_equal(found, [False, False, True, True])
    assert store.get_meta("ckpt") == b"v2"


def test_a_fid_both_put_and_deleted_in_one_write_ends_up_deleted(store: ColdStore):
    store.write(rows=_rows([7, 8]), delete_fids=np.array([7]))

    found, _ = store.get(np.array([7, 8]))

    np.testing.assert_array_equal(found, [False, True])


def test_write_rejected_by_validation_commits_nothing(store: ColdStore):
    with pytest.raises(ValueError, match="metadata name"):
        store.write(rows=_rows([1, 2]), delete_fids=np.array([3]), meta={"ok": b"1", "": b"bad"})

    assert len(store) == 0
    assert store.get_meta("ok") is None


def test_metadata_round_trips_and_unknown_names_read_none(store: ColdStore):
    store.put_meta("checkpoint", b"\x00\x01binary")
    store.put_meta("checkpoint", b"replaced")

    assert store.get_meta("checkpoint") == b"replaced"
    assert store.get_meta("missing") is None
    assert len(store) == 0


def test_reopen_after_close_sees_all_rows_and_metadata(tmp_path: Path):
    path = str(tmp_path / "cold")
    rows = _rows(np.arange(5_000), version=9)
    with ColdStore(path, WIDTH) as s:
        s.put(rows)
        s.put_meta("m", b"kept")

    with ColdStore(path, WIDTH, create=False) as s:
        found, got = s.get(rows.fids)
        assert found.all()
        _assert_rows_equal(got, rows)
        assert s.get_meta("m") == b"kept"


def test_close_is_idempotent_and_ends_open_scans_so_the_path_can_be_reopened(tmp_path: Path):
    path = str(tmp_path / "cold")
    s = ColdStore(path, WIDTH)
    s.put(_rows(np.arange(20)))
    unfinished = s.scan(batch_rows=5)
    next(unfinished)

    s.close()
    s.close()

    with pytest.raises(RuntimeError, match="closed"):
        s.get(np.array([1]))
    with ColdStore(path, WIDTH) as again:
        assert len(again) == 20


def test_opening_a_missing_store_without_create_raises_file_not_found(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        ColdStore(str(tmp_path / "absent"), WIDTH, create=False)


def test_checkpoint_is_openable_and_does_not_see_later_writes(store: ColdStore, tmp_path: Path):
    rows = _rows(np.arange(1_000), version=1)
    store.put(rows)
    store.put_meta("m", b"at checkpoint")
    dest = str(tmp_path / "ckpt")

    store.checkpoint(dest)
    store.put(_rows(np.arange(1_000, 1_100), version=2))
    store.delete(np.arange(10))
    store.put_meta("m", b"after")

    assert not os.path.exists(dest + ".tmp")
    with ColdStore.open_checkpoint(dest, WIDTH) as ckpt:
        _assert_rows_equal(RowBatch.concat(list(ckpt.scan())), rows)
        assert ckpt.get_meta("m") == b"at checkpoint"
        # Writing to the checkpoint leaves the source alone (SST files are shared only while immutable).
        ckpt.delete(np.arange(1_000))
    assert len(store) == 1_090


def test_checkpoint_into_an_existing_path_raises_and_leaves_it_alone(store: ColdStore, tmp_path: Path):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "keep").write_bytes(b"x")

    with pytest.raises(FileExistsError):
        store.checkpoint(str(dest))

    assert os.listdir(dest) == ["keep"]


def test_checkpoint_replaces_a_leftover_tmp_dir_from_a_crashed_checkpoint(store: ColdStore, tmp_path: Path):
    store.put(_rows([1]))
    dest = str(tmp_path / "ckpt")
    os.mkdir(dest + ".tmp")

    store.checkpoint(dest)

    with ColdStore.open_checkpoint(dest, WIDTH) as ckpt:
        assert len(ckpt) == 1


def test_the_undo_log_keeps_rows_and_absences_apart_from_the_rows_until_cleared(tmp_path: Path):
    path = str(tmp_path / "cold")
    with ColdStore(path, WIDTH) as s:
        old = _rows([5, 7], version=3, seed=1)
        s.write(rows=_rows([5, 7, 9], version=4, seed=2), undo=old, undo_absent=np.array([9]))
        assert len(s) == 3 and [b.fids.tolist() for b in s.scan()] == [[5, 7, 9]]  # rows never see the log
    with ColdStore(path, WIDTH) as s:  # durable
        logged, present, rows = s.get_undo(np.array([9, 7, 1, 5]))
        assert logged.tolist() == [True, True, False, True] and present.tolist() == [False, True, False, True]
        np.testing.assert_array_equal(rows.data[[3, 1]], old.data)
        np.testing.assert_array_equal(rows.versions[[3, 1]], [3, 3])
        present, log = s.undo_log()
        assert log.fids.tolist() == [5, 7, 9] and present.tolist() == [True, True, False]
        np.testing.assert_array_equal(log.data[:2], old.data)

        s.write(rows=_rows([11]), clear_undo=True, undo_absent=np.array([11]))  # cleared first, then added
        present, log = s.undo_log()
        assert log.fids.tolist() == [11] and present.tolist() == [False]
        s.write(clear_undo=True)
        assert len(s.undo_log()[1]) == 0 and len(s) == 4


def test_rows_of_the_wrong_width_are_rejected(store: ColdStore):
    rows = RowBatch(np.array([1]), np.array([1]), np.array([1]), np.array([1]), np.zeros((1, WIDTH + 1)))

    with pytest.raises(ValueError, match="width"):
        store.put(rows)


def test_opening_with_another_width_raises(tmp_path: Path):
    path = str(tmp_path / "cold")
    ColdStore(path, WIDTH).close()

    with pytest.raises(ValueError, match="width"):
        ColdStore(path, WIDTH + 1)
    # The failed open must not leave the DB locked.
    ColdStore(path, WIDTH).close()


def test_non_positive_width_is_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="width must be positive"):
        ColdStore(str(tmp_path / "cold"), 0)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"versions": np.zeros(3, np.int64)}, "versions has 3 rows"),
        ({"data": np.zeros(WIDTH, np.float32)}, "data must be 2-D"),
        ({"fids": np.zeros(2, np.float64)}, "fids must be integer"),
    ],
)
def test_malformed_row_batches_are_rejected(columns: dict, message: str):
    fields = {
        "fids": np.arange(2),
        "versions": np.zeros(2, np.int64),
        "freqs": np.zeros(2, np.uint32),
        "last_seen": np.zeros(2, np.uint32),
        "data": np.zeros((2, WIDTH), np.float32),
    }
    fields.update(columns)

    with pytest.raises(ValueError, match=message):
        RowBatch(**fields)


def test_fids_that_are_not_a_1d_integer_array_are_rejected(store: ColdStore):
    with pytest.raises(ValueError, match="1-D integer"):
        store.get(np.array([[1, 2]]))
    with pytest.raises(ValueError, match="1-D integer"):
        store.delete(np.array([1.5]))


def test_a_stored_value_of_the_wrong_length_raises_naming_the_fid(tmp_path: Path):
    path = str(tmp_path / "cold")
    with ColdStore(path, WIDTH) as s:
        s.put(_rows([1, 2, 3]))
    cfs = {"meta": Options(raw_mode=True), "undo": Options(raw_mode=True)}
    raw = Rdict(path, Options(raw_mode=True), column_families=cfs)
    raw[(2).to_bytes(8, "big")] = b"truncated"
    raw.close()

    with ColdStore(path, WIDTH) as s:
        with pytest.raises(ValueError, match="fid 2"):
            s.get(np.array([1, 2, 3]))
        with pytest.raises(ValueError, match="fid 2"):
            list(s.scan())


_WRITER = """
import sys
import numpy as np
from services.store.cold import ColdStore, RowBatch

store = ColdStore(sys.argv[1], 4)
for i in range(1, 1_000_000):
    fids = np.arange((i - 1) * 100, i * 100, dtype=np.int64)
    ones = np.ones(100, np.uint32)
    rows = RowBatch(fids, np.full(100, i), ones, ones, np.repeat(fids[:, None], 4, 1).astype(np.float32))
    store.write(rows=rows, meta={"last": str(i).encode()})
    print("written", i, flush=True)
"""


def test_rows_acknowledged_by_a_killed_writer_survive_and_each_write_is_all_or_nothing(tmp_path: Path):
    path = str(tmp_path / "cold")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    acknowledged = 0
    try:
        # Kill while the writer is still writing, so the kill can land in the middle of a write.
        while acknowledged < 50:
            line = proc.stdout.readline()
            assert line.startswith("written"), f"writer died: {line!r} {proc.stderr.read()}"
            acknowledged = int(line.split()[1])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    with ColdStore(path, 4, create=False) as s:
        last = int(s.get_meta("last"))
        assert last >= acknowledged
        # Rows and metadata of one write commit together: exactly the rows of writes 1..last exist.
        scanned = RowBatch.concat(list(s.scan()))
        np.testing.assert_array_equal(scanned.fids, np.arange(last * 100))
        np.testing.assert_array_equal(scanned.versions, scanned.fids // 100 + 1)
        np.testing.assert_array_equal(scanned.data, np.repeat(scanned.fids[:, None], 4, 1).astype(np.float32))


_OPS = st.lists(
    st.tuples(st.sampled_from(["put", "delete"]), st.lists(st.integers(0, 40), min_size=1, max_size=12)),
    max_size=12,
)


@settings(max_examples=30, deadline=None)
@given(ops=_OPS)
def test_gets_and_scans_agree_with_a_dict_after_any_puts_and_deletes(ops):
    model: dict[int, tuple[int, bytes]] = {}
    with tempfile.TemporaryDirectory() as tmp, ColdStore(os.path.join(tmp, "cold"), WIDTH) as s:
        for step, (op, fids) in enumerate(ops):
            if op == "put":
                rows = _rows(fids, version=step, seed=step)
                s.put(rows)
                for j, fid in enumerate(fids):
                    model[fid] = (step, rows.data[j].tobytes())
            else:
                s.delete(np.array(fids, np.int64))
                for fid in fids:
                    model.pop(fid, None)

        probe = np.arange(41, dtype=np.int64)
        found, got = s.get(probe)
        assert {int(f) for f in probe[found]} == set(model)
        for fid in model:
            assert (int(got.versions[fid]), got.data[fid].tobytes()) == model[fid]
        scanned = list(s.scan(batch_rows=7))
        assert [int(f) for b in scanned for f in b.fids] == sorted(model)
