"""TieredTable.rollback on real RocksDB in ``tmp_path``: back to the last tagged checkpoint, such that
reads equal those right after it and further pushes equal those on a copy opened from that checkpoint,
through admission, TTL eviction, demotion with automatic checkpoints, restarts and the device cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from freshet.fids import make_fid
from services.store.admission import CountAdmissionConfig
from services.store.optimizers import AdagradConfig, AdamConfig
from services.store.table import initial_values
from services.store.tables import SlotPolicy, TableSpec
from services.store.tiered import RollbackError, TieredTable
from tests.services.test_store_tiered import _Clock, _drain, _in_host

DIM = 4
TAG = "trainer@1234"


def _fids(slot: int, n: int, start: int = 1) -> np.ndarray:
    return np.array([make_fid(slot, v) for v in range(start, start + n)], np.int64)


def _initial(spec: TableSpec, fids: np.ndarray) -> np.ndarray:
    return initial_values(np.asarray(fids, np.int64), spec.dim, spec.init_scale, spec.seed)


def _steps(seed: int, batches: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fixed (fids, grads) pushes, so two tables can receive exactly the same ones."""
    rng = np.random.default_rng(seed)
    return [(b, rng.normal(size=(len(b), DIM)).astype(np.float32)) for b in batches]


def _push_all(table: TieredTable, steps: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for fids, grads in steps:
        table.push(fids, grads)


def _spec(**kw) -> TableSpec:
    # Adam: per-row moments and step counts, so any optimizer state left behind shows in later pushes.
    return TableSpec(
        "t",
        DIM,
        optimizer=AdamConfig(learning_rate=0.05),
        slots={
            1: SlotPolicy(admission=CountAdmissionConfig(min_count=3, sketch_width=1 << 12)),
            3: SlotPolicy(admission=CountAdmissionConfig(min_count=2, sketch_width=1 << 12)),
        },
        **kw,
    )


OLD = _fids(2, 40)  # rows that exist at the checkpoint
NEW = _fids(2, 30, start=1000)  # rows created after it
GATED = np.array([make_fid(1, 9)], np.int64)  # seen twice before the checkpoint, admitted at the third
LATE = np.array([make_fid(3, 4)], np.int64)  # its slot's admission state begins after the checkpoint


def _before() -> list[tuple[np.ndarray, np.ndarray]]:
    return _steps(1, [OLD, OLD[::3], GATED, OLD[10:], GATED])


def _after() -> list[tuple[np.ndarray, np.ndarray]]:
    return _steps(2, [OLD[:25], NEW, GATED, LATE, np.concatenate([OLD[5:15], NEW[::2]]), GATED])


def _probe() -> np.ndarray:
    return np.concatenate([OLD, NEW, GATED, LATE])


def test_rollback_restores_values_optimizer_state_and_admission_so_later_pushes_match_a_copy(tmp_path: Path):
    spec = _spec()
    table = TieredTable(spec, data_dir=str(tmp_path / "db"))
    _push_all(table, _before())
    info = table.snapshot(str(tmp_path / "copy"), tag=TAG)
    at_checkpoint = table.pull(_probe())
    _push_all(table, _after())
    assert _in_host(table, GATED).all()  # admitted after the checkpoint
    assert not np.array_equal(table.pull(_probe()), at_checkpoint)

    assert table.rollback(expected_tag=TAG) == info

    np.testing.assert_array_equal(table.pull(_probe()), at_checkpoint)
    np.testing.assert_array_equal(table.pull(NEW), _initial(spec, NEW))
    assert not _in_host(table, np.concatenate([NEW, GATED, LATE])).any()
    copy = TieredTable(spec, data_dir=str(tmp_path / "copy"))
    again = _after()
    _push_all(table, again)
    _push_all(copy, again)
    assert not _in_host(table, LATE).any()  # seen once since the checkpoint, as on the copy
    again = _steps(3, [_probe()] * 3)
    _push_all(table, again)
    _push_all(copy, again)
    np.testing.assert_array_equal(table.pull(_probe()), copy.pull(_probe()))
    copy.close()
    table.close()


def test_rollback_matches_a_table_that_only_saw_the_pushes_before_the_checkpoint(tmp_path: Path):
    spec = _spec()
    table = TieredTable(spec, data_dir=str(tmp_path / "db"))
    reference = TieredTable(spec)
    _push_all(table, _before())
    _push_all(reference, _before())
    table.checkpoint(TAG)
    _push_all(table, _after())
    table.rollback()

    again = _after()
    _push_all(table, again)
    _push_all(reference, again)
    np.testing.assert_array_equal(table.pull(_probe()), reference.pull(_probe()))
    rows, ref_rows = table.host.find(_probe()), reference.host.find(_probe())
    np.testing.assert_array_equal(rows >= 0, ref_rows >= 0)  # the same fids admitted
    have = rows >= 0
    np.testing.assert_array_equal(table.host.floats[rows[have], 2:], reference.host.floats[ref_rows[have], 2:])
    table.close()


def test_rollback_undoes_automatic_checkpoints_and_demotions_after_the_tagged_checkpoint(tmp_path: Path):
    clock = _Clock()
    spec = TableSpec("t", DIM, optimizer=AdagradConfig(0.1), host_capacity=60, demotion="lru")
    table = TieredTable(spec, data_dir=str(tmp_path / "db"), clock=clock)
    old, new = _fids(1, 150), _fids(1, 150, start=5000)
    before = _steps(4, np.array_split(old, 5))
    after = _steps(5, [*np.array_split(new, 5), old[::2], old[1::4], new[::3]])
    for fids, grads in before:
        table.push(fids, grads)
        clock.now += 1
    info = table.snapshot(str(tmp_path / "copy"), tag=TAG)
    at_checkpoint = table.pull(np.concatenate([old, new]))
    for fids, grads in after:
        table.push(fids, grads)
        clock.now += 1
    # Demotion needs clean rows: the table checkpointed on its own, keeping the tag.
    assert table.checkpoint_info.checkpoint_id > info.checkpoint_id
    assert table.checkpoint_info.tag == TAG and table.rollback_point == info
    assert table.stats["undo_rows"] > 0

    table.rollback(TAG)

    np.testing.assert_array_equal(table.pull(np.concatenate([old, new])), at_checkpoint)
    assert table.checkpoint_info == info
    copy = TieredTable(spec, data_dir=str(tmp_path / "copy"), clock=clock)
    for fids, grads in after:
        table.push(fids, grads)
        copy.push(fids, grads)
        clock.now += 1
    np.testing.assert_array_equal(table.pull(np.concatenate([old, new])), copy.pull(np.concatenate([old, new])))
    copy.close()
    table.close()


def test_rollback_after_a_restart_returns_to_the_tagged_checkpoint_not_the_automatic_ones(tmp_path: Path):
    spec = _spec()
    path = str(tmp_path / "db")
    table = TieredTable(spec, data_dir=path)
    _push_all(table, _before())
    info = table.checkpoint(TAG)
    at_checkpoint = table.pull(_probe())
    _push_all(table, _after())
    table.checkpoint()  # automatic, e.g. the periodic one or the one on a graceful stop
    table.close()

    reopened = TieredTable(spec, data_dir=path)
    assert reopened.checkpoint_info.tag == TAG and reopened.checkpoint_info.checkpoint_id == info.checkpoint_id + 1
    assert not np.array_equal(reopened.pull(_probe()), at_checkpoint)
    assert reopened.rollback(TAG) == info
    np.testing.assert_array_equal(reopened.pull(_probe()), at_checkpoint)
    reference = TieredTable(spec)
    _push_all(reference, _before())
    _push_all(reference, _after())
    _push_all(reopened, _after())
    np.testing.assert_array_equal(reopened.pull(_probe()), reference.pull(_probe()))
    reopened.close()

    # The rollback itself is durable: RocksDB is back at the checkpoint, admission state included.
    again = TieredTable(spec, data_dir=path)
    assert again.checkpoint_info == info
    np.testing.assert_array_equal(again.pull(_probe()), at_checkpoint)
    # Checkpoint ids stay unique: the automatic checkpoint that was undone keeps its id.
    assert again.checkpoint(TAG).checkpoint_id == info.checkpoint_id + 2
    again.close()


@pytest.mark.parametrize("checkpointed", [False, True], ids=["evicted", "evicted_and_checkpointed"])
def test_rows_evicted_since_the_checkpoint_are_readable_again_after_rollback(tmp_path: Path, checkpointed: bool):
    clock = _Clock()
    spec = TableSpec("t", DIM, optimizer=AdagradConfig(0.1), slots={1: SlotPolicy(ttl_s=10)})
    table = TieredTable(spec, data_dir=str(tmp_path / "db"), clock=clock)
    fids = _fids(1, 20)
    _push_all(table, _steps(6, [fids]))
    table.checkpoint(TAG)
    at_checkpoint = table.pull(fids)
    clock.now += 11
    assert table.evict_expired() == 20
    if checkpointed:
        table.checkpoint()  # the evicted rows leave RocksDB here (their old values go to the undo log)
    clock.now += 1
    table.push(fids[:3], np.ones((3, DIM), np.float32))  # a new life for three of them
    np.testing.assert_array_equal(table.pull(fids[3:]), _initial(spec, fids[3:]))

    table.rollback(TAG)

    table.stats.clear()
    np.testing.assert_array_equal(table.pull(fids), at_checkpoint)
    assert table.stats["initial_reads"] == 0
    # The next checkpoint keeps them (they are no longer pending deletion).
    table.checkpoint()
    table.close()
    reopened = TieredTable(spec, data_dir=str(tmp_path / "db"), clock=clock)
    np.testing.assert_array_equal(reopened.pull(fids), at_checkpoint)
    reopened.close()


def test_rollback_before_any_checkpoint_leaves_only_initial_values(tmp_path: Path):
    spec = _spec()
    table = TieredTable(spec, data_dir=str(tmp_path / "db"))
    _push_all(table, _before())
    assert table.rollback(expected_tag="").checkpoint_id == 0
    np.testing.assert_array_equal(table.pull(_probe()), _initial(spec, _probe()))
    assert len(table) == 0
    table.close()


def test_without_a_tagged_checkpoint_rollback_returns_to_the_last_automatic_one(tmp_path: Path):
    spec = _spec()
    table = TieredTable(spec, data_dir=str(tmp_path / "db"))
    _push_all(table, _before())
    info = table.checkpoint()
    at_checkpoint = table.pull(_probe())
    _push_all(table, _after())
    assert table.rollback() == info
    np.testing.assert_array_equal(table.pull(_probe()), at_checkpoint)
    table.close()


def test_rolling_back_twice_gives_the_same_values(tmp_path: Path):
    spec = _spec()
    table = TieredTable(spec, data_dir=str(tmp_path / "db"))
    _push_all(table, _before())
    table.checkpoint(TAG)
    at_checkpoint = table.pull(_probe())
    _push_all(table, _after())
    table.rollback(TAG)
    version = table.version
    table.rollback(TAG)
    np.testing.assert_array_equal(table.pull(_probe()), at_checkpoint)
    assert table.version > version
    table.close()


# -- device cache ---------------------------------------------------------------------------------------


def _check_no_stale_row_in_the_device_cache(tmp_path: Path, device: str) -> None:
    spec = TableSpec("t", DIM, optimizer=AdagradConfig(0.1), device_cache_rows=8)
    table = TieredTable(spec, data_dir=str(tmp_path / "db"), device=device)
    reference = TieredTable(TableSpec("t", DIM, optimizer=AdagradConfig(0.1)))
    hot, later = _fids(1, 6), _fids(1, 2, start=500)
    fids = np.concatenate([hot, later])
    before = _steps(7, [hot, hot, hot])
    _push_all(table, before)
    _push_all(reference, before)
    table.checkpoint(TAG)
    after = _steps(8, [later, later, later, hot])  # `later` becomes hot and cached, `hot` changes
    _push_all(table, after)
    assert table.refresh_cache() == 8
    assert set(table.cache.fids.tolist()) == set(fids.tolist())

    table.rollback(TAG)

    assert set(table.cache.fids.tolist()) == set(hot.tolist())
    table.stats.clear()
    np.testing.assert_array_equal(table.pull(fids), reference.pull(fids))
    np.testing.assert_array_equal(table.pull(later), _initial(spec, later))
    assert table.stats["cache_hits"] == len(hot)  # from the cache, with their checkpointed values
    _push_all(table, after)
    _push_all(reference, after)
    np.testing.assert_array_equal(table.pull(fids), reference.pull(fids))
    table.close()


def test_after_rollback_the_cpu_device_cache_serves_no_stale_row(tmp_path: Path):
    _check_no_stale_row_in_the_device_cache(tmp_path, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_after_rollback_the_cuda_device_cache_serves_no_stale_row(tmp_path: Path):
    _check_no_stale_row_in_the_device_cache(tmp_path, "cuda")


# -- versions and export --------------------------------------------------------------------------------


def test_export_after_rollback_streams_restored_rows_and_initial_values_of_removed_ones(tmp_path: Path):
    spec = TableSpec("t", DIM, optimizer=AdagradConfig(0.1), host_capacity=50)
    table = TieredTable(spec, data_dir=str(tmp_path / "db"))
    old, new = _fids(2, 60), _fids(2, 20, start=1000)
    _push_all(table, _steps(9, [old]))
    table.checkpoint(TAG)
    at_checkpoint = table.pull(old)
    changed = old[::4]
    _push_all(table, _steps(10, [changed, new]))  # demotes (and checkpoints) on the way
    before = table.version

    table.rollback(TAG)

    assert table.version == before + len(changed) + len(new)
    fids, values, versions = _drain(table, before, 7)
    assert np.all(np.diff(versions) > 0) and versions.min() > before and versions.max() == table.version
    got = dict(zip(fids.tolist(), values, strict=True))
    assert sorted(got) == sorted([*changed.tolist(), *new.tolist()])
    np.testing.assert_array_equal(np.stack([got[f] for f in changed.tolist()]), at_checkpoint[::4])
    np.testing.assert_array_equal(np.stack([got[f] for f in new.tolist()]), _initial(spec, new))

    # A full export agrees with pulls: every fid once, removed ones at their initial value.
    fids, values, _ = _drain(table, 0, 7)
    assert len(np.unique(fids)) == len(fids) == len(old) + len(new)
    np.testing.assert_array_equal(values, table.pull(fids))

    # A removed fid that gets a row again is exported as that row, once.
    table.push(new[:1], np.ones((1, DIM), np.float32))
    fids, values, versions = _drain(table, 0, 7)
    assert (fids == new[0]).sum() == 1 and versions[fids == new[0]][0] == table.version
    np.testing.assert_array_equal(values, table.pull(fids))
    table.checkpoint()
    assert new[0] not in table._dropped_fids.tolist()
    table.close()


# -- errors ---------------------------------------------------------------------------------------------


def test_rollback_to_another_tag_raises_naming_both_tags_and_changes_nothing(tmp_path: Path):
    spec = _spec()
    table = TieredTable(spec, data_dir=str(tmp_path / "db"))
    _push_all(table, _before())
    table.checkpoint(TAG)
    _push_all(table, _after())
    values, version = table.pull(_probe()), table.version

    with pytest.raises(RollbackError, match=r"expected checkpoint tag 'trainer@999'.*tag is 'trainer@1234'"):
        table.rollback(expected_tag="trainer@999")

    np.testing.assert_array_equal(table.pull(_probe()), values)
    assert table.version == version
    table.close()


def test_rollback_without_a_data_dir_raises_rollback_error():
    table = TieredTable(_spec())
    with pytest.raises(RollbackError, match="no data dir"):
        table.rollback()
