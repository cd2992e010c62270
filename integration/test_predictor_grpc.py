"""The predictor on a real nats-server and real gRPC: status codes, and applying approved deltas in order."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from freshet import bus
from freshet.clients import PredictorClient
from freshet.config import BusConfig
from freshet.delta import Delta, decision_subject, delta_subject
from freshet.fids import example_fids
from freshet.model.v1 import model_pb2
from freshet.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from freshet.tensors import to_tensor
from freshet.testing import assert_eventually, code_of
from services.predictor.config import PredictorConfig
from services.predictor.service import SERVICE_NAME, PredictorService

_ROW_DIM = 9  # 1 + the default 8 factors
_TIMEOUT = 5.0
_USER = 7
_ITEMS = np.array([42, 43, 44], np.int64)


@pytest.fixture
async def predictor(nats_url):
    async with PredictorService(PredictorConfig(port=0, max_candidates=10), BusConfig(nats_url=nats_url)) as svc:
        await asyncio.wait_for(svc.follower.ready.wait(), _TIMEOUT)  # an empty stream: caught up at once
        yield svc


@pytest.fixture
async def client(predictor):
    async with PredictorClient(predictor.address, timeout_s=_TIMEOUT) as c:
        yield c


def _raw_predict(client: PredictorClient):
    return client.channel.unary_unary(
        f"/{SERVICE_NAME}/Predict", request_serializer=None, response_deserializer=None
    )


def _delta(sequence: int, seed: int, bias: float) -> Delta:
    """Rows for the user, items 42 and 43 (not 44) and the position-0 feature."""
    fids = np.unique(example_fids(_USER, _ITEMS[:2], 0).reshape(-1))
    rng = np.random.default_rng(seed)
    return Delta(
        model="fm",
        table="fm",
        shard=0,
        sequence=sequence,
        base_version=10 * (sequence - 1),
        new_version=10 * sequence,
        fids=fids,
        values=rng.normal(scale=0.3, size=(len(fids), _ROW_DIM)).astype(np.float32),
        dense={"bias": np.array([bias], np.float32)},
    )


def _expected_scores(deltas: list[Delta]) -> np.ndarray:
    """Scores a replica must serve after applying ``deltas`` in order: unknown fids read zero rows."""
    rows: dict[int, np.ndarray] = {}
    bias = 0.0
    for delta in deltas:
        rows.update(zip(delta.fids.tolist(), delta.values, strict=True))
        bias = float(delta.dense["bias"][0])
    fids = example_fids(_USER, _ITEMS, 0)
    table = np.stack([rows.get(f, np.zeros(_ROW_DIM, np.float32)) for f in fids.reshape(-1).tolist()])
    table = table.reshape(*fids.shape, _ROW_DIM).astype(np.float64)
    # The default model: an FM over the user, item and position fields (one fid each).
    linear, factors = table[..., 0].sum(axis=1), table[..., 1:]
    pairwise = 0.5 * ((factors.sum(axis=1) ** 2) - (factors**2).sum(axis=1)).sum(axis=1)
    return 1.0 / (1.0 + np.exp(-(bias + linear + pairwise)))


async def _publish(js, delta: Delta, decision: int, sequence: int | None = None) -> int:
    """Publishes the delta and a decision on it; returns the decision's stream sequence (the version it makes)."""
    stream_seq = await bus.publish(js, delta_subject("fm"), delta.to_proto().SerializeToString())
    approval = model_pb2.Approval(
        model="fm",
        shard=0,
        sequence=delta.sequence if sequence is None else sequence,
        new_version=delta.new_version,
        delta_stream_seq=stream_seq,
        decision=decision,
    )
    return await bus.publish(js, decision_subject("fm"), approval.SerializeToString())


async def test_predict_before_any_delta_scores_one_half_at_version_zero(client):
    scores, version = await client.predict("fm", _USER, _ITEMS)
    np.testing.assert_array_equal(scores, np.full(3, 0.5, np.float32))
    assert version == 0


async def test_predict_with_no_candidates_returns_no_scores(client):
    scores, _ = await client.predict("fm", _USER, np.zeros(0, np.int64))
    assert scores.shape == (0,)


