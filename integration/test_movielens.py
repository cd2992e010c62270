"""MovieLens-100k through the whole training pipeline: replay -> joiner -> trainer -> store.

Reads the dataset from ``<data dir>/movielens-100k/u.data`` (``freshet.testing.data_dir``); its
licence forbids shipping it, so the test is skipped where it is absent. The trainer runs the default
model; the check is the issue's bar: progressive (predict-then-train) AUC over the last 80 % of the
stream >= 0.76 (a hashing online learner with user x item interactions reaches about 0.755).

MovieLens users rate in bursts, so what a model learns within a burst decides the AUC: the trainer
takes steps of 4 samples, each reading the rows the previous step pushed (``pipeline=False``); measured
0.778. With 8-sample steps the same replay scores 0.760-0.761 (too close to the bar to test on), and
with the default 1024-sample pipelined steps about 0.69-0.72.
"""

from __future__ import annotations

import pytest

from freshet.config import BusConfig
from freshet.datasets import read_events
from freshet.replay import replay
from freshet.testing import assert_eventually, data_dir
from services.joiner.config import JoinerConfig
from services.joiner.service import JoinerService
from services.store.config import StoreConfig
from services.store.service import StoreService
from services.trainer.config import TrainerConfig
from services.trainer.service import TrainerService

U_DATA = data_dir() / "movielens-100k" / "u.data"
RATINGS = 100_000


@pytest.mark.skipif(not U_DATA.is_file(), reason=f"MovieLens-100k not found at {U_DATA} (set FRESHET_DATA_DIR)")
@pytest.mark.timeout(600)
async def test_movielens_replay_through_the_pipeline_reaches_progressive_auc_0_76(nats_url, js):
    bus_config = BusConfig(nats_url=nats_url)
    # Historic event times: windows close by event time; the idle timeout closes the last ones.
    joiner_config = JoinerConfig(window_s=5, allowed_lateness_s=0, idle_timeout_s=1)
    async with (
        StoreService(StoreConfig(port=0)) as store,
        JoinerService(joiner_config, bus_config),
        TrainerService(
            TrainerConfig(store_address=store.address, checkpoint_s=0, batch_size=4, pipeline=False), bus_config
        ) as trainer,
    ):
        trainer.learner.metrics.recorded = []  # keep every (score, label) for the tail AUC
        stats = await replay(js, read_events("movielens", U_DATA), partitions=1, speedup=None, name="ml-100k")
        assert stats.impressions == RATINGS
        await assert_eventually(
            lambda: trainer.learner.metrics.count >= RATINGS, timeout_s=400, interval_s=0.5, message="all trained"
        )
        tail = trainer.learner.metrics.tail_auc(0.8)
    print(f"MovieLens-100k progressive AUC, last 80 %: {tail:.4f}")
    assert tail >= 0.76
