"""The trainer on a real nats-server and a real store over gRPC: trains samples, publishes dense, dead-letters junk."""

from __future__ import annotations

import numpy as np
import pytest
from nats.js.errors import NotFoundError

from freshet import bus
from freshet.batches import Sample, encode_samples
from freshet.clients import StoreClient
from freshet.config import BusConfig
from freshet.fids import example_fids
from freshet.model.v1 import model_pb2
from freshet.models import ModelConfig
from freshet.tensors import from_tensor
from freshet.testing import assert_eventually
from services.store.config import StoreConfig
from services.store.service import StoreService
from services.store.table import initial_values
from services.trainer.config import TrainerConfig
from services.trainer.service import TrainerService


@pytest.fixture
async def store():
    async with StoreService(StoreConfig(port=0)) as service:
        yield service


@pytest.fixture
async def trainer(nats_url, store, js):
    config = TrainerConfig(store_address=store.address, dense_interval_s=0.05, checkpoint_s=0)
    async with TrainerService(config, BusConfig(nats_url=nats_url)) as service:
        yield service


def _samples(rng: np.random.Generator, n: int, tag: str) -> list[Sample]:
    out = []
    for i in range(n):
        user, item = int(rng.integers(0, 5)), int(rng.integers(0, 20))
        out.append(
            Sample(
                sample_id=f"{tag}-{i}:{item}",
                fids=example_fids(user, np.array([item]), i % 3)[0],
                label=float(i % 2),
                user_id=user,
                item_id=item,
            )
        )
    return out


def _all_fids(batches: list[list[Sample]]) -> np.ndarray:
    return np.unique(np.concatenate([s.fids for batch in batches for s in batch]))


async def _last_msg(js, stream: str, subject: str):
    try:
        return await js.get_last_msg(stream, subject)
    except NotFoundError:
        return None


async def test_published_samples_are_trained_and_move_store_rows_away_from_their_initial_values(
    trainer, store, js
):
    rng = np.random.default_rng(0)
    batches = [_samples(rng, 8, f"b{k}") for k in range(3)]
    for batch in batches:
        await bus.publish(js, "samples.0", encode_samples(batch))

    await assert_eventually(lambda: trainer.learner.samples_trained == 24, message="24 samples trained")

    fids = _all_fids(batches)
    async with StoreClient(store.address) as client:
        rows = await client.pull("fm", fids)
    initial = initial_values(fids, 9, StoreConfig().init_scale)
    assert np.all(np.any(rows != initial, axis=1)), "every fid of a trained sample got a gradient"
    assert len(store.tables["fm"]) == len(fids)
    assert trainer.learner.metrics.count == 24


async def test_trainer_publishes_a_dense_snapshot_on_dense_model_subject(trainer, js):
    rng = np.random.default_rng(1)
    await bus.publish(js, "samples.0", encode_samples(_samples(rng, 6, "d")))

    raw = await assert_eventually(lambda: _last_msg(js, "DENSE", "dense.fm"), message="dense snapshot")

    snap = model_pb2.DenseSnapshot.FromString(raw.data)
    assert snap.model == "fm"
    assert snap.step >= 1 and snap.samples_trained >= 6
    bias = from_tensor(snap.params["bias"], np.float32, 1, "bias")
    assert bias.shape == (1,)
    assert snap.stream_seq == 1  # the sample message it has learnt from
    assert ModelConfig.from_json(snap.model_config) == ModelConfig()


async def test_a_malformed_sample_message_is_dead_lettered_and_later_samples_still_train(trainer, js):
    rng = np.random.default_rng(2)
    await bus.publish(js, "samples.0", encode_samples(_samples(rng, 4, "before")))
    bad_seq = await bus.publish(js, "samples.0", b"garbage")
    await bus.publish(js, "samples.0", encode_samples(_samples(rng, 5, "same-fetch")))

    dead = await assert_eventually(
        lambda: _last_msg(js, "DEADLETTER", "deadletter.samples"), message="garbage dead-lettered"
    )

    assert dead.data == b"garbage"
    assert "malformed SampleBatch" in dead.headers["Freshet-Reason"]
    assert dead.headers["Freshet-Subject"] == "samples.0"
    assert dead.headers["Freshet-Stream-Seq"] == str(bad_seq)
    await assert_eventually(lambda: trainer.learner.samples_trained == 9, message="good neighbours trained")

    await bus.publish(js, "samples.0", encode_samples(_samples(rng, 7, "after")))

    await assert_eventually(lambda: trainer.learner.samples_trained == 16, message="later samples trained")
    info = await js.stream_info("DEADLETTER")
    assert info.state.messages == 1


async def test_trainer_stops_with_an_error_when_the_store_table_has_the_wrong_row_dim(nats_url, store):
    config = TrainerConfig(store_address=store.address, model_config='{"kind": "fm", "dim": 4}', checkpoint_s=0)
    async with TrainerService(config, BusConfig(nats_url=nats_url)) as trainer:
        await assert_eventually(lambda: trainer.stopping.is_set(), message="trainer stopped itself")

    assert isinstance(trainer.failed, ValueError)
    assert "needs store table 'fm' with rows of 5 floats, the store has 9" in str(trainer.failed)
    assert trainer.learner.samples_trained == 0


async def test_dense_snapshots_follow_a_step_interval_too(nats_url, store, js):
    config = TrainerConfig(
        store_address=store.address, dense_interval_s=3600, dense_interval_steps=2, batch_size=4, checkpoint_s=0
    )
    async with TrainerService(config, BusConfig(nats_url=nats_url)) as trainer:
        rng = np.random.default_rng(4)
        await bus.publish(js, "samples.0", encode_samples(_samples(rng, 16, "steps")))
        await assert_eventually(lambda: trainer.learner.step == 4, message="4 steps of 4 samples")

        async def snapshot_at_step_4():
            raw = await _last_msg(js, "DENSE", "dense.fm")
            return raw and model_pb2.DenseSnapshot.FromString(raw.data).step == 4

        await assert_eventually(snapshot_at_step_4, message="a snapshot every 2 steps, whatever the clock")


def test_progressive_metrics_are_exported_as_observable_gauges():
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from services.trainer.service import Learner, register_metrics

    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    learner = Learner(ModelConfig(), store=None, dense_lr=0.1)
    register_metrics(meter, learner, lambda: 42)
    learner.metrics.update(np.array([0.9, 0.2, 0.7, 0.4]), np.array([1.0, 0.0, 1.0, 0.0]))
    learner.samples_trained = 4
    data = reader.get_metrics_data()
    values = {
        m.name: m.data.data_points[0].value
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.data.data_points
    }
    assert values["freshet.trainer.progressive_auc"] == pytest.approx(1.0)
    assert values["freshet.trainer.samples_trained"] == 4
    assert values["freshet.trainer.stream_position"] == 42
    assert "freshet.trainer.window_log_loss" in values
