"""The predictor as a #6 replica on a real nats-server: a late start against real store, publisher and
validator; one version per answer while deltas stream; replicas side by side; health; reflection; limits.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from nats.js.errors import NotFoundError

from freshet import bus, snapshots
from freshet.clients import PredictorClient, ShardedStoreClient, StoreClient
from freshet.config import BusConfig
from freshet.delta import DENSE_SHARD, decision_subject
from freshet.model.v1 import model_pb2
from freshet.models import CtrModel, ModelConfig
from freshet.tensors import to_tensor
from freshet.testing import assert_eventually, code_of
from integration.delivery import ITEMS, MODEL, USER, ModelLog, candidate_fids
from services.predictor.config import PredictorConfig
from services.predictor.service import SERVICE_NAME, PredictorService
from services.publisher.config import PublisherConfig
from services.publisher.service import PublisherService
from services.store.config import StoreConfig
from services.store.service import StoreService
from services.validator.config import ValidatorConfig
from services.validator.service import ValidatorService

_FAST = {"resync_request_timeout_s": 5.0, "resync_approval_wait_s": 5.0, "resync_retry_max_s": 0.2}


def _predictor(nats_url: str, **overrides) -> PredictorService:
    return PredictorService(PredictorConfig(port=0, **{**_FAST, **overrides}), BusConfig(nats_url=nats_url))


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return (await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)).status


# -- a late start against the real store, publisher and validator ---------------------------------------

# DeepFM with slot 1 at dim 16: store tables fm (rows of 9 floats) and fm_17 (17 floats), two shards.
_DEEPFM = '{"kind": "deepfm", "dim": 8, "slot_dims": {"1": 16}}'
_TABLES = {"fm": 9, "fm_17": 17}


async def _train_step(writer: ShardedStoreClient, rng: np.random.Generator) -> None:
    """What a trainer's step does to the store: gradients for fids of both tables, many seen before."""
    for table, width in _TABLES.items():
        fids = np.unique(rng.integers(0, 400, 120)).astype(np.int64)
        await writer.push(table, fids, rng.normal(scale=0.1, size=(len(fids), width)).astype(np.float32))


async def _latest_approved_is(js, snapshot_id: str) -> bool:
    found = await snapshots.latest_approved(js, MODEL)
    return found is not None and found[1].id == snapshot_id


