"""The embedding store over real gRPC (port 0): round trips, precise status codes, health, robustness,
rollback to the last checkpoint across shards."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from freshet.clients import ShardedStoreClient, StoreClient
from freshet.fids import shard_of
from freshet.store.v1 import store_pb2, store_pb2_grpc
from freshet.tensors import to_tensor
from freshet.testing import code_of
from services.store.config import StoreConfig
from services.store.service import SERVICE_NAME, StoreService
from services.store.table import initial_values

_DIM = 9
_TIMEOUT = 5.0


@pytest.fixture
async def store():
    async with StoreService(StoreConfig(port=0, max_fids_per_request=1000)) as service:
        yield service


@pytest.fixture
async def client(store):
    async with StoreClient(store.address, timeout_s=_TIMEOUT) as c:
        yield c


@pytest.fixture
async def stub(client):
    return store_pb2_grpc.EmbeddingStoreStub(client.channel)


def _initial(store: StoreService, fids: np.ndarray) -> np.ndarray:
    cfg = store.tables["fm"].spec
    return initial_values(fids, cfg.dim, cfg.init_scale, cfg.seed)


async def test_pull_push_export_round_trip_over_grpc(store, client):
    fids = np.array([11, 2**45 + 3, 7], np.int64)
    before = await client.pull("fm", fids)
    np.testing.assert_array_equal(before, _initial(store, fids))
    grads = np.full((3, _DIM), 0.5, np.float32)

    version = await client.push("fm", fids, grads)
    after = await client.pull("fm", fids)

    assert version == 3
    assert np.all(after < before)  # a positive gradient lowers every weight
    np.testing.assert_array_equal(after, store.tables["fm"].pull(fids))
    first = await client.export("fm", 0, limit=2)
    rest = await client.export("fm", first.next_version, limit=2)
    assert first.has_more and not rest.has_more
    assert rest.next_version == 3
    exported_fids = np.concatenate([first.fids, rest.fids]).tolist()
    got = dict(zip(exported_fids, np.concatenate([first.values, rest.values]), strict=True))
    assert sorted(got) == sorted(fids.tolist())
    for fid, row in zip(fids.tolist(), after, strict=True):
        np.testing.assert_array_equal(got[fid], row)
    np.testing.assert_array_equal(np.concatenate([first.versions, rest.versions]), [1, 2, 3])
    tables = (await client.describe()).tables
    assert [(t.name, t.dim, t.rows, t.version) for t in tables] == [("fm", _DIM, 3, 3)]


async def test_push_with_nan_gradient_is_rejected_and_leaves_the_table_unchanged(store, client):
    fids = np.array([1, 2, 3], np.int64)
    await client.push("fm", fids, np.ones((3, _DIM), np.float32))
    before = await client.pull("fm", fids)
    grads = np.ones((3, _DIM), np.float32)
    grads[1, 4] = np.nan

    code, details = await code_of(client.push("fm", fids, grads))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "non-finite" in details
    np.testing.assert_array_equal(await client.pull("fm", fids), before)
    assert store.tables["fm"].version == 3


async def test_push_pull_applies_its_pushes_before_its_pulls(store, client):
    fids = np.array([3, 1, 2**40 + 5], np.int64)
    initial = _initial(store, fids)
    grads = np.full((3, _DIM), 0.5, np.float32)

    versions, (pulled, other) = await client.push_pull(
        [("fm", fids, grads, np.array([2, 1, 1], np.int32)), ("fm", fids[:1], grads[:1], None)],
        [("fm", fids), ("fm", np.array([99], np.int64))],
    )

    assert versions == [3, 4]
    np.testing.assert_array_equal(pulled, store.tables["fm"].pull(fids))
    assert np.all(pulled < initial)  # both pushes landed before the read
    np.testing.assert_array_equal(other, _initial(store, np.array([99], np.int64)))


async def test_push_pull_with_one_bad_push_is_rejected_and_applies_no_push(store, client):
    fids = np.array([1, 2], np.int64)
    bad = np.ones((2, _DIM), np.float32)
    bad[0, 0] = np.nan

    code, details = await code_of(
        client.push_pull([("fm", fids, np.ones((2, _DIM), np.float32), None), ("fm", fids, bad, None)], [])
    )

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "non-finite" in details
    assert store.tables["fm"].version == 0
    np.testing.assert_array_equal(await client.pull("fm", fids), _initial(store, fids))


async def test_push_pull_with_an_unknown_pull_table_is_not_found_and_applies_no_push(store, client):
    fids = np.array([1, 2], np.int64)
    code, _ = await code_of(
        client.push_pull([("fm", fids, np.ones((2, _DIM), np.float32), None)], [("nope", fids)])
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert store.tables["fm"].version == 0


async def test_push_with_wrongly_shaped_grads_is_invalid_argument(client):
    fids = np.array([1, 2], np.int64)
    code, details = await code_of(client.push("fm", fids, np.ones((2, _DIM + 1), np.float32)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "grads shape [2, 10] does not match [2, 9]" in details


async def test_push_counts_grow_row_frequencies_and_bad_counts_are_invalid_argument(store, client):
    fids = np.array([1, 2], np.int64)
    await client.push("fm", fids, np.ones((2, _DIM), np.float32), counts=np.array([4, 1]))
    table = store.tables["fm"]
    assert table.host.freqs[table.host.find(fids)].tolist() == [4, 1]
    code, details = await code_of(client.push("fm", fids, np.ones((2, _DIM), np.float32), counts=np.array([1, 0])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "counts must be 2 positive int32 values" in details


async def test_fids_tensor_with_float32_dtype_is_invalid_argument(stub):
    request = store_pb2.PullRequest(table="fm", fids=to_tensor(np.array([1.0, 2.0], np.float32)))
    code, details = await code_of(stub.Pull(request, timeout=_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "fids" in details and "DTYPE_FLOAT32" in details


async def test_fids_tensor_whose_bytes_do_not_match_its_shape_is_invalid_argument(stub):
    tensor = to_tensor(np.array([1, 2], np.int64))
    tensor.shape[:] = [3]
    code, _ = await code_of(stub.Pull(store_pb2.PullRequest(table="fm", fids=tensor), timeout=_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_table_is_not_found(client):
    code, details = await code_of(client.pull("nope", np.array([1], np.int64)))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "nope" in details


async def test_more_fids_than_the_limit_is_resource_exhausted(client):
    code, details = await code_of(client.pull("fm", np.arange(1001, dtype=np.int64)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1001" in details
    assert (await client.pull("fm", np.arange(1000, dtype=np.int64))).shape == (1000, _DIM)


async def test_negative_export_arguments_are_invalid_argument(stub):
    request = store_pb2.ExportRequest(table="fm", since_version=-1)
    code, _ = await code_of(stub.Export(request, timeout=_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def _raw_pull(client: StoreClient):
    return client.channel.unary_unary(f"/{SERVICE_NAME}/Pull", request_serializer=None, response_deserializer=None)


@pytest.mark.parametrize("raw", [b"\xff\xff\xff\xff", b"garbage", b"\x12\x10short"])
async def test_undecodable_request_bytes_are_invalid_argument(client, raw):
    code, details = await code_of(_raw_pull(client)(raw, timeout=_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot decode freshet.store.v1.PullRequest" in details


async def test_a_known_field_with_the_wrong_wire_type_is_invalid_argument(client):
    # Field 2 (fids, a message) sent as the varint 3: protobuf alone would keep it as an unknown field.
    code, details = await code_of(_raw_pull(client)(b"\x10\x03", timeout=_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "PullRequest.fids has the wrong type" in details


async def test_health_check_reports_serving_for_the_server_and_the_store_service(client):
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", SERVICE_NAME):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=_TIMEOUT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_service_keeps_serving_after_a_run_of_bad_requests(store, client, stub):
    bad_calls = [
        _raw_pull(client)(b"\xff\xff", timeout=_TIMEOUT),
        client.pull("nope", np.array([1], np.int64)),
        client.pull("fm", np.arange(5000, dtype=np.int64)),
        client.push("fm", np.array([1], np.int64), np.full((1, _DIM), np.inf, np.float32)),
        stub.Pull(store_pb2.PullRequest(table="fm", fids=to_tensor(np.ones(2, np.float32))), timeout=_TIMEOUT),
    ]
    for call in bad_calls:
        code, _ = await code_of(call)
        assert code != grpc.StatusCode.INTERNAL and code != grpc.StatusCode.UNKNOWN

    fids = np.array([4, 5], np.int64)
    np.testing.assert_array_equal(await client.pull("fm", fids), _initial(store, fids))
    assert len(store.tables["fm"]) == 0


# -- rollback ------------------------------------------------------------------------------------------


@pytest.fixture
async def two_shards(tmp_path):
    """Two shards with RocksDB data dirs in the test's tmp dir, and a sharded client of both."""
    configs = [
        StoreConfig(port=0, shard=i, num_shards=2, data_dir=str(tmp_path / f"shard{i}"), tables=("a:4", "b:4"))
        for i in range(2)
    ]
    async with StoreService(configs[0]) as s0, StoreService(configs[1]) as s1:
        async with ShardedStoreClient([s0.address, s1.address], timeout_s=_TIMEOUT) as client:
            yield [s0, s1], client


