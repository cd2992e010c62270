"""The validator on a real nats-server: delta and snapshot decisions, rollback on poisoned deltas, restart."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from freshet import bus, snapshots
from freshet.batches import SampleArrays, encode_sample_arrays
from freshet.config import BusConfig
from freshet.delta import DENSE_SHARD, Delta, decision_subject, delta_subject
from freshet.model.v1 import model_pb2
from freshet.models import ModelConfig
from freshet.replica import Replica
from freshet.synthetic import SyntheticSource
from freshet.testing import assert_eventually
from services.validator.config import ValidatorConfig
from services.validator.service import ValidatorService
from tests.validator_data import CONFIG, flipped, synthetic_samples, train_delta

APPROVE, REJECT, ROLLBACK = model_pb2.DECISION_APPROVE, model_pb2.DECISION_REJECT, model_pb2.DECISION_ROLLBACK
SETTINGS = {"window": 4000, "check_samples": 500, "refresh_s": 0.05, "good_interval_s": 0.0}


async def decisions(js) -> list[tuple[int, model_pb2.Approval]]:
    """Every decision on model.fm.decision so far: (stream seq, approval)."""
    sub = await js.pull_subscribe(
        decision_subject("fm"),
        stream=bus.MODEL.name,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
    )
    try:
        left, out = (await sub.consumer_info()).num_pending, []
        while left > 0:
            for msg in await sub.fetch(left, timeout=5):
                out.append((msg.metadata.sequence.stream, model_pb2.Approval.FromString(msg.data)))
                left -= 1
        return out
    finally:
        await sub.unsubscribe()


async def decided(js, count: int) -> list[tuple[int, model_pb2.Approval]]:
    async def enough():
        found = await decisions(js)
        return len(found) >= count and found

    return await assert_eventually(enough, timeout_s=15, message=f"{count} decisions")


async def publish_delta(js, delta: Delta) -> int:
    delta = dataclasses.replace(delta, created_ms=bus.now_ms())
    return await bus.publish(js, delta_subject("fm", delta.shard), delta.to_proto().SerializeToString())


async def publish_samples(js, samples: SampleArrays) -> None:
    await bus.publish(js, "samples.0", encode_sample_arrays(samples))


@pytest.fixture
def source() -> SyntheticSource:
    return SyntheticSource(CONFIG)


@pytest.fixture
async def validator(nats_url):
    async with ValidatorService(ValidatorConfig(**SETTINGS), BusConfig(nats_url=nats_url)) as service:
        yield service


async def warm(js, validator: ValidatorService, source: SyntheticSource) -> None:
    """Fills the validator's reference window with clean samples."""
    await publish_samples(js, synthetic_samples(800, source, start_ms=1_000_000))
    await assert_eventually(lambda: validator.gate.window.scoreable, timeout_s=10, message="window filled")


async def test_clean_deltas_are_approved_in_order_with_their_measurements(js, validator, source):
    await warm(js, validator, source)
    shadow = Replica(ModelConfig())
    first = train_delta(shadow, synthetic_samples(1000, source), sequence=1)
    shadow.apply(first)
    second = train_delta(shadow, synthetic_samples(200, source, 50_000), steps=20, sequence=2)
    dense = Delta(
        "fm",
        "",
        DENSE_SHARD,
        1,
        0,
        1,
        np.zeros(0, np.int64),
        np.zeros((0, 9), np.float32),
        {"bias": np.array([-1.5], np.float32)},
    )
    seqs = [await publish_delta(js, d) for d in (first, dense, second)]
    found = await decided(js, 3)
    assert [a.delta_stream_seq for _, a in found] == seqs
    assert [(a.shard, a.sequence) for _, a in found] == [(0, 1), (-1, 1), (0, 2)]
    assert all(a.decision == APPROVE for _, a in found), [a.reason for _, a in found]
    assert {"auc", "good_auc", "log_loss", "window"} <= set(found[-1][1].metrics)
    assert validator.gate.version == found[-1][0]
    assert validator.latencies_ms and max(validator.latencies_ms) < 5000


