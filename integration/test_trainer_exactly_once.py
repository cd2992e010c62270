"""Exactly-once training: a trainer process killed with SIGKILL mid-stream resumes without training a
sample twice or skipping one. The store shard keeps running throughout (only the trainer dies), so
pushes made after the trainer's last checkpoint must be rolled back on resume.

The count is read from the store itself: every sample carries the same position fid, and the store
adds the occurrences of a fid in each Push to the row's frequency counter, so that counter equals
the number of samples whose gradients the store has applied (checkpoints and rollbacks included).
"""

from __future__ import annotations

import os
import signal
import subprocess

import numpy as np
import pytest

from freshet import bus
from freshet.batches import Sample, encode_samples
from freshet.fids import example_fids
from freshet.testing import assert_eventually, start_service
from services.store.config import StoreConfig
from services.store.service import StoreService

USERS = 50
MESSAGES = 300
PER_MESSAGE = 10


def _freq(store: StoreService, fid: int) -> int:
    """The row's frequency, from the host tier or, when the row is only in RocksDB (e.g. after a restart), there."""
    table = store.tables["fm"]
    row = table.host.find(np.array([fid], np.int64))[0]
    if row >= 0:
        return int(table.host.freqs[row])
    if table.cold is None:
        return 0
    found, rows = table.cold.get(np.array([fid], np.int64))
    return int(rows.freqs[0]) if found[0] else 0


async def _publish_samples(js) -> tuple[int, dict[int, int]]:
    rng = np.random.default_rng(11)
    per_user: dict[int, int] = {}
    for m in range(MESSAGES):
        samples = []
        for i in range(PER_MESSAGE):
            user, item = int(rng.integers(USERS)), int(rng.integers(200))
            per_user[user] = per_user.get(user, 0) + 1
            samples.append(
                Sample(
                    f"m{m}-{i}:{item}:v1", example_fids(user, np.array([item]), 0)[0], float(rng.random() < 0.3)
                )
            )
        await bus.publish(js, "samples.0", encode_samples(samples), msg_id=f"s{m}")
    return MESSAGES * PER_MESSAGE, per_user


@pytest.mark.timeout(240)
async def test_trainer_killed_with_sigkill_trains_every_sample_exactly_once(nats_url, js, tmp_path):
    # No device cache: its read hits also count into row frequencies, which here must count pushes only.
    # Frequent automatic checkpoints of its own must not move the point a rollback returns to.
    config = StoreConfig(port=0, data_dir=str(tmp_path / "store"), device_cache_rows=0, checkpoint_interval_s=0.3)
    async with StoreService(config) as store:
        total, per_user = await _publish_samples(js)
        position_fid = int(example_fids(0, np.array([0]), 0)[0, 2])
        env = {
            **os.environ,
            "FRESHET_NATS_URL": nats_url,
            "FRESHET_STORE_ADDRESS": store.address,
            "FRESHET_TRAINER_CHECKPOINT_S": "0.2",
            "FRESHET_TRAIN_BATCH": "40",
            "FRESHET_TRAIN_FETCH": "4",
            "FRESHET_LOG_LEVEL": "WARNING",
        }

        def start() -> subprocess.Popen:
            return start_service("trainer", env, tmp_path / "trainer.log")

        proc = start()
        try:
            for threshold in (400, 1_200, 2_000):
                await assert_eventually(
                    lambda t=threshold: _freq(store, position_fid) >= t,
                    timeout_s=60,
                    interval_s=0.01,
                    message=f"{threshold} samples applied",
                )
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                proc = start()
            await assert_eventually(
                lambda: _freq(store, position_fid) >= total, timeout_s=120, message="every sample applied"
            )
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        assert _freq(store, position_fid) == total  # none twice
        for user, count in per_user.items():
            assert _freq(store, int(example_fids(user, np.array([0]), 0)[0, 0])) == count
