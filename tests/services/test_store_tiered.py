"""TieredTable end to end: optimizers through push, admission, TTL, host/RocksDB tiers, device cache,
export across tiers, checkpoints and table configs. Storage runs on real RocksDB in ``tmp_path``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

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


def _fids(slot: int, n: int, start: int = 1) -> np.ndarray:
    return np.array([make_fid(slot, v) for v in range(start, start + n)], np.int64)


def _initial(spec: TableSpec, fids: np.ndarray) -> np.ndarray:
    return initial_values(np.asarray(fids, np.int64), spec.dim, spec.init_scale, spec.seed)


def _grads(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    return rng.normal(size=(n, dim)).astype(np.float32)


def _host_values(table: TieredTable, fids: np.ndarray) -> np.ndarray:
    out = np.zeros((len(fids), table.spec.dim), np.float32)
    table.host.find_gather(fids, out)
    return out


def _in_host(table: TieredTable, fids: np.ndarray) -> np.ndarray:
    return table.host.find(np.asarray(fids, np.int64)) >= 0


class _Clock:
    """An injectable clock: whole seconds, moved by the test."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- optimizers through push --------------------------------------------------------------------------

OPTIMIZERS = [
    pytest.param(SGDConfig(learning_rate=0.1), id="sgd"),
    pytest.param(AdagradConfig(learning_rate=0.1, initial_accumulator=0.1, eps=1e-8), id="adagrad"),
    pytest.param(RowwiseAdagradConfig(learning_rate=0.1, initial_accumulator=0.2, eps=1e-8), id="rowwise_adagrad"),
    pytest.param(FTRLConfig(alpha=0.1, beta=1.0, l1=0.01, l2=0.1), id="ftrl"),
    pytest.param(AdamConfig(learning_rate=0.01, beta1=0.9, beta2=0.99, eps=1e-8), id="adam"),
]


@pytest.mark.parametrize("cfg", OPTIMIZERS)
def test_push_equals_the_optimizer_applied_directly_to_summed_duplicate_gradients(cfg):
    spec = TableSpec("t", DIM, optimizer=cfg, init_scale=0.05, seed=7)
    table = TieredTable(spec)
    opt = make_optimizer(cfg)
    rng = np.random.default_rng(10)
    pool = np.concatenate([_fids(1, 20), _fids(9, 10, start=2**40)])
    ref_values: dict[int, np.ndarray] = {}
    ref_state: dict[int, np.ndarray] = {}
    for _ in range(8):
        fids = rng.choice(pool, 24)  # duplicates within a push
        grads = _grads(rng, 24)
        table.push(fids, grads)
        unique, inverse = np.unique(fids, return_inverse=True)
        summed = np.zeros((len(unique), DIM), np.float32)
        np.add.at(summed, inverse, grads)  # in occurrence order, float32, as the table sums
        for fid in unique.tolist():
            if fid not in ref_values:
                ref_values[fid] = _initial(spec, np.array([fid]))[0]
                ref_state[fid] = opt.init_state(1, DIM)[0]
        values = np.stack([ref_values[f] for f in unique.tolist()])
        state = np.stack([ref_state[f] for f in unique.tolist()])
        opt.apply(values, state, summed)
        for i, fid in enumerate(unique.tolist()):
            ref_values[fid], ref_state[fid] = values[i], state[i]

    seen = np.array(sorted(ref_values), np.int64)
    np.testing.assert_array_equal(table.pull(seen), np.stack([ref_values[f] for f in seen.tolist()]))
    rows = table.host.find(seen)
    np.testing.assert_array_equal(
        table.host.floats[rows, 2 + DIM :], np.stack([ref_state[f] for f in seen.tolist()]).reshape(len(seen), -1)
    )
    assert len(table) == len(seen)


# -- admission ------------------------------------------------------------------------------------------


def _admission_spec(**kw) -> TableSpec:
    return TableSpec(
        "t",
        DIM,
        optimizer=SGDConfig(learning_rate=0.5),
        slots={1: SlotPolicy(admission=CountAdmissionConfig(min_count=3, sketch_width=1 << 12))},
        **kw,
    )