async def test_item_ids_of_dtype_float32_are_invalid_argument_naming_item_ids(client):
    stub = predictor_pb2_grpc.PredictorStub(client.channel)
    request = predictor_pb2.PredictRequest(model="fm", user_id=1, item_ids=to_tensor(np.ones(2, np.float32)))
    code, details = await code_of(stub.Predict(request, timeout=_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "item_ids" in details


async def test_user_id_sent_with_the_wrong_wire_type_is_invalid_argument(client):
    # Field 2 (user_id, a varint) sent length-delimited: protobuf alone would read user_id as 0.
    code, details = await code_of(_raw_predict(client)(b"\x12\x03abc", timeout=_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_id" in details


async def test_undecodable_request_bytes_are_invalid_argument(client):
    code, details = await code_of(_raw_predict(client)(b"\xff\xff\xff\xff", timeout=_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot decode" in details


async def test_more_candidates_than_the_limit_is_resource_exhausted(client):
    code, details = await code_of(client.predict("fm", _USER, np.arange(11)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "11 candidates" in details
    scores, _ = await client.predict("fm", _USER, np.arange(10))
    assert scores.shape == (10,)


async def test_negative_ids_are_invalid_argument(client):
    code, _ = await code_of(client.predict("fm", -1, _ITEMS))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = await code_of(client.predict("fm", _USER, np.array([3, -4])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_model_not_served_here_is_not_found(client):
    code, details = await code_of(client.predict("other", _USER, _ITEMS))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "other" in details


async def test_approved_deltas_are_applied_in_order_and_rejected_ones_are_not(predictor, client, js):
    first, second, rejected = (
        _delta(1, seed=1, bias=0.2),
        _delta(2, seed=2, bias=-0.3),
        _delta(3, seed=3, bias=2.0),
    )

    v1 = await _publish(js, first, model_pb2.DECISION_APPROVE)

    async def serves(version: int, deltas: list[Delta]):
        scores, got = await client.predict("fm", _USER, _ITEMS)
        return got == version and np.allclose(scores, _expected_scores(deltas), rtol=1e-6, atol=1e-7)

    await assert_eventually(lambda: serves(v1, [first]), message="delta 1 served")
    scores, _ = await client.predict("fm", _USER, _ITEMS)
    assert not np.allclose(scores, 0.5)  # the rows really changed the scores

    v2 = await _publish(js, second, model_pb2.DECISION_APPROVE)
    await assert_eventually(lambda: serves(v2, [first, second]), message="delta 2 served")

    await _publish(js, rejected, model_pb2.DECISION_REJECT)
    await assert_eventually(lambda: predictor.rejected == 1, message="rejection seen")
    assert await serves(v2, [first, second])
    assert predictor.replica.shard_sequences == {0: 3}
    assert predictor.stats.applied == 2 and predictor.gaps == 0


async def test_a_decision_with_a_sequence_gap_and_no_snapshot_to_be_had_stalls_at_the_last_whole_version(
    predictor, client, js
):
    v1 = await _publish(js, _delta(1, seed=1, bias=0.1), model_pb2.DECISION_APPROVE)
    await assert_eventually(lambda: predictor.replica.version == v1, message="delta 1 applied")
    assert predictor.gaps == 0

    await _publish(js, _delta(5, seed=5, bias=0.1), model_pb2.DECISION_APPROVE)  # 2..4 never came
    await _publish(js, _delta(6, seed=6, bias=0.1), model_pb2.DECISION_APPROVE)

    await assert_eventually(lambda: predictor.gaps == 1, message="gap counted")
    # No publisher answers the snapshot request: the replica keeps retrying the resync and serves
    # version 1, never a state with a hole in it.
    _, version = await client.predict("fm", _USER, _ITEMS)
    assert version == v1 and predictor.replica.shard_sequences == {0: 1}
    assert predictor.follower.position == v1 and predictor.failed is None and predictor.gaps == 1


async def test_a_decision_already_applied_is_ignored(predictor, client, js):
    first = _delta(1, seed=1, bias=0.1)
    v1 = await _publish(js, first, model_pb2.DECISION_APPROVE)
    await assert_eventually(lambda: predictor.replica.version == v1)
    # A replay of sequence 1 with other rows: deltas are idempotent, the replica keeps what it has.
    await _publish(js, _delta(1, seed=9, bias=5.0), model_pb2.DECISION_APPROVE)
    await _publish(js, _delta(2, seed=2, bias=0.4), model_pb2.DECISION_REJECT)
    await assert_eventually(lambda: predictor.rejected == 1)

    scores, version = await client.predict("fm", _USER, _ITEMS)
    assert version == v1 and predictor.gaps == 0 and predictor.stats.skipped == 1
    np.testing.assert_allclose(scores, _expected_scores([first]), rtol=1e-6)


async def test_undecodable_and_verdictless_decisions_are_counted_and_skipped(predictor, client, js):
    await bus.publish(js, decision_subject("fm"), b"\xff\xff\xff")
    await bus.publish(js, decision_subject("fm"), model_pb2.Approval(model="fm", sequence=1).SerializeToString())
    first = _delta(1, seed=1, bias=0.1)
    v1 = await _publish(js, first, model_pb2.DECISION_APPROVE)

    await assert_eventually(lambda: predictor.replica.version == v1, message="delta 1 applied")
    assert predictor.stats.bad_decisions == 2 and predictor.gaps == 0
