"""Store shards as real processes: sharded Pull/Push, kill -9 + restart from the last checkpoint, and rollback
to the last tagged checkpoint across a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from freshet.clients import ShardedStoreClient, StoreClient
from freshet.fids import shard_of
from freshet.natsserver import free_port
from freshet.testing import assert_eventually
from services.store.table import initial_values


class ShardProcess:
    """One ``python -m services.store`` shard on a free port."""

    def __init__(self, tmp_path, shard: int, num_shards: int, data_dir: str = "") -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "FRESHET_STORE_PORT": str(self.port),
            "FRESHET_STORE_SHARD": str(shard),
            "FRESHET_STORE_NUM_SHARDS": str(num_shards),
            "FRESHET_STORE_DATA_DIR": data_dir,
            "FRESHET_STORE_TABLES": "emb:4",
            "FRESHET_STORE_CHECKPOINT_INTERVAL_S": "0",
            "FRESHET_STORE_PORT_FILE": str(tmp_path / f"store-{shard}-{self.port}.port"),
        }
        self.log = tmp_path / f"store-{shard}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> ShardProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.store"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    async def serving(self) -> None:
        """Waits until the shard has bound its port (written after start-up), so a client's first call
        does not spend its deadline in gRPC's reconnect backoff while the process imports."""
        port_file = Path(self.env["FRESHET_STORE_PORT_FILE"])
        await assert_eventually(
            lambda: self.proc.poll() is None and port_file.exists(),
            timeout_s=60,
            message=f"store shard did not start; see {self.log}",
        )

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def shards(tmp_path):
    started: list[ShardProcess] = []

    async def start(shard: int, num_shards: int, data_dir: str = "") -> ShardProcess:
        proc = ShardProcess(tmp_path, shard, num_shards, data_dir).start()
        started.append(proc)
        await proc.serving()
        return proc

    yield start
    for proc in started:
        proc.stop()


async def test_sharded_client_splits_dedupes_and_merges_across_two_shard_processes(shards):
    procs = await asyncio.gather(shards(0, 2), shards(1, 2))
    rng = np.random.default_rng(0)
    fids = rng.integers(0, 2**62, 2000)
    fids = np.concatenate([fids, fids[:500]])  # duplicates, summed before the update
    owners = shard_of(fids, 2)
    assert set(owners.tolist()) == {0, 1}
    grads = rng.normal(size=(len(fids), 4)).astype(np.float32)
    async with ShardedStoreClient([p.address for p in procs]) as client:
        before = await client.pull("emb", fids)
        await client.push("emb", fids, grads)
        after = await client.pull("emb", fids)
        described = await client.describe()
    assert [d.shard for d in described] == [0, 1]
    assert sum(d.tables[0].rows for d in described) == len(np.unique(fids))
    # Every shard holds exactly its own fids.
    for d in described:
        assert d.tables[0].rows == len(np.unique(fids[owners == d.shard]))
    # Duplicated fids read the same row wherever they appear, and every row moved.
    assert np.array_equal(after[:500], after[2000:])
    assert not np.isclose(after, before).all(axis=1).any()