def test_count_admission_drops_gradients_until_the_third_occurrence_then_the_row_learns():
    spec = _admission_spec()
    table = TieredTable(spec)
    gated, free = make_fid(1, 77), make_fid(2, 77)
    both = np.array([gated, free], np.int64)
    g = np.ones((2, DIM), np.float32)

    table.push(both, g)  # the slot without admission gets its row at once
    assert len(table) == 1 and _in_host(table, [free]).all()
    np.testing.assert_array_equal(table.pull(np.array([free])), _initial(spec, [free]) - 0.5)
    np.testing.assert_array_equal(table.pull(np.array([gated])), _initial(spec, [gated]))
    assert table.stats["dropped_grads"] == 1

    table.push(np.array([gated]), g[:1])  # second occurrence: still dropped
    np.testing.assert_array_equal(table.pull(np.array([gated])), _initial(spec, [gated]))
    assert table.stats["dropped_grads"] == 2 and len(table) == 1

    table.push(np.array([gated]), g[:1])  # third occurrence: admitted, and this gradient applies
    assert len(table) == 2 and table.stats["dropped_grads"] == 2
    np.testing.assert_array_equal(table.pull(np.array([gated])), _initial(spec, [gated]) - 0.5)
    table.push(np.array([gated]), g[:1])
    np.testing.assert_array_equal(table.pull(np.array([gated])), _initial(spec, [gated]) - 1.0)


def test_repeats_of_a_fid_within_one_push_count_as_one_occurrence_for_admission():
    spec = _admission_spec()
    table = TieredTable(spec)
    gated = make_fid(1, 5)
    table.push(np.array([gated] * 5), np.ones((5, DIM), np.float32))
    assert len(table) == 0 and table.stats["dropped_grads"] == 1


def test_probabilistic_admission_at_one_half_admits_about_half_of_the_distinct_fids():
    spec = TableSpec(
        "t",
        DIM,
        optimizer=SGDConfig(),
        slots={3: SlotPolicy(admission=ProbabilisticAdmissionConfig(probability=0.5, seed=1))},
    )
    table = TieredTable(spec)
    fids = _fids(3, 10_000)
    table.push(fids, np.ones((len(fids), DIM), np.float32))
    assert 4_700 <= len(table) <= 5_300  # 6 standard deviations
    assert table.stats["admitted"] == len(table)
    assert table.stats["dropped_grads"] == 10_000 - len(table)
    admitted = _in_host(table, fids)
    np.testing.assert_array_equal(table.pull(fids[~admitted]), _initial(spec, fids[~admitted]))


# -- TTL --------------------------------------------------------------------------------------------------


def test_ttl_evicts_only_rows_of_the_ttl_slot_not_pushed_for_longer_than_the_ttl():
    clock = _Clock()
    spec = TableSpec("t", DIM, optimizer=SGDConfig(0.5), slots={1: SlotPolicy(ttl_s=10)})
    table = TieredTable(spec, clock=clock)
    old, recent, no_ttl = _fids(1, 5), _fids(1, 5, start=100), _fids(2, 5)
    ones = np.ones((5, DIM), np.float32)
    table.push(old, ones)
    table.push(no_ttl, ones)
    clock.now += 5
    table.push(recent, ones)
    clock.now += 5
    assert table.evict_expired() == 0  # exactly 10 s is not more than the TTL
    clock.now += 1

    assert table.evict_expired() == 5
    assert table.stats["evicted_ttl"] == 5
    assert len(table) == 10
    assert not _in_host(table, old).any() and _in_host(table, recent).all() and _in_host(table, no_ttl).all()
    np.testing.assert_array_equal(table.pull(old), _initial(spec, old))
    np.testing.assert_array_equal(table.pull(recent), _initial(spec, recent) - 0.5)
    # Much later the slot without a TTL still keeps its rows.
    assert table.evict_expired(now=clock.now + 10**6) == 5
    assert _in_host(table, no_ttl).all()


def test_a_push_renews_a_rows_ttl():
    clock = _Clock()
    spec = TableSpec("t", DIM, optimizer=SGDConfig(0.5), slots={1: SlotPolicy(ttl_s=10)})
    table = TieredTable(spec, clock=clock)
    fid = _fids(1, 1)
    table.push(fid, np.ones((1, DIM), np.float32))
    clock.now += 8
    table.push(fid, np.ones((1, DIM), np.float32))
    clock.now += 8
    assert table.evict_expired() == 0
    np.testing.assert_array_equal(table.pull(fid), _initial(spec, fid) - 1.0)


