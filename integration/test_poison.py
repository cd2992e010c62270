"""End to end: a burst of poisoned training data is blocked by the validator and the predictor rolls back.

store + trainer + publisher + validator + predictor run in this process on a real nats-server; samples
are published straight to ``samples.0`` (the joiner's output), first clean, then with flipped labels.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import numpy as np

from freshet import bus
from freshet.batches import SampleArrays, encode_sample_arrays
from freshet.clients import PredictorClient
from freshet.config import BusConfig
from freshet.model.v1 import model_pb2
from freshet.synthetic import SyntheticSource
from freshet.testing import assert_eventually
from integration.test_validator import decisions
from services.predictor.config import PredictorConfig
from services.predictor.service import PredictorService
from services.publisher.config import PublisherConfig
from services.publisher.service import PublisherService
from services.store.config import StoreConfig
from services.store.service import StoreService
from services.trainer.config import TrainerConfig
from services.trainer.service import TrainerService
from services.validator.config import ValidatorConfig
from services.validator.service import ValidatorService
from tests.validator_data import CONFIG, flipped, sample_slice, synthetic_samples

USER = 3
ITEMS = np.arange(0, 40, dtype=np.int64)  # candidates scored to compare served versions


class Clock:
    """The validator's clock: the test decides when the last good version may be refreshed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def publish(js, samples: SampleArrays, per_message: int = 500) -> None:
    for start in range(0, len(samples), per_message):
        part = sample_slice(samples, start, start + per_message)
        await bus.publish(js, "samples.0", encode_sample_arrays(part))


async def test_a_flipped_label_burst_is_blocked_and_the_predictor_rolls_back_to_the_last_good_version(
    nats_url, tmp_path
):
    b = BusConfig(nats_url=nats_url)
    clock = Clock()
    source = SyntheticSource(CONFIG)
    async with AsyncExitStack() as stack:
        enter = stack.enter_async_context
        store = await enter(StoreService(StoreConfig(port=0, data_dir=str(tmp_path / "store"))))
        predictor = await enter(PredictorService(PredictorConfig(port=0), b))
        validator = await enter(
            ValidatorService(
                ValidatorConfig(window=4000, check_samples=500, refresh_s=0.05, good_interval_s=60.0), b, clock
            )
        )
        publisher = await enter(PublisherService(PublisherConfig(store_address=store.address), b))
        trainer = await enter(
            TrainerService(TrainerConfig(store_address=store.address, dense_interval_s=0.1, batch_size=256), b)
        )
        client = await enter(PredictorClient(predictor.address))
        nc = await bus.connect(b, "test-poison")
        stack.push_async_callback(nc.close)
        js = nc.jetstream()

        async def served() -> tuple[np.ndarray, int]:
            return await client.predict("fm", USER, ITEMS)

        async def settled(trained: int) -> int:
            """Waits until the trainer trained ``trained`` samples and the predictor serves every approval."""
            await assert_eventually(lambda: trainer.learner.samples_trained >= trained, timeout_s=30)
            await assert_eventually(
                lambda: (
                    publisher.cursor == store.tables["fm"].version
                    and validator.decided_seq >= publisher.last_stream_seq
                ),
                timeout_s=15,
                message="every delta decided",
            )

            async def caught_up():
                return (await served())[1] == validator.gate.version

            await assert_eventually(caught_up, timeout_s=15, message="predictor at the validator's version")
            return validator.gate.version

        # 1. Clean training; then the last good version is refreshed to what is served now.
        clean = synthetic_samples(1200, source)
        await publish(js, clean)
        await settled(len(clean))
        clock.now += 61.0
        await assert_eventually(lambda: validator.gate.good_version == validator.gate.version, timeout_s=10)
        good_version = validator.gate.good_version
        good_scores, version = await served()
        assert version == good_version > 0 and validator.rejected == 0

        # 2. More clean training, approved after the last good version (not yet promoted: the clock stands).
        more = synthetic_samples(600, source, start_ms=100_000)
        await publish(js, more)
        later = await settled(len(clean) + len(more))
        assert later > good_version and validator.gate.good_version == good_version

        # 3. A burst of flipped labels straight onto the samples subject.
        burst = flipped(synthetic_samples(2400, source, start_ms=200_000))
        await publish(js, burst)

        async def rolled_back():
            found = [a for _, a in await decisions(js) if a.decision == model_pb2.DECISION_ROLLBACK]
            return found and found[0]

        rollback = await assert_eventually(rolled_back, timeout_s=30, message="a ROLLBACK decision")
        assert rollback.rollback_version == good_version and rollback.snapshot == "", rollback
        assert rollback.metrics["degraded"] == 1.0 and rollback.reason
        assert validator.gate.window.frozen, "the burst must not enter the reference window"

        async def serves_good_version():
            scores, version = await served()
            return version == good_version and (scores, version)

        scores, _ = await assert_eventually(serves_good_version, timeout_s=20, message="predictor rolled back")
        np.testing.assert_array_equal(scores, good_scores)
        await assert_eventually(lambda: trainer.learner.samples_trained >= len(clean) + len(more) + len(burst))
        # The poisoned deltas stay blocked: the predictor still serves the last good version.
        await assert_eventually(lambda: validator.decided_seq >= publisher.last_stream_seq, timeout_s=15)
        scores, version = await served()
        assert version == good_version
        np.testing.assert_array_equal(scores, good_scores)
        assert validator.rollbacks == 1 and validator.rejected >= 1