async def test_sharded_push_pull_equals_push_then_pull_on_every_shard_and_table(two_shards):
    shards, client = two_shards
    rng = np.random.default_rng(1)
    fids = rng.integers(0, 2**62, 300)
    pushed = np.concatenate([fids[:100], fids[:50]])  # duplicates: summed, as Push does
    grads = rng.normal(size=(150, 4)).astype(np.float32)
    counts = rng.integers(1, 4, 150).astype(np.int32)
    configs = [
        StoreConfig(port=0, shard=i, num_shards=2, tables=("a:4", "b:4")) for i in range(2)
    ]  # a twin store, updated with Push then Pull
    async with StoreService(configs[0]) as t0, StoreService(configs[1]) as t1:
        async with ShardedStoreClient([t0.address, t1.address], timeout_s=_TIMEOUT) as twin:
            await twin.push("a", pushed, grads, counts)
            want_a, want_b = await twin.pull("a", fids[::-1]), await twin.pull("b", fids[:7])

            got_a, got_b, empty = await client.push_pull(
                [("a", pushed, grads, counts)], [("a", fids[::-1]), ("b", fids[:7]), ("b", fids[:0])]
            )

            np.testing.assert_array_equal(got_a, want_a)
            np.testing.assert_array_equal(got_b, want_b)
            assert len(empty) == 0
            for shard, twin_shard in zip(shards, (t0, t1), strict=True):
                assert shard.tables["a"].version == twin_shard.tables["a"].version > 0
                assert shard.tables["b"].version == 0


