"""TieredTable behaviour: admission, TTL, demotion/promotion with a tiny host tier, export, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from freshet.fids import make_fid
from services.store.admission import CountAdmissionConfig, ProbabilisticAdmissionConfig
from services.store.optimizers import (
    AdagradConfig,
    AdamConfig,
    FTRLConfig,
    RowwiseAdagradConfig,
    SGDConfig,
    make_optimizer,
)
from services.store.table import initial_values
from services.store.tables import SlotPolicy, TableSpec, table_from_dict
from services.store.tiered import TieredTable

DIM = 4


def fids_of_slot(slot: int, values) -> np.ndarray:
    return np.array([make_fid(slot, v) for v in values], np.int64)


def initial(table: TieredTable, fids: np.ndarray) -> np.ndarray:
    return initial_values(fids, table.spec.dim, table.spec.init_scale, table.spec.seed)


@pytest.mark.parametrize(
    "optimizer",
    [SGDConfig(0.1), AdagradConfig(0.1), RowwiseAdagradConfig(0.1), FTRLConfig(0.1), AdamConfig(0.01)],
    ids=lambda c: type(c).__name__,
)
def test_push_applies_the_tables_optimizer_to_summed_gradients(optimizer):
    table = TieredTable(TableSpec("t", DIM, optimizer=optimizer))
    rng = np.random.default_rng(0)
    fids = np.array([5, 7, 5, 9], np.int64)
    opt = make_optimizer(optimizer)
    unique = np.array([5, 7, 9], np.int64)
    values = initial(table, unique)
    state = opt.init_state(3, DIM)
    for _ in range(3):
        grads = rng.normal(size=(4, DIM)).astype(np.float32)
        table.push(fids, grads)
        summed = np.stack([grads[0] + grads[2], grads[1], grads[3]]).astype(np.float32)
        opt.apply(values, state, summed)
    np.testing.assert_allclose(table.pull(unique), values, rtol=1e-6, atol=1e-7)


def test_count_admission_drops_gradients_until_the_min_count_th_occurrence():
    spec = TableSpec("t", DIM, slots={7: SlotPolicy(admission=CountAdmissionConfig(min_count=3))})
    table = TieredTable(spec)
    gated, free = fids_of_slot(7, [1, 2]), fids_of_slot(8, [1])
    grads = np.ones((2, DIM), np.float32)
    for occurrence in (1, 2):
        table.push(gated, grads)
        assert len(table) == 0 if occurrence == 1 else len(table) == 1  # the free slot's row exists
        np.testing.assert_array_equal(table.pull(gated), initial(table, gated))
        if occurrence == 1:
            table.push(free, grads[:1])
    assert table.stats["dropped_grads"] == 4
    table.push(gated, grads)  # the third occurrence: admitted and trained
    assert len(table) == 3
    assert not np.allclose(table.pull(gated), initial(table, gated))


def test_probabilistic_admission_admits_about_the_configured_share():
    spec = TableSpec("t", DIM, default_policy=SlotPolicy(admission=ProbabilisticAdmissionConfig(probability=0.5)))
    table = TieredTable(spec)
    fids = np.arange(1, 10_001, dtype=np.int64)
    table.push(fids, np.ones((len(fids), DIM), np.float32))
    assert 4_700 < len(table) < 5_300
    assert table.stats["dropped_grads"] == 10_000 - len(table)


def test_ttl_evicts_only_stale_rows_of_slots_with_a_ttl():
    now = [1_000.0]
    spec = TableSpec("t", DIM, slots={1: SlotPolicy(ttl_s=10)})
    table = TieredTable(spec, clock=lambda: now[0])
    stale, fresh, forever = fids_of_slot(1, [1, 2]), fids_of_slot(1, [3]), fids_of_slot(2, [1])
    grads = np.ones((2, DIM), np.float32)
    table.push(stale, grads)
    table.push(forever, grads[:1])
    now[0] += 8
    table.push(fresh, grads[:1])
    now[0] += 5  # stale rows: 13 s unseen; fresh: 5 s; slot 2 has no TTL
    assert table.evict_expired() == 2
    assert table.stats["evicted_ttl"] == 2
    np.testing.assert_array_equal(table.pull(stale), initial(table, stale))
    assert not np.allclose(table.pull(fresh), initial(table, fresh))
    assert not np.allclose(table.pull(forever), initial(table, forever))


@pytest.mark.parametrize("demotion", ["lfu", "lru"])
def test_tiny_host_tier_demotes_to_rocksdb_and_promotes_back(demotion, tmp_path):
    now = [0.0]
    spec = TableSpec("t", DIM, host_capacity=100, demotion=demotion)
    table = TieredTable(spec, data_dir=str(tmp_path / "db"), clock=lambda: now[0])
    fids = np.arange(1, 1_001, dtype=np.int64)
    grads = np.full((1000, DIM), 0.1, np.float32)
    hot = fids[:50] if demotion == "lfu" else fids[-50:]
    if demotion == "lfu":
        for _ in range(5):
            table.push(hot, grads[:50])
    for i in range(0, 1000, 100):
        now[0] += 1
        table.push(fids[i : i + 100], grads[i : i + 100])
    assert len(table) <= 100
    assert table.stats["demoted"] >= 900
    # Every row reads its trained value, from the host or from RocksDB.
    trained = table.pull(fids)
    assert not np.isclose(trained, initial(table, fids)).all(axis=1).any()
    assert table.stats["cold_hits"] > 0
    # The hot rows (most frequent for LFU, most recent for LRU) stayed in the host.
    assert (table.host.find(hot) >= 0).all()
    # Pushing a cold row brings it back (promotion) and it keeps learning from its cold value.
    cold = fids[np.flatnonzero(table.host.find(fids) < 0)[:10]]
    before = table.pull(cold)
    now[0] += 1
    table.push(cold, grads[:10])
    assert table.stats["promoted"] >= 10
    assert (table.host.find(cold) >= 0).all()
    assert not np.allclose(table.pull(cold), before)


def test_host_capacity_needs_a_data_dir():
    with pytest.raises(ValueError, match="data dir"):
        TieredTable(TableSpec("t", DIM, host_capacity=10))


def test_export_pages_through_host_and_rocksdb_rows_once_in_version_order(tmp_path):
    table = TieredTable(TableSpec("t", DIM, host_capacity=50), data_dir=str(tmp_path / "db"))
    fids = np.arange(1, 301, dtype=np.int64)
    for i in range(0, 300, 30):
        table.push(fids[i : i + 30], np.ones((30, DIM), np.float32))
    seen, since, pages = [], 0, 0
    while True:
        page = table.export(since, 37)
        assert np.all(np.diff(page.versions) > 0)
        seen.extend(page.fids.tolist())
        since = page.next_version
        pages += 1
        if not page.has_more:
            break
    assert sorted(seen) == fids.tolist() and pages > 1
    assert since == table.version


def test_restart_restores_the_last_checkpoint_with_its_tag_state_and_admission(tmp_path):
    spec = TableSpec(
        "t",
        DIM,
        optimizer=AdagradConfig(0.1),
        default_policy=SlotPolicy(admission=CountAdmissionConfig(min_count=3)),
    )
    path = str(tmp_path / "db")
    table = TieredTable(spec, data_dir=path)
    fids = np.arange(1, 101, dtype=np.int64)
    pending = np.array([5_000], np.int64)
    grads = np.full((100, DIM), 0.3, np.float32)
    for _ in range(3):
        table.push(fids, grads)
    table.push(pending, grads[:1])
    table.push(pending, grads[:1])  # counted twice, not admitted yet
    info = table.checkpoint(tag="samples.0@42")
    values = table.pull(fids)
    table.push(fids, grads)  # after the checkpoint: lost in the crash below
    reference = table.pull(fids)
    table.cold.close()  # a crash: no further checkpoint

    restored = TieredTable(spec, data_dir=path)
    assert restored.checkpoint_info == info and restored.version == info.version
    np.testing.assert_array_equal(restored.pull(fids), values)
    restored.push(fids, grads)  # optimizer state came back: same result as before the crash
    np.testing.assert_allclose(restored.pull(fids), reference, rtol=1e-6)
    restored.push(pending, grads[:1])  # the third occurrence across the restart
    assert (restored.host.find(pending) >= 0).all()
    restored.close()


def test_snapshot_is_a_self_contained_copy(tmp_path):
    table = TieredTable(TableSpec("t", DIM), data_dir=str(tmp_path / "db"))
    fids = np.arange(1, 51, dtype=np.int64)
    table.push(fids, np.ones((50, DIM), np.float32))
    info = table.snapshot(str(tmp_path / "snap"), tag="full")
    values = table.pull(fids)
    table.push(fids, np.ones((50, DIM), np.float32))
    copy = TieredTable(TableSpec("t", DIM), data_dir=str(tmp_path / "snap"))
    assert copy.checkpoint_info == info
    np.testing.assert_array_equal(copy.pull(fids), values)


def test_checkpoint_without_a_data_dir_is_an_error():
    with pytest.raises(RuntimeError, match="data dir"):
        TieredTable(TableSpec("t", DIM)).checkpoint()


def test_table_config_parses_from_json_like_data_and_rejects_unknown_keys():
    spec = table_from_dict(
        {
            "name": "fm",
            "dim": 9,
            "optimizer": {"name": "ftrl", "alpha": 0.1},
            "default_policy": {"admission": {"kind": "count", "min_count": 2}, "ttl_s": 3600},
            "slots": {"1": {"ttl_s": 60}, "2": {"admission": {"kind": "probabilistic", "probability": 0.2}}},
            "host_capacity": 1000,
            "demotion": "lru",
        }
    )
    assert spec.optimizer == FTRLConfig(alpha=0.1)
    assert spec.policy(1).ttl_s == 60 and spec.policy(3).admission == CountAdmissionConfig(min_count=2)
    assert spec.policy(2).admission == ProbabilisticAdmissionConfig(probability=0.2)
    with pytest.raises(ValueError, match="colour"):
        table_from_dict({"name": "fm", "dim": 9, "colour": "red"})
    with pytest.raises(ValueError, match="demotion"):
        table_from_dict({"name": "fm", "dim": 9, "demotion": "random"})