async def test_a_shard_rejects_fids_owned_by_another_shard(shards):
    proc = await shards(0, 2)
    fids = np.arange(100, dtype=np.int64)
    foreign = fids[shard_of(fids, 2) == 1]
    async with StoreClient(proc.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.pull("emb", foreign)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "belong to other shards" in err.value.details()


async def test_kill_9_loses_only_changes_after_the_checkpoint_and_reports_its_tag(shards, tmp_path):
    data_dir = str(tmp_path / "shard0")
    proc = await shards(0, 1, data_dir)
    fids = np.arange(1, 501, dtype=np.int64)
    grads = np.full((len(fids), 4), 0.5, np.float32)
    async with StoreClient(proc.address) as client:
        await client.push("emb", fids, grads)
        await client.push("emb", fids[:100], grads[:100])
        checkpointed = await client.pull("emb", fids)
        ckpt = await client.checkpoint("samples.0@1234")
        # Changes after the checkpoint: new rows and updates of old ones.
        await client.push("emb", fids[:250], grads[:250])
        await client.push("emb", np.arange(1000, 1100, dtype=np.int64), np.ones((100, 4), np.float32))
        later = await client.pull("emb", fids)
    assert not np.allclose(later[:250], checkpointed[:250])
    proc.kill9()

    restarted = await shards(0, 1, data_dir)
    async with StoreClient(restarted.address) as client:
        info = (await client.describe()).tables[0]
        assert info.checkpoint_id == ckpt.tables[0].checkpoint_id
        assert info.checkpoint_tag == "samples.0@1234"
        assert info.version == ckpt.tables[0].version
        assert np.array_equal(await client.pull("emb", fids), checkpointed)
        # Rows created after the checkpoint are gone: they read their initial value again.
        fresh = np.arange(1000, 1100, dtype=np.int64)
        assert np.array_equal(await client.pull("emb", fresh), initial_values(fresh, 4, scale=0.01))
        # Optimizer state came back too: the same push gives the same rows as before the crash.
        await client.push("emb", fids[:250], grads[:250])
        assert np.allclose(await client.pull("emb", fids[:250]), later[:250], rtol=1e-6)


async def test_rollback_after_a_graceful_restart_returns_to_the_tagged_checkpoint(shards, tmp_path):
    data_dir = str(tmp_path / "shard0")
    proc = await shards(0, 1, data_dir)
    fids, fresh = np.arange(1, 301, dtype=np.int64), np.arange(1000, 1050, dtype=np.int64)
    grads = np.full((len(fids), 4), 0.5, np.float32)
    async with StoreClient(proc.address) as client:
        await client.push("emb", fids, grads)
        checkpointed = await client.pull("emb", fids)
        ckpt = (await client.checkpoint("samples.0@99")).tables[0]
        await client.push("emb", fids[:150], grads[:150])
        await client.push("emb", fresh, np.ones((50, 4), np.float32))
        later = await client.pull("emb", np.concatenate([fids, fresh]))
    proc.stop()  # checkpoints on its own: the tag stays, the rollback point too

    restarted = await shards(0, 1, data_dir)
    async with StoreClient(restarted.address) as client:
        info = (await client.describe()).tables[0]
        assert (info.checkpoint_id, info.checkpoint_tag) == (ckpt.checkpoint_id + 1, "samples.0@99")
        assert np.array_equal(await client.pull("emb", np.concatenate([fids, fresh])), later)

        rolled = (await client.rollback(expected_tag="samples.0@99")).tables[0]

        assert (rolled.checkpoint_id, rolled.checkpoint_version) == (ckpt.checkpoint_id, ckpt.checkpoint_version)
        assert np.array_equal(await client.pull("emb", fids), checkpointed)
        assert np.array_equal(await client.pull("emb", fresh), initial_values(fresh, 4, scale=0.01))
        # Re-training the same batches gives the same rows, bit for bit.
        await client.push("emb", fids[:150], grads[:150])
        await client.push("emb", fresh, np.ones((50, 4), np.float32))
        assert np.array_equal(await client.pull("emb", np.concatenate([fids, fresh])), later)


async def test_graceful_stop_checkpoints_so_a_restart_loses_nothing(shards, tmp_path):
    data_dir = str(tmp_path / "shard0")
    proc = await shards(0, 1, data_dir)
    fids = np.arange(1, 101, dtype=np.int64)
    async with StoreClient(proc.address) as client:
        await client.push("emb", fids, np.ones((100, 4), np.float32))
        values = await client.pull("emb", fids)
    proc.stop()
    assert proc.proc.returncode == 0
    restarted = await shards(0, 1, data_dir)
    async with StoreClient(restarted.address) as client:
        assert np.array_equal(await client.pull("emb", fids), values)


async def test_a_full_snapshot_restores_a_shard_on_its_own(shards, tmp_path):
    data_dir = str(tmp_path / "shard0")
    snapshot = tmp_path / "snap"
    proc = await shards(0, 1, data_dir)
    fids = np.arange(1, 301, dtype=np.int64)
    async with StoreClient(proc.address) as client:
        await client.push("emb", fids, np.ones((300, 4), np.float32))
        values = await client.pull("emb", fids)
        info = (await client.checkpoint("full", snapshot_dir=str(snapshot))).tables[0]
        await client.push("emb", fids, np.ones((300, 4), np.float32))  # after the snapshot
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.checkpoint("again", snapshot_dir=str(snapshot))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    from_snapshot = await shards(0, 1, str(snapshot))
    async with StoreClient(from_snapshot.address) as client:
        restored = (await client.describe()).tables[0]
        assert (restored.checkpoint_id, restored.checkpoint_tag) == (info.checkpoint_id, "full")
        assert np.array_equal(await client.pull("emb", fids), values)