async def test_poisoned_deltas_get_a_reject_then_one_rollback_to_the_last_good_version(js, validator, source):
    await warm(js, validator, source)
    shadow = Replica(ModelConfig())
    clean = train_delta(shadow, synthetic_samples(1000, source), sequence=1)
    shadow.apply(clean)
    await publish_delta(js, clean)
    (good_version, good), *_ = await decided(js, 1)
    assert good.decision == APPROVE, good.reason
    poisoned = train_delta(shadow, flipped(synthetic_samples(400, source, 70_000)), steps=40, sequence=2)
    nan = dataclasses.replace(clean, sequence=3, values=np.full_like(clean.values, np.nan))
    await publish_delta(js, poisoned)
    await publish_delta(js, nan)
    found = await decided(js, 4)
    kinds = [(a.decision, a.sequence) for _, a in found]
    assert kinds == [(APPROVE, 1), (REJECT, 2), (ROLLBACK, 0), (REJECT, 3)], [a.reason for _, a in found]
    reject, rollback = found[1][1], found[2][1]
    assert reject.metrics["auc"] < reject.metrics["good_auc"] - 0.05 and "AUC" in reject.reason
    assert rollback.rollback_version == good_version and rollback.snapshot == ""
    assert "AUC" in rollback.reason and rollback.metrics["good_auc"] == reject.metrics["good_auc"]
    assert "non-finite" in found[3][1].reason  # still degraded: rejected, no second rollback
    assert validator.rollbacks == 1 and validator.gate.version == good_version


async def test_a_restarted_validator_rebuilds_its_shadow_and_decides_only_new_candidates(js, nats_url, source):
    config, bus_config = ValidatorConfig(**SETTINGS), BusConfig(nats_url=nats_url)
    shadow = Replica(ModelConfig())
    deltas = []
    for sequence in (1, 2):
        deltas.append(train_delta(shadow, synthetic_samples(300, source, sequence * 10_000), sequence=sequence))
        shadow.apply(deltas[-1])
    async with ValidatorService(config, bus_config) as first:
        await publish_delta(js, deltas[0])
        await publish_delta(js, deltas[1])
        await decided(js, 2)
        fids = np.concatenate([d.fids for d in deltas])
        expected = first.gate.shadow.tables["fm"].lookup(fids)
        version = first.gate.version
    third = train_delta(shadow, synthetic_samples(300, source, 30_000), sequence=3)
    await publish_delta(js, third)  # arrives while no validator runs
    async with ValidatorService(config, bus_config) as second:
        assert second.gate.version == version and second.last_sequence == {0: 2}
        np.testing.assert_array_equal(second.gate.shadow.tables["fm"].lookup(fids), expected)
        found = await decided(js, 3)
        await assert_eventually(lambda: second.gate.version == found[-1][0])
    assert [(a.sequence, a.decision) for _, a in found] == [(1, APPROVE), (2, APPROVE), (3, APPROVE)]


async def test_a_rebuilt_shadow_honours_rollbacks(js, nats_url, validator, source):
    await warm(js, validator, source)
    shadow = Replica(ModelConfig())
    clean = train_delta(shadow, synthetic_samples(1000, source), sequence=1)
    shadow.apply(clean)
    await publish_delta(js, clean)
    await decided(js, 1)
    await publish_delta(js, dataclasses.replace(clean, sequence=2, values=np.full_like(clean.values, np.inf)))
    found = await decided(js, 3)
    assert found[2][1].decision == ROLLBACK
    async with ValidatorService(ValidatorConfig(**SETTINGS), BusConfig(nats_url=nats_url)) as restarted:
        assert restarted.gate.version == found[0][0] and restarted.gate.degraded
        np.testing.assert_array_equal(restarted.gate.shadow.tables["fm"].lookup(clean.fids), clean.values)


async def write_candidate(js, chunks: list[Delta], delta_stream_seq: int = 0) -> model_pb2.SnapshotManifest:
    manifest = model_pb2.SnapshotManifest(model="fm", delta_stream_seq=delta_stream_seq, reason="test")
    manifest = await snapshots.write_snapshot(js, manifest, chunks)
    await bus.publish(js, snapshots.candidate_subject("fm"), manifest.SerializeToString())
    return manifest


async def test_a_clean_snapshot_is_approved_and_announced(js, validator, source):
    await warm(js, validator, source)
    trained = train_delta(Replica(ModelConfig()), synthetic_samples(1000, source), sequence=0)
    manifest = await write_candidate(js, [trained])
    found = await decided(js, 1)
    approval = found[0][1]
    assert approval.decision == APPROVE and approval.snapshot == manifest.id, approval.reason
    assert approval.metrics["rows"] == len(trained.fids) and approval.metrics["auc"] > 0.6
    latest = await snapshots.latest_approved(js, "fm")
    assert latest is not None and latest[1].id == manifest.id