async def _publish_dense(js, step: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    params = {
        k: rng.normal(scale=0.1, size=tuple(v.shape)).astype(np.float32)
        for k, v in CtrModel(ModelConfig.from_json(_DEEPFM)).state_dict().items()
    }
    snap = model_pb2.DenseSnapshot(model=MODEL, step=step, params={k: to_tensor(v) for k, v in params.items()})
    await bus.publish(js, f"dense.{MODEL}", snap.SerializeToString())
    return params


async def _export_all(client: StoreClient, table: str) -> tuple[np.ndarray, np.ndarray]:
    """The store shard's Export of ``table`` from version 0, every page."""
    fids, values, since = [], [], 0
    while True:
        page = await client.export(table, since, 1000)
        fids.append(page.fids)
        values.append(page.values)
        since = page.next_version
        if not page.has_more:
            return np.concatenate(fids), np.concatenate(values)


class RealDelivery:
    """Two store shards, the real publisher and validator, and a hand-driven trainer (store pushes and
    dense snapshots), all in this process on the test's nats-server."""

    def __init__(self, nats_url: str, js) -> None:
        self.nats_url = nats_url
        self.js = js
        self.rng = np.random.default_rng(11)
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> RealDelivery:
        enter = self._stack.enter_async_context
        tables = tuple(f"{t}:{w}" for t, w in _TABLES.items())
        self.stores = [
            await enter(StoreService(StoreConfig(port=0, tables=tables, shard=i, num_shards=2))) for i in range(2)
        ]
        self.clients = [await enter(StoreClient(s.address)) for s in self.stores]
        self.writer = await enter(ShardedStoreClient([s.address for s in self.stores]))
        bus_config = BusConfig(nats_url=self.nats_url)
        self.nc = await bus.connect(bus_config, "test-requester")
        self._stack.push_async_callback(self.nc.close)
        self.validator = await enter(ValidatorService(ValidatorConfig(model_config=_DEEPFM), bus_config))
        self.publisher = await enter(
            PublisherService(
                PublisherConfig(
                    store_address=",".join(s.address for s in self.stores),
                    model_config=_DEEPFM,
                    interval_s=0.02,
                    max_rows_per_delta=50,  # several deltas per table and cycle, several chunks per snapshot
                    snapshot_interval_s=0,
                ),
                bus_config,
            )
        )
        self.dense_step = 0
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def train(self, steps: int) -> dict[str, np.ndarray]:
        """``steps`` training steps' store updates, then new dense parameters; returns those."""
        for _ in range(steps):
            await _train_step(self.writer, self.rng)
        self.dense_step += 1
        return await _publish_dense(self.js, self.dense_step, self.rng)

    async def predictor(self) -> PredictorService:
        return await self._stack.enter_async_context(_predictor(self.nats_url, model_config=_DEEPFM))

    async def caught_up(self, predictor: PredictorService) -> bool:
        """The predictor holds every table of every shard at the store's version, and the last dense step."""
        versions = {(s.config.shard, t): s.tables[t].version for s in self.stores for t in _TABLES}
        replica = predictor.replica
        return replica.dense_step == self.dense_step and all(
            replica.table_versions.get(k) == v for k, v in versions.items()
        )

    async def assert_equal_to_the_store(self, predictor: PredictorService, dense: dict[str, np.ndarray]) -> None:
        """The replica's rows equal the store's Export from version 0, bit for bit, and its dense parameters the last."""
        replica = predictor.replica
        for table in _TABLES:
            parts = [await _export_all(c, table) for c in self.clients]
            fids = np.concatenate([p[0] for p in parts])
            values = np.concatenate([p[1] for p in parts])
            assert len(fids) > 100
            assert replica.equal_rows(table, fids, values), f"table {table} differs from the store"
        own = replica.model.state_dict()
        for name, value in dense.items():
            assert own[name].numpy().tobytes() == value.tobytes(), name

    async def deltas_decided(self) -> list[tuple[int, model_pb2.Approval]]:
        """Every decision in the MODEL stream so far: (stream sequence, approval)."""
        found = []
        last = (await self.js.stream_info(bus.MODEL.name)).state.last_seq
        for seq in range(1, last + 1):
            try:
                raw = await self.js.get_msg(bus.MODEL.name, seq)
            except NotFoundError:
                continue
            if raw.subject == decision_subject(MODEL):
                found.append((seq, model_pb2.Approval.FromString(raw.data)))
        return found


async def test_a_predictor_started_late_catches_up_from_snapshot_and_deltas_to_exactly_the_store(nats_url, js):
    async with RealDelivery(nats_url, js) as delivery:
        await delivery.train(5)
        # A snapshot mid-way, approved by the validator; training goes on after it.
        manifest = await snapshots.request_snapshot(delivery.nc, MODEL, "test", timeout_s=10)
        await assert_eventually(lambda: _latest_approved_is(js, manifest.id), timeout_s=15, message="approved")
        dense = await delivery.train(5)

        predictor = await delivery.predictor()

        await assert_eventually(
            lambda: delivery.caught_up(predictor), timeout_s=20, message="at the store's versions"
        )
        assert predictor.replica.snapshot == manifest.id and predictor.stats.snapshots_loaded == 1
        assert predictor.gaps == 0 and delivery.publisher.failed is None
        await delivery.assert_equal_to_the_store(predictor, dense)


async def test_an_approved_delta_lost_from_the_stream_is_repaired_with_a_snapshot_the_publisher_takes(
    nats_url, js
):
    async with RealDelivery(nats_url, js) as delivery:
        await delivery.train(4)

        async def approvals() -> list[model_pb2.Approval]:
            decided = await delivery.deltas_decided()
            shard_1 = [a for _, a in decided if a.shard == 1 and a.decision == model_pb2.DECISION_APPROVE]
            return len(shard_1) >= 3 and shard_1

        shard_1 = await assert_eventually(approvals, timeout_s=15, message="shard 1 deltas approved")
        # No snapshot was ever taken: the predictor can only repair the hole with one it asks for.
        await js.delete_msg(bus.MODEL.name, shard_1[1].delta_stream_seq)
        dense = await delivery.train(2)

        predictor = await delivery.predictor()

        await assert_eventually(
            lambda: delivery.caught_up(predictor), timeout_s=30, message="at the store's versions"
        )
        assert predictor.gaps == 1 and predictor.stats.snapshots_loaded == 1
        assert predictor.replica.snapshot  # built from the snapshot it asked for
        await delivery.assert_equal_to_the_store(predictor, dense)


# -- consistency while deltas stream --------------------------------------------------------------------


async def test_every_predict_while_deltas_stream_is_answered_by_one_whole_version(nats_url, js):
    log = ModelLog(js)
    # Big deltas (the candidates' rows plus 20,000 others) so applying one takes a while.
    filler = np.arange(1 << 40, (1 << 40) + 20_000, dtype=np.int64)
    fids = np.concatenate([candidate_fids(), filler])
    answers: list[tuple[int, np.ndarray]] = []
    stop = asyncio.Event()

    async def reader(client: PredictorClient) -> None:
        while not stop.is_set():
            scores, version = await client.predict(MODEL, USER, ITEMS)
            answers.append((version, scores))

    async with _predictor(nats_url) as predictor, PredictorClient(predictor.address) as client:
        await asyncio.wait_for(predictor.follower.ready.wait(), 10)
        readers = [asyncio.create_task(reader(client)) for _ in range(4)]
        try:
            for k in range(12):
                if k % 4 == 3:
                    version = await log.approved_delta(shard=DENSE_SHARD, bias=0.1 * k)
                else:
                    version = await log.approved_delta(fids=fids)
                seen = len(answers)
                await assert_eventually(
                    lambda v=version, n=seen: any(a[0] == v for a in answers[n:]),
                    message=f"version {version} answered",
                )
        finally:
            stop.set()
            await asyncio.gather(*readers)

    expected = {v: state.scores() for v, state in log.versions.items()}
    versions = {v for v, _ in answers}
    assert len(versions) >= 12 and versions <= set(expected)
    for version, scores in answers:
        # Versions differ by far more than float noise: rows are redrawn with scale 0.3 each time.
        np.testing.assert_allclose(scores, expected[version], rtol=1e-6, atol=1e-7, err_msg=f"version {version}")


async def test_two_predictors_side_by_side_converge_to_the_same_version_and_scores(nats_url, js):
    log = ModelLog(js)
    async with _predictor(nats_url) as first, PredictorClient(first.address) as first_client:
        for k in range(3):
            await log.approved_delta(fids=candidate_fids()[k::2])
        snapshot = await log.write_snapshot()
        await log.approve_snapshot(snapshot)
        await log.approved_delta(shard=DENSE_SHARD, bias=0.4)
        async with _predictor(nats_url) as second, PredictorClient(second.address) as second_client:
            last = await log.approved_delta(fids=candidate_fids()[:6])
            for predictor in (first, second):
                await predictor.follower.wait_version(last)
            (a, va), (b, vb) = [await c.predict(MODEL, USER, ITEMS) for c in (first_client, second_client)]
            assert va == vb == last
            assert a.tobytes() == b.tobytes()
            np.testing.assert_allclose(a, log.versions[last].scores(), rtol=1e-6)
            assert second.replica.snapshot == snapshot.id and first.replica.snapshot == ""
            # Each has its own ordered consumer on the decision stream.
            assert (await js.stream_info(bus.MODEL.name)).state.consumer_count >= 2


# -- health, reflection, limits ---------------------------------------------------------------------------


async def test_health_is_not_serving_until_the_boot_catch_up_is_done(nats_url, js):
    log = ModelLog(js)
    delta, seq = await log.publish_delta()
    await log.decide(delta, seq)
    await js.delete_msg(bus.MODEL.name, seq)  # the stream lost its first delta: boot needs a snapshot
    async with _predictor(nats_url) as predictor:
        await assert_eventually(lambda: predictor.gaps == 1, message="gap found while booting")
        assert await _health(predictor.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        async with PredictorClient(predictor.address) as client:
            code, details = await code_of(client.predict(MODEL, USER, ITEMS))
            assert code == grpc.StatusCode.UNAVAILABLE and "catching up" in details
        nc = await bus.connect(BusConfig(nats_url=nats_url), "test-responder")
        try:
            await log.respond_to_snapshot_requests(nc)

            async def serving() -> bool:
                return await _health(predictor.address) == health_pb2.HealthCheckResponse.SERVING

            await assert_eventually(serving, timeout_s=15, message="serving after the resync")
            assert predictor.stats.snapshots_loaded == 1 and predictor.replica.shard_sequences[0] == 1
            async with PredictorClient(predictor.address) as client:
                _, version = await client.predict(MODEL, USER, ITEMS)
            assert version == predictor.follower.version > 0
        finally:
            await nc.close()


async def test_reflection_lists_the_predictor_and_health_services(nats_url):
    async with _predictor(nats_url) as predictor, grpc.aio.insecure_channel(predictor.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
        ]
        responses = [r async for r in stub.ServerReflectionInfo(iter(requests), timeout=5)]
        names = {s.name for s in responses[0].list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
        assert responses[1].file_descriptor_response.file_descriptor_proto  # Predictor's proto file


async def test_a_request_over_the_byte_limit_is_resource_exhausted_before_the_candidate_check(nats_url):
    async with (
        _predictor(nats_url, max_request_bytes=4096, max_candidates=100_000) as predictor,
        PredictorClient(predictor.address) as client,
    ):
        code, details = await code_of(client.predict(MODEL, USER, np.arange(1000)))  # 8 kB of ids
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4096" in details
        scores, _ = await client.predict(MODEL, USER, np.arange(400))  # 3.2 kB: within the limit
        assert scores.shape == (400,)


@pytest.mark.parametrize(("dtype", "atol"), [("fp16", 2e-3), ("int8", 2e-2)])
async def test_a_quantised_replica_serves_the_same_versions_within_its_precision(nats_url, js, dtype, atol):
    log = ModelLog(js)
    await log.approved_delta(shard=DENSE_SHARD, bias=0.3)
    last = await log.approved_delta()
    async with (
        _predictor(nats_url, replica_dtype=dtype) as predictor,
        PredictorClient(predictor.address) as client,
    ):
        await predictor.follower.wait_version(last)
        scores, version = await client.predict(MODEL, USER, ITEMS)
        assert version == last
        assert predictor.replica.tables["fm"]._slab.dtype == {"fp16": np.float16, "int8": np.int8}[dtype]
        np.testing.assert_allclose(scores, log.versions[last].scores(), atol=atol)
        assert predictor.replica.equal_rows("fm", *log.served.arrays())  # bit-exact after its own rounding