async def test_rollback_returns_every_shard_and_table_to_the_last_checkpoint(two_shards):
    shards, client = two_shards
    rng = np.random.default_rng(0)
    old, new = rng.integers(0, 2**62, 400), rng.integers(0, 2**62, 100)
    assert set(shard_of(old, 2).tolist()) == {0, 1}
    for table in ("a", "b"):
        await client.push(table, old, rng.normal(size=(400, 4)).astype(np.float32))
    ckpt = await client.checkpoint("trainer@7")
    at_checkpoint = {t: await client.pull(t, np.concatenate([old, new])) for t in ("a", "b")}
    versions = [d.tables[0].version for d in await client.describe()]
    for table in ("a", "b"):
        await client.push(table, old[::2], rng.normal(size=(200, 4)).astype(np.float32))
        await client.push(table, new, rng.normal(size=(100, 4)).astype(np.float32))

    answers = await client.rollback("trainer@7")

    assert len(answers) == 2
    for answer, before in zip(answers, ckpt, strict=True):
        assert [(t.name, t.checkpoint_id, t.checkpoint_tag) for t in answer.tables] == [
            (t.name, t.checkpoint_id, "trainer@7") for t in before.tables
        ]
    for table in ("a", "b"):
        np.testing.assert_array_equal(await client.pull(table, np.concatenate([old, new])), at_checkpoint[table])
    for shard, version in zip(shards, versions, strict=True):
        assert shard.tables["a"].version > version  # restored rows got new versions
        assert shard.tables["a"].stats["rollbacks"] == 1
    # An empty expected tag accepts any checkpoint.
    await client.rollback()
    np.testing.assert_array_equal(await client.pull("a", old), at_checkpoint["a"][:400])


async def test_rollback_to_another_tag_is_failed_precondition_and_rolls_back_no_table(two_shards):
    shards, client = two_shards
    fids = np.arange(1, 201, dtype=np.int64)
    for table in ("a", "b"):
        await client.push(table, fids, np.ones((200, 4), np.float32))
    await client.checkpoint("trainer@7")
    for table in ("a", "b"):
        await client.push(table, fids, np.ones((200, 4), np.float32))
    shards[0].tables["b"].checkpoint("someone-else")  # one table of one shard at another checkpoint
    later = {t: await client.pull(t, fids) for t in ("a", "b")}

    code, details = await code_of(client.shards[0].rollback("trainer@7"))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "'trainer@7'" in details and "'someone-else'" in details and "'b'" in details
    for table in ("a", "b"):
        np.testing.assert_array_equal(await client.pull(table, fids), later[table])
    assert shards[0].tables["a"].stats["rollbacks"] == 0

    code, details = await code_of(client.rollback("trainer@8"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "'trainer@8'" in details and "'trainer@7'" in details


async def test_rollback_without_a_data_dir_is_failed_precondition(client):
    code, details = await code_of(client.rollback())
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "no data dir" in details and "FRESHET_STORE_DATA_DIR" in details