def test_a_slot_configured_without_ttl_keeps_its_rows_when_the_default_policy_has_one():
    clock = _Clock()
    spec = TableSpec(
        "t", DIM, optimizer=SGDConfig(), default_policy=SlotPolicy(ttl_s=10), slots={2: SlotPolicy(ttl_s=None)}
    )
    table = TieredTable(spec, clock=clock)
    expiring, kept = _fids(1, 3), _fids(2, 3)
    table.push(np.concatenate([expiring, kept]), np.ones((6, DIM), np.float32))
    clock.now += 100
    table.evict_expired()
    assert not _in_host(table, expiring).any()
    assert _in_host(table, kept).all()


def test_a_ttl_evicted_row_reads_its_initial_value_even_after_it_was_checkpointed(tmp_path: Path):
    clock = _Clock()
    spec = TableSpec("t", DIM, optimizer=SGDConfig(0.5), slots={1: SlotPolicy(ttl_s=10)})
    table = TieredTable(spec, data_dir=str(tmp_path / "db"), clock=clock)
    fid = _fids(1, 1)
    table.push(fid, np.ones((1, DIM), np.float32))
    table.checkpoint()
    clock.now += 11
    assert table.evict_expired() == 1
    np.testing.assert_array_equal(table.pull(fid), _initial(spec, fid))


def test_a_row_pushed_again_after_its_ttl_eviction_survives_a_checkpoint_and_reopen(tmp_path: Path):
    clock = _Clock()
    spec = TableSpec("t", DIM, optimizer=SGDConfig(0.5), slots={1: SlotPolicy(ttl_s=10)})
    path = str(tmp_path / "db")
    table = TieredTable(spec, data_dir=path, clock=clock)
    fid = _fids(1, 1)
    table.push(fid, np.ones((1, DIM), np.float32))
    table.checkpoint()
    clock.now += 11
    table.evict_expired()
    table.push(fid, np.ones((1, DIM), np.float32))
    table.checkpoint()
    before = table.pull(fid)
    table.close()

    reopened = TieredTable(spec, data_dir=path, clock=clock)
    np.testing.assert_array_equal(reopened.pull(fid), before)
    reopened.close()


# -- host tier in front of RocksDB --------------------------------------------------------------------


def test_host_capacity_without_a_data_dir_raises_value_error():
    with pytest.raises(ValueError, match="data dir"):
        TieredTable(TableSpec("t", DIM, host_capacity=100))


def test_a_tiny_host_tier_demotes_to_rocksdb_and_every_fid_still_pulls_its_trained_value(tmp_path: Path):
    clock = _Clock()
    spec = TableSpec("t", DIM, optimizer=AdagradConfig(0.1), host_capacity=100)
    table = TieredTable(spec, data_dir=str(tmp_path / "db"), clock=clock)
    reference = TieredTable(TableSpec("t", DIM, optimizer=AdagradConfig(0.1)), clock=clock)
    rng = np.random.default_rng(20)
    fids = _fids(1, 1000)
    for chunk in np.array_split(fids, 20):
        grads = _grads(rng, len(chunk))
        table.push(chunk, grads)
        reference.push(chunk, grads)
        clock.now += 1
        assert len(table.host) <= 100

    assert table.stats["demoted"] >= 900
    in_host = int(_in_host(table, fids).sum())
    table.stats.clear()
    np.testing.assert_array_equal(table.pull(fids), reference.pull(fids))
    assert table.stats["cold_hits"] == 1000 - in_host
    assert table.stats["initial_reads"] == 0

    # A pushed cold fid is loaded back with its optimizer state and keeps learning.
    cold = fids[~_in_host(table, fids)][:3]
    grads = _grads(rng, 3)
    table.stats.clear()
    table.push(cold, grads)
    reference.push(cold, grads)
    assert table.stats["promoted"] == 3 and _in_host(table, cold).all()
    np.testing.assert_array_equal(table.pull(cold), reference.pull(cold))
    assert len(table.host) <= 100


