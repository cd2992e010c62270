"""The device cache on CPU and (when present) CUDA: same values as the host, write-through, no stale rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.store.device_cache import DeviceCache
from services.store.optimizers import AdagradConfig
from services.store.table import initial_values
from services.store.tables import SlotPolicy, TableSpec
from services.store.tiered import TieredTable

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


def _table(device: str, cache_rows: int = 8, **spec) -> TieredTable:
    return TieredTable(
        TableSpec("t", 4, optimizer=AdagradConfig(learning_rate=0.1), device_cache_rows=cache_rows, **spec),
        device=device,
    )


def _host_values(table: TieredTable, fids: np.ndarray) -> np.ndarray:
    out = np.zeros((len(fids), table.spec.dim), np.float32)
    table.host.find_gather(fids, out)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_cache_lives_on_the_requested_device(device):
    cache = DeviceCache(16, 4, device)
    assert cache.values.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_refresh_caches_the_most_frequently_pushed_rows_and_serves_the_host_values(device):
    table = _table(device)
    fids = np.arange(1, 41, dtype=np.int64)
    grads = np.ones((40, 4), np.float32)
    for _ in range(3):
        table.push(fids[:8], grads[:8])  # the hot ones
    table.push(fids, grads)
    assert table.refresh_cache() == 8
    assert set(table.cache.fids.tolist()) == set(fids[:8].tolist())
    table.stats.clear()
    assert np.array_equal(table.pull(fids), _host_values(table, fids))
    assert table.stats["cache_hits"] == 8 and table.stats["host_hits"] == 32


@pytest.mark.parametrize("device", DEVICES)
def test_a_push_to_a_cached_row_is_visible_in_the_next_pull(device):
    table = _table(device)
    fids = np.arange(1, 9, dtype=np.int64)
    table.push(fids, np.ones((8, 4), np.float32))
    table.refresh_cache()
    before = table.pull(fids)
    table.push(fids[:3], np.full((3, 4), -2.0, np.float32))
    after = table.pull(fids)
    assert not np.allclose(after[:3], before[:3])
    assert np.array_equal(after, _host_values(table, fids))


@pytest.mark.parametrize("device", DEVICES)
def test_an_evicted_row_is_never_served_from_the_cache(device):
    now = [1000.0]
    table = TieredTable(
        TableSpec("t", 4, device_cache_rows=8, default_policy=SlotPolicy(ttl_s=10)),
        device=device,
        clock=lambda: now[0],
    )
    fids = np.arange(1, 9, dtype=np.int64)
    table.push(fids, np.ones((8, 4), np.float32))
    table.refresh_cache()
    now[0] += 60
    assert table.evict_expired() == 8

    assert np.array_equal(table.pull(fids), initial_values(fids, 4, table.spec.init_scale, table.spec.seed))


@pytest.mark.parametrize("device", DEVICES)
def test_a_demoted_row_is_never_served_stale_from_the_cache(device, tmp_path):
    table = TieredTable(
        TableSpec("t", 4, device_cache_rows=16, host_capacity=20), data_dir=str(tmp_path / "db"), device=device
    )
    fids = np.arange(1, 31, dtype=np.int64)
    table.push(fids[:20], np.ones((20, 4), np.float32))
    table.refresh_cache()
    table.push(fids[20:], np.ones((10, 4), np.float32))  # over capacity: some rows are demoted
    assert len(table) <= 20
    expected = table.pull(fids)
    table.push(fids, np.full((30, 4), 0.5, np.float32))  # promotes, updates, demotes again
    got = table.pull(fids)
    assert not np.allclose(got, expected)
    reopened_view = np.zeros_like(got)
    rows = table.host.find_gather(fids, reopened_view)
    assert np.array_equal(got[rows >= 0], reopened_view[rows >= 0])
