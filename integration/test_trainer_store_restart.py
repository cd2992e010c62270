"""A store shard killed with SIGKILL while the trainer pushes: it restarts from its last checkpoint, which
lacks pushes it had acknowledged. The trainer notices the new incarnation (or the dropped connection),
rolls every shard back to its own checkpoint and re-reads the stream from there, so every sample is
still trained exactly once. Counted with the store's row frequencies, as in
``test_trainer_exactly_once``, read back after the run from the shard's data dir.
"""

from __future__ import annotations

import os
import signal
import subprocess

import numpy as np
import pytest

from freshet.clients import StoreClient, StoreRestarted
from freshet.config import BusConfig
from freshet.fids import example_fids
from freshet.natsserver import free_port
from freshet.testing import assert_eventually, start_service
from integration.test_trainer_exactly_once import MESSAGES, _freq, _publish_samples
from services.store.config import StoreConfig
from services.store.service import StoreService
from services.trainer.config import TrainerConfig
from services.trainer.service import TrainerService


@pytest.mark.timeout(240)
async def test_store_shard_killed_mid_training_still_trains_every_sample_exactly_once(nats_url, js, tmp_path):
    port = free_port()
    data_dir = tmp_path / "store"
    env = {
        **os.environ,
        "FRESHET_STORE_PORT": str(port),
        "FRESHET_STORE_DATA_DIR": str(data_dir),
        # No device cache: its read hits also count into row frequencies, which here must count pushes only.
        "FRESHET_STORE_DEVICE_CACHE_ROWS": "0",
        # Its own checkpoints run often, so a restart restores a point between the trainer's checkpoints.
        "FRESHET_STORE_CHECKPOINT_INTERVAL_S": "0.3",
        "FRESHET_LOG_LEVEL": "WARNING",
    }

    def start_store() -> subprocess.Popen:
        return start_service("store", env, tmp_path / "store.log")

    store = start_store()
    total, per_user = await _publish_samples(js)
    config = TrainerConfig(
        store_address=f"127.0.0.1:{port}", checkpoint_s=0.2, batch_size=40, fetch_batch=4, pipeline=True
    )
    try:
        async with TrainerService(config, BusConfig(nats_url=nats_url)) as trainer:
            for restarts, position in enumerate((MESSAGES // 4, MESSAGES // 2), start=1):
                await assert_eventually(
                    lambda p=position: trainer.position >= p,
                    timeout_s=60,
                    interval_s=0.01,
                    message=f"seq {position}",
                )
                store.send_signal(signal.SIGKILL)
                store.wait(timeout=10)
                store = start_store()
                await assert_eventually(
                    lambda r=restarts: trainer.store_restarts >= r, timeout_s=60, message="restart noticed"
                )
            await assert_eventually(lambda: trainer.position >= MESSAGES, timeout_s=120, message="stream trained")
        store.send_signal(signal.SIGTERM)
        assert store.wait(timeout=15) == 0
    finally:
        if store.poll() is None:
            store.kill()
    # The shard's state after its clean stop (which checkpointed the trainer's final state).
    async with StoreService(StoreConfig(port=0, data_dir=str(data_dir), device_cache_rows=0)) as restored:
        position_fid = int(example_fids(0, np.array([0]), 0)[0, 2])
        assert _freq(restored, position_fid) == total  # none lost, none twice
        for user, count in per_user.items():
            assert _freq(restored, int(example_fids(user, np.array([0]), 0)[0, 0])) == count


async def test_a_store_client_refuses_a_restarted_shard_until_told_to_forget_the_old_one(tmp_path):
    port = free_port()
    config = StoreConfig(port=port, data_dir=str(tmp_path / "store"))
    async with StoreClient(f"127.0.0.1:{port}") as client:
        async with StoreService(config):
            await client.pull("fm", np.array([1], np.int64))
            await client.checkpoint("a")
        async with StoreService(config):
            for _ in range(2):  # every answer of the new process, until the caller has dealt with it
                with pytest.raises(StoreRestarted, match="restarted"):
                    await client.pull("fm", np.array([1], np.int64))
            with pytest.raises(StoreRestarted):
                await client.checkpoint("b")  # refused by the shard: writes since "a" may be gone
            client.forget_incarnation()
            assert {t.checkpoint_tag for t in (await client.describe()).tables} == {"a"}
            await client.checkpoint("b")
            await client.pull("fm", np.array([1], np.int64))