def test_a_pulled_cold_fid_is_promoted_when_the_host_has_room(tmp_path: Path):
    spec = TableSpec("t", DIM, optimizer=SGDConfig(0.5), host_capacity=100)
    table = TieredTable(spec, data_dir=str(tmp_path / "db"))
    fids = _fids(1, 200)
    table.push(fids, np.ones((200, DIM), np.float32))
    assert len(table.host) == 95  # demoted down to 95 % of the capacity
    cold = fids[~_in_host(table, fids)][:2]
    table.stats.clear()
    np.testing.assert_array_equal(table.pull(cold), _initial(spec, cold) - 0.5)
    assert table.stats["cold_hits"] == 2 and table.stats["promoted"] == 2
    assert _in_host(table, cold).all()


@pytest.mark.parametrize("demotion", ["lfu", "lru"])
def test_demotion_keeps_the_most_frequently_or_the_most_recently_pushed_rows(tmp_path: Path, demotion: str):
    clock = _Clock()
    spec = TableSpec("t", DIM, optimizer=SGDConfig(0.1), host_capacity=100, demotion=demotion)
    table = TieredTable(spec, data_dir=str(tmp_path / "db"), clock=clock)
    hot = _fids(2, 20)
    for _ in range(10):  # early and often
        table.push(hot, np.ones((20, DIM), np.float32))
        clock.now += 1
    batches = np.array_split(_fids(1, 1000), 20)
    for batch in batches:  # later, once each
        table.push(batch, np.ones((len(batch), DIM), np.float32))
        clock.now += 1
        assert len(table.host) <= 100

    if demotion == "lfu":
        assert _in_host(table, hot).all()
    else:
        assert not _in_host(table, hot).any()
        assert _in_host(table, batches[-1]).all()
    # Ten steps of 0.1, each rounded to float32: equal to the exact sum within a few ulps.
    np.testing.assert_allclose(table.pull(hot), _initial(spec, hot) - 1.0, rtol=0, atol=1e-6)


# -- device cache ------------------------------------------------------------------------------------------


def _check_device_cache_serves_hot_rows_and_writes_through(device: str) -> None:
    spec = TableSpec("t", DIM, optimizer=AdagradConfig(0.1), device_cache_rows=8)
    table = TieredTable(spec, device=device)
    reference = TieredTable(TableSpec("t", DIM, optimizer=AdagradConfig(0.1)))
    rng = np.random.default_rng(30)
    fids = _fids(1, 40)
    hot = fids[[3, 7, 11, 15, 19, 23, 27, 31]]
    for batch in (hot, hot, hot, fids):
        grads = _grads(rng, len(batch))
        table.push(batch, grads)
        reference.push(batch, grads)

    assert table.refresh_cache() == 8
    assert set(table.cache.fids.tolist()) == set(hot.tolist())
    table.stats.clear()
    np.testing.assert_array_equal(table.pull(fids), _host_values(table, fids))
    assert table.stats["cache_hits"] == 8 and table.stats["host_hits"] == 32

    grads = _grads(rng, 2)
    table.push(hot[:2], grads)
    reference.push(hot[:2], grads)
    table.stats.clear()
    np.testing.assert_array_equal(table.pull(hot), reference.pull(hot))
    np.testing.assert_array_equal(table.pull(hot), _host_values(table, hot))
    assert table.stats["cache_hits"] == 16