async def test_a_snapshot_with_non_finite_rows_is_rejected(js, validator, source):
    rows = train_delta(Replica(ModelConfig()), synthetic_samples(300, source), sequence=0)
    rows.values[5, 2] = np.nan
    manifest = await write_candidate(js, [rows])
    (_, approval), *_ = await decided(js, 1)
    assert approval.decision == REJECT and approval.snapshot == manifest.id
    assert "non-finite" in approval.reason
    assert await snapshots.latest_approved(js, "fm") is None
    assert validator.rollbacks == 0  # a bad snapshot is not served: nothing to roll back


async def test_a_snapshot_with_a_missing_chunk_is_rejected_with_the_reason(js, validator, source):
    rows = train_delta(Replica(ModelConfig()), synthetic_samples(300, source), sequence=0)
    manifest = model_pb2.SnapshotManifest(model="fm", reason="test")
    manifest = await snapshots.write_snapshot(js, manifest, [rows])
    await (await snapshots.open_bucket(js)).delete(manifest.chunks[0].object)
    await bus.publish(js, snapshots.candidate_subject("fm"), manifest.SerializeToString())
    (_, approval), *_ = await decided(js, 1)
    assert approval.decision == REJECT and "missing" in approval.reason


async def test_a_rollback_names_the_latest_snapshot_approved_at_or_before_the_good_version(js, validator, source):
    await warm(js, validator, source)
    shadow = Replica(ModelConfig())
    clean = train_delta(shadow, synthetic_samples(1000, source), sequence=1)
    shadow.apply(clean)
    seq = await publish_delta(js, clean)
    await decided(js, 1)
    manifest = await write_candidate(js, [dataclasses.replace(clean, sequence=0)], delta_stream_seq=seq)
    await decided(js, 2)
    second = train_delta(shadow, synthetic_samples(200, source, 50_000), steps=20, sequence=2)
    await publish_delta(js, second)
    found = await decided(js, 3)
    assert [a.decision for _, a in found] == [APPROVE, APPROVE, APPROVE], [a.reason for _, a in found]
    await publish_delta(js, dataclasses.replace(second, sequence=3, values=second.values * 1e6))
    found = await decided(js, 5)
    rollback = found[4][1]
    assert rollback.decision == ROLLBACK and rollback.rollback_version == found[2][0]
    assert rollback.snapshot == manifest.id


async def test_a_restarted_validator_boots_its_shadow_from_the_latest_approved_snapshot(js, nats_url, source):
    config, bus_config = ValidatorConfig(**SETTINGS), BusConfig(nats_url=nats_url)
    shadow = Replica(ModelConfig())
    first = train_delta(shadow, synthetic_samples(300, source), sequence=1)
    shadow.apply(first)
    second = train_delta(shadow, synthetic_samples(100, source, 10_000), sequence=2)
    # The snapshot's rows differ from the first delta's, so the rebuilt shadow shows which one it loaded.
    snapshot_rows = dataclasses.replace(first, sequence=0, values=first.values + 1.0)
    async with ValidatorService(config, bus_config):
        seq = await publish_delta(js, first)
        await decided(js, 1)
        manifest = model_pb2.SnapshotManifest(model="fm", delta_stream_seq=seq, reason="test")
        manifest.shards.add(shard=0, sequence=1)
        manifest = await snapshots.write_snapshot(js, manifest, [snapshot_rows])
        await bus.publish(js, snapshots.candidate_subject("fm"), manifest.SerializeToString())
        await decided(js, 2)
        await publish_delta(js, second)
        found = await decided(js, 3)
    assert [a.decision for _, a in found] == [APPROVE, APPROVE, APPROVE], [a.reason for _, a in found]
    async with ValidatorService(config, bus_config) as restarted:
        assert restarted.gate.shadow.snapshot == manifest.id
        assert restarted.gate.version == found[2][0] == restarted.gate.good_version
        only_first = np.setdiff1d(first.fids, second.fids)
        assert len(only_first)
        expected = snapshot_rows.values[np.searchsorted(first.fids, only_first)]
        np.testing.assert_array_equal(restarted.gate.shadow.tables["fm"].lookup(only_first), expected)
        np.testing.assert_array_equal(restarted.gate.shadow.tables["fm"].lookup(second.fids), second.values)
        assert restarted.approved_snapshots == [(found[1][0], manifest.id)]