def test_device_cache_on_cpu_serves_the_hottest_rows_with_host_values_and_writes_through():
    _check_device_cache_serves_hot_rows_and_writes_through("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_cache_on_cuda_serves_the_hottest_rows_with_host_values_and_writes_through():
    _check_device_cache_serves_hot_rows_and_writes_through("cuda")


def test_a_ttl_evicted_row_is_never_served_from_the_device_cache():
    clock = _Clock()
    spec = TableSpec("t", DIM, optimizer=SGDConfig(0.5), slots={1: SlotPolicy(ttl_s=10)}, device_cache_rows=8)
    table = TieredTable(spec, clock=clock, device="cpu")
    expiring, staying = _fids(1, 4), _fids(2, 4)
    table.push(np.concatenate([expiring, staying]), np.ones((8, DIM), np.float32))
    table.refresh_cache()
    assert set(table.cache.fids.tolist()) == set(np.concatenate([expiring, staying]).tolist())
    clock.now += 11
    assert table.evict_expired() == 4

    table.stats.clear()
    np.testing.assert_array_equal(table.pull(expiring), _initial(spec, expiring))
    assert table.stats["cache_hits"] == 0 and table.stats["initial_reads"] == 4
    np.testing.assert_array_equal(table.pull(staying), _initial(spec, staying) - 0.5)
    # Pushed again, an evicted fid starts from its initial value, not from the cached one.
    table.push(expiring[:1], np.ones((1, DIM), np.float32))
    np.testing.assert_array_equal(table.pull(expiring[:1]), _initial(spec, expiring[:1]) - 0.5)


def test_a_demoted_row_is_never_served_from_the_device_cache(tmp_path: Path):
    clock = _Clock()
    spec = TableSpec("t", DIM, optimizer=AdagradConfig(0.1), demotion="lru", device_cache_rows=8)
    table = TieredTable(spec, data_dir=str(tmp_path / "db"), clock=clock, device="cpu")
    reference = TieredTable(TableSpec("t", DIM, optimizer=AdagradConfig(0.1)))
    rng = np.random.default_rng(31)
    hot, rest = _fids(1, 8), _fids(1, 32, start=100)
    for batch in (hot, hot, hot):
        grads = _grads(rng, 8)
        table.push(batch, grads)
        reference.push(batch, grads)
    clock.now += 5
    grads = _grads(rng, 32)
    table.push(rest, grads)
    reference.push(rest, grads)
    table.refresh_cache()
    assert set(table.cache.fids.tolist()) == set(hot.tolist())

    assert table.demote(8) == 8  # LRU: the hot rows were pushed longest ago
    assert not _in_host(table, hot).any()
    assert (table.cache.find(hot) == -1).all()
    table.stats.clear()
    np.testing.assert_array_equal(table.pull(hot), reference.pull(hot))
    assert table.stats["cache_hits"] == 0 and table.stats["cold_hits"] == 8

    grads = _grads(rng, 8)
    table.push(hot, grads)
    reference.push(hot, grads)
    np.testing.assert_array_equal(table.pull(hot), reference.pull(hot))


# -- export across tiers ----------------------------------------------------------------------------------


def _drain(table: TieredTable, since: int, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fids, values, versions = [], [], []
    for _ in range(1000):
        page = table.export(since, limit)
        assert len(page.fids) <= limit
        fids.append(page.fids)
        values.append(page.values)
        versions.append(page.versions)
        since = page.next_version
        if not page.has_more:
            break
    return np.concatenate(fids), np.concatenate(values), np.concatenate(versions)


def test_export_pages_through_host_and_rocksdb_rows_once_each_in_version_order(tmp_path: Path):
    clock = _Clock()
    spec = TableSpec("t", DIM, optimizer=AdagradConfig(0.1), host_capacity=100)
    table = TieredTable(spec, data_dir=str(tmp_path / "db"), clock=clock)
    reference = TieredTable(TableSpec("t", DIM, optimizer=AdagradConfig(0.1)))
    rng = np.random.default_rng(40)
    all_fids = _fids(1, 300)
    latest: dict[int, int] = {}
    version = 0

    def push(fids: np.ndarray) -> None:
        nonlocal version
        grads = _grads(rng, len(fids))
        table.push(fids, grads)
        reference.push(fids, grads)
        for fid in np.unique(fids).tolist():  # versions go to distinct fids in sorted order
            version += 1
            latest[fid] = version
        clock.now += 1

    for chunk in np.array_split(all_fids, 10):
        push(chunk)
    push(all_fids[::7])  # some demoted rows come back with newer versions
    assert table.version == version
    assert _in_host(table, all_fids).sum() <= 100  # most rows were demoted before any export

    fids, values, versions = _drain(table, 0, limit=37)
    assert len(np.unique(fids)) == len(fids) == 300
    assert np.all(np.diff(versions) > 0)
    assert versions.tolist() == [latest[f] for f in fids.tolist()]
    np.testing.assert_array_equal(values, reference.pull(fids))

    since = version - 50
    fids, _, versions = _drain(table, since, limit=16)
    assert sorted(fids.tolist()) == sorted(f for f, v in latest.items() if v > since)
    assert np.all(np.diff(versions) > 0)


# -- checkpoints ----------------------------------------------------------------------------------------


def _checkpoint_spec() -> TableSpec:
    return TableSpec(
        "t",
        DIM,
        optimizer=AdamConfig(learning_rate=0.05),
        slots={1: SlotPolicy(admission=CountAdmissionConfig(min_count=3, sketch_width=1 << 12))},
    )


def test_reopening_after_a_checkpoint_restores_info_rows_optimizer_state_and_admission(tmp_path: Path):
    spec = _checkpoint_spec()
    path = str(tmp_path / "db")
    table = TieredTable(spec, data_dir=path)
    reference = TieredTable(spec)
    rng = np.random.default_rng(50)
    rows = _fids(2, 30)
    gated = np.array([make_fid(1, 9)], np.int64)
    for batch in (rows, rows[::2], gated, rows[5:], gated):  # gated seen twice: counted, not admitted
        grads = _grads(rng, len(batch))
        table.push(batch, grads)
        reference.push(batch, grads)
    assert not _in_host(table, gated).any()

    info = table.checkpoint(tag="seq=42")
    values = table.pull(rows)
    table.close()

    restored = TieredTable(spec, data_dir=path)
    assert restored.checkpoint_info == info
    assert (restored.checkpoint_info.checkpoint_id, restored.checkpoint_info.tag) == (info.checkpoint_id, "seq=42")
    assert restored.version == info.version == reference.version
    np.testing.assert_array_equal(restored.pull(rows), values)

    grads = _grads(rng, len(rows))
    restored.push(rows, grads)  # Adam's moments and step counters continue
    reference.push(rows, grads)
    np.testing.assert_array_equal(restored.pull(rows), reference.pull(rows))

    g = _grads(rng, 1)
    restored.push(gated, g)  # third occurrence, counting the two before the restart
    reference.push(gated, g)
    assert _in_host(restored, gated).all()
    np.testing.assert_array_equal(restored.pull(gated), reference.pull(gated))
    assert not np.array_equal(restored.pull(gated), _initial(spec, gated))
    restored.close()


def test_changes_after_the_last_checkpoint_are_lost_after_a_crash(tmp_path: Path):
    spec = _checkpoint_spec()
    path = str(tmp_path / "db")
    table = TieredTable(spec, data_dir=path)
    rng = np.random.default_rng(51)
    rows, later = _fids(2, 20), _fids(2, 5, start=1000)
    table.push(rows, _grads(rng, 20))
    info = table.checkpoint(tag="seq=1")
    values = table.pull(rows)
    table.push(rows, _grads(rng, 20))
    table.push(later, _grads(rng, 5))
    assert not np.array_equal(table.pull(rows), values)
    table.cold.close()  # a crash: no checkpoint, no orderly close

    reopened = TieredTable(spec, data_dir=path)
    assert reopened.checkpoint_info == info
    assert reopened.version == info.version
    np.testing.assert_array_equal(reopened.pull(rows), values)
    np.testing.assert_array_equal(reopened.pull(later), _initial(spec, later))
    reopened.close()


def test_a_snapshot_directory_opens_as_a_table_identical_to_the_snapshot(tmp_path: Path):
    spec = _checkpoint_spec()
    table = TieredTable(spec, data_dir=str(tmp_path / "db"))
    rng = np.random.default_rng(52)
    rows = _fids(2, 25)
    gated = np.array([make_fid(1, 3)], np.int64)
    table.push(rows, _grads(rng, 25))
    table.push(gated, _grads(rng, 1))
    table.push(gated, _grads(rng, 1))
    dest = str(tmp_path / "snap")
    info = table.snapshot(dest, tag="seq=7")
    values = table.pull(rows)
    table.push(rows, _grads(rng, 25))  # later writes to the source do not reach the snapshot
    table.checkpoint()

    copy = TieredTable(spec, data_dir=dest)
    assert copy.checkpoint_info == info and copy.version == info.version
    np.testing.assert_array_equal(copy.pull(rows), values)
    copy.push(gated, _grads(rng, 1))  # the admission counts came along too
    assert _in_host(copy, gated).all()
    copy.close()
    table.close()


def test_checkpoint_without_a_data_dir_raises_runtime_error():
    with pytest.raises(RuntimeError, match="no data dir"):
        TieredTable(TableSpec("t", DIM)).checkpoint()


# -- table configs -----------------------------------------------------------------------------------------


def test_table_from_dict_parses_a_full_config():
    spec = table_from_dict(
        {
            "name": "fm",
            "dim": 9,
            "optimizer": {"name": "ftrl", "alpha": 0.2, "l1": 0.5},
            "init_scale": 0.02,
            "seed": 3,
            "default_policy": {
                "admission": {"kind": "count", "min_count": 2, "sketch_width": 4096},
                "ttl_s": 86400,
            },
            "slots": {
                "1": {"ttl_s": 3600},
                "2": {"admission": {"kind": "probabilistic", "probability": 0.25, "seed": 9}},
            },
            "host_capacity": 1_000_000,
            "demotion": "lru",
            "device_cache_rows": 16,
            "initial_rows": 64,
        }
    )
    assert spec == TableSpec(
        name="fm",
        dim=9,
        optimizer=FTRLConfig(alpha=0.2, l1=0.5),
        init_scale=0.02,
        seed=3,
        default_policy=SlotPolicy(admission=CountAdmissionConfig(min_count=2, sketch_width=4096), ttl_s=86400),
        slots={
            1: SlotPolicy(ttl_s=3600),
            2: SlotPolicy(admission=ProbabilisticAdmissionConfig(probability=0.25, seed=9)),
        },
        host_capacity=1_000_000,
        demotion="lru",
        device_cache_rows=16,
        initial_rows=64,
    )
    assert spec.policy(1).ttl_s == 3600 and spec.policy(7) == spec.default_policy


@pytest.mark.parametrize(
    ("config", "named"),
    [
        pytest.param(
            {"name": "fm", "dim": 4, "hidden": 1, "capacity": 2}, r"\['capacity', 'hidden'\]", id="table"
        ),
        pytest.param({"name": "fm", "dim": 4, "default_policy": {"ttl": 5}}, "ttl", id="default_policy"),
        pytest.param({"name": "fm", "dim": 4, "slots": {"1": {"ttl_s": 5, "evict": 1}}}, "evict", id="slot"),
        pytest.param({"name": "fm", "dim": 4, "optimizer": {"name": "sgd", "lr": 0.1}}, "lr", id="optimizer"),
        pytest.param(
            {"name": "fm", "dim": 4, "default_policy": {"admission": {"kind": "bloom"}}},
            "bloom",
            id="admission_kind",
        ),
    ],
)
def test_table_from_dict_rejects_unknown_keys_naming_them(config, named):
    with pytest.raises(ValueError, match=named):
        table_from_dict(config)


def test_table_from_dict_rejects_an_unknown_admission_key_with_value_error():
    with pytest.raises(ValueError, match="min_cnt"):
        table_from_dict({"name": "fm", "dim": 4, "default_policy": {"admission": {"kind": "count", "min_cnt": 2}}})


def test_a_table_from_dict_config_runs_with_count_admission_and_capacity(tmp_path: Path):
    spec = table_from_dict(
        {
            "name": "fm",
            "dim": DIM,
            "optimizer": {"name": "adagrad", "learning_rate": 0.2},
            "default_policy": {"admission": {"kind": "count", "min_count": 2, "sketch_width": 4096}},
            "host_capacity": 50,
        }
    )
    table = TieredTable(spec, data_dir=str(tmp_path / "db"))
    fids = _fids(4, 80)
    for _ in range(2):
        table.push(fids, np.ones((80, DIM), np.float32))
    assert table.stats["admitted"] == 80 and len(table.host) <= 50
    assert not np.array_equal(table.pull(fids), _initial(spec, fids))
    table.close()


def test_push_counts_grow_row_frequencies_by_the_samples_behind_each_gradient():
    from services.store.tables import TableSpec
    from services.store.tiered import TieredTable

    table = TieredTable(TableSpec("f", 2))
    fids = np.array([5, 9, 5], np.int64)
    table.push(fids, np.zeros((3, 2), np.float32), counts=np.array([3, 1, 2], np.int32))
    table.push(np.array([9], np.int64), np.zeros((1, 2), np.float32))  # no counts: one per entry
    rows = table.host.find(np.array([5, 9], np.int64))
    assert table.host.freqs[rows].tolist() == [5, 2]
