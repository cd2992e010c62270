"""The publisher against two real store shards (gRPC on port 0) and a real nats-server: every table of
a multi-table model streamed per shard, dense deltas on their own subject, snapshots that line up
with the deltas, restarts that neither re-send nor skip rows, and back-pressure that never drops."""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import AsyncExitStack

import grpc
import numpy as np
import pytest
from nats.js.api import DiscardPolicy
from nats.js.errors import NotFoundError

from freshet import bus, snapshots
from freshet.clients import ShardedStoreClient
from freshet.config import BusConfig
from freshet.delta import DENSE_SHARD, Delta, decode_delta, dense_subject
from freshet.model.v1 import model_pb2
from freshet.tensors import to_tensor
from freshet.testing import assert_eventually
from services.publisher.config import PublisherConfig
from services.publisher.service import CURSORS_HEADER, PublisherService
from services.store.config import StoreConfig
from services.store.service import StoreService

MODEL = "fm"
# DeepFM with slot 1 at dim 16: store tables fm (rows of 9 floats) and fm_17 (17 floats).
MODEL_CONFIG = '{"kind": "deepfm", "dim": 8, "slot_dims": {"1": 16}}'
TABLES = {"fm": 9, "fm_17": 17}

Rows = dict[tuple[int, str], dict[int, bytes]]  # (shard, table) -> fid -> row bytes (float32)


@pytest.fixture
async def stores():
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                StoreService(
                    StoreConfig(port=0, tables=tuple(f"{t}:{w}" for t, w in TABLES.items()), shard=i, num_shards=2)
                )
            )
            for i in range(2)
        ]


@pytest.fixture
async def writer(stores):
    async with ShardedStoreClient([s.address for s in stores]) as client:
        yield client


def _config(stores, **overrides) -> PublisherConfig:
    settings = dict(
        store_address=",".join(s.address for s in stores),
        model_config=MODEL_CONFIG,
        interval_s=0.02,
        max_rows_per_delta=64,  # several deltas per table and cycle, several chunks per snapshot
        snapshot_interval_s=0,
    )
    return PublisherConfig(**{**settings, **overrides})


async def _push(writer: ShardedStoreClient, rng: np.random.Generator, n: int = 150) -> int:
    """One training step's worth of updates to each table: ``n`` random fids, many seen before; returns rows."""
    rows = 0
    for table, width in TABLES.items():
        fids = np.unique(rng.integers(0, 400, n)).astype(np.int64)
        await writer.push(table, fids, rng.standard_normal((len(fids), width)).astype(np.float32))
        rows += len(fids)
    return rows


async def _publish_dense(js, step: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {"deep.0.weight": rng.standard_normal((4, 3)).astype(np.float32), "bias": np.array([0.5], np.float32)}
    snap = model_pb2.DenseSnapshot(model=MODEL, step=step, params={k: to_tensor(v) for k, v in params.items()})
    await bus.publish(js, f"dense.{MODEL}", snap.SerializeToString())
    return params


def _store_rows(stores) -> Rows:
    rows: Rows = {}
    for store in stores:
        for table in TABLES:
            page = store.tables[table].export(0, 1 << 30)
            rows[(store.config.shard, table)] = {
                f: v.tobytes() for f, v in zip(page.fids.tolist(), page.values, strict=True)
            }
    return rows


def _caught_up(publisher: PublisherService, stores) -> bool:
    return all(publisher.shards[s.config.shard].cursors[t] == s.tables[t].version for s in stores for t in TABLES)


async def _deltas(js) -> list[tuple[int, Delta, dict]]:
    """Every delta in the MODEL stream, in stream order: (stream sequence, delta, headers)."""
    last = (await js.stream_info(bus.MODEL.name)).state.last_seq
    out = []
    for seq in range(1, last + 1):
        try:
            raw = await js.get_msg(bus.MODEL.name, seq)
        except NotFoundError:
            continue
        if raw.subject.startswith(f"model.{MODEL}.delta."):
            out.append((seq, decode_delta(raw.data), raw.headers or {}))
    return out


def _apply(rows: Rows, delta: Delta) -> None:
    table = rows.setdefault((delta.shard, delta.table), {})
    for fid, value in zip(delta.fids.tolist(), delta.values, strict=True):
        table[fid] = value.tobytes()


def _replay(deltas) -> Rows:
    rows: Rows = {(s, t): {} for s in range(2) for t in TABLES}
    for _, delta, _ in deltas:
        if delta.shard != DENSE_SHARD:
            _apply(rows, delta)
    return rows


def _check_stream_order(deltas) -> None:
    """Per shard: sequences 1, 2, 3 ... across tables; per (shard, table): base = previous new version."""
    last_seq: dict[int, int] = defaultdict(int)
    last_version: dict[tuple[int, str], int] = defaultdict(int)
    for _, delta, _ in deltas:
        assert delta.sequence == last_seq[delta.shard] + 1, f"shard {delta.shard} jumps to {delta.sequence}"
        last_seq[delta.shard] = delta.sequence
        if delta.shard != DENSE_SHARD:
            key = (delta.shard, delta.table)
            assert delta.base_version == last_version[key], f"{key} #{delta.sequence} does not follow on"
            last_version[key] = delta.new_version


async def test_every_table_of_a_multi_table_model_streams_per_shard(nats_url, js, stores, writer):
    rng = np.random.default_rng(1)
    async with PublisherService(_config(stores), BusConfig(nats_url=nats_url)) as publisher:
        for _ in range(3):
            await _push(writer, rng)
            await assert_eventually(lambda: _caught_up(publisher, stores), message="publisher caught up")

    deltas = await _deltas(js)
    _check_stream_order(deltas)
    assert {(d.shard, d.table) for _, d, _ in deltas} == {(s, t) for s in range(2) for t in TABLES}
    assert all(len(d.fids) <= 64 and not d.dense for _, d, _ in deltas)
    assert _replay(deltas) == _store_rows(stores)
    # Each delta records every table's cursor of its shard after it, for a restart.
    last_of_shard = {d.shard: (d, h) for _, d, h in deltas}
    for shard, (_, headers) in last_of_shard.items():
        assert json.loads(headers[CURSORS_HEADER]) == {t: stores[shard].tables[t].version for t in TABLES}


async def test_dense_parameters_travel_as_their_own_delta_stream(nats_url, js, stores, writer):
    async with PublisherService(_config(stores), BusConfig(nats_url=nats_url)) as publisher:
        params = await _publish_dense(js, step=5)
        await _push(writer, np.random.default_rng(2))
        await assert_eventually(lambda: publisher.dense.step == 5 and _caught_up(publisher, stores))
        await _publish_dense(js, step=5)  # the same step again: nothing new to send
        await _push(writer, np.random.default_rng(3))
        await assert_eventually(lambda: _caught_up(publisher, stores))
        later = await _publish_dense(js, step=9, seed=1)
        await assert_eventually(lambda: publisher.dense.step == 9)

    deltas = await _deltas(js)
    dense = [(seq, d, h) for seq, d, h in deltas if d.shard == DENSE_SHARD]
    raw = await js.get_msg(bus.MODEL.name, dense[0][0])
    assert raw.subject == dense_subject(MODEL) == "model.fm.delta.dense"
    assert [(d.sequence, d.dense_step, d.table, len(d.fids)) for _, d, _ in dense] == [
        (1, 5, "", 0),
        (2, 9, "", 0),
    ]
    for (_, delta, _), want in zip(dense, (params, later), strict=True):
        assert sorted(delta.dense) == sorted(want)
        for name, value in want.items():
            assert delta.dense[name].tobytes() == value.tobytes()
    assert all(not d.dense for _, d, _ in deltas if d.shard != DENSE_SHARD), "row deltas carry no dense"


async def _boot_from(js, manifest: model_pb2.SnapshotManifest, deltas) -> Rows:
    """A replica from a snapshot: its chunks, then each shard's deltas after the shard's position."""
    rows: Rows = {(s, t): {} for s in range(2) for t in TABLES}
    async for chunk in snapshots.read_chunks(js, manifest):
        assert chunk.sequence == 0
        if chunk.shard != DENSE_SHARD:
            _apply(rows, chunk)
    covered = {p.shard: p.sequence for p in manifest.shards}
    for seq, delta, _ in deltas:
        if delta.shard == DENSE_SHARD:
            continue
        if delta.sequence <= covered[delta.shard]:
            assert seq <= manifest.delta_stream_seq, "a covered delta comes after the snapshot's stream position"
        else:
            _apply(rows, delta)
    return rows


async def test_a_snapshot_plus_later_deltas_rebuild_the_store_bit_exactly_despite_concurrent_pushes(
    nats_url, js, stores, writer
):
    rng = np.random.default_rng(4)
    nc = await bus.connect(BusConfig(nats_url=nats_url), "test-requester")
    async with PublisherService(_config(stores), BusConfig(nats_url=nats_url)) as publisher:
        dense = await _publish_dense(js, step=3)
        for _ in range(2):
            await _push(writer, rng)
        await assert_eventually(lambda: _caught_up(publisher, stores) and publisher.dense.step == 3)
        # The store changes between the pages of the snapshot's export, as a training store does.
        in_snapshot, pushed_during = False, []
        take_snapshot = publisher.take_snapshot

        async def flagged(reason):
            nonlocal in_snapshot
            in_snapshot = True
            try:
                return await take_snapshot(reason)
            finally:
                in_snapshot = False

        publisher.take_snapshot = flagged
        for shard in publisher.shards:
            export = shard.client.export

            async def export_then_push(table, since, limit, export=export):
                page = await export(table, since, limit)
                if in_snapshot:
                    await _push(writer, rng, n=40)
                    pushed_during.append(table)
                return page

            shard.client.export = export_then_push
        manifest = await snapshots.request_snapshot(nc, MODEL, "test", timeout_s=20)
        publisher.take_snapshot = take_snapshot
        for _ in range(2):
            await _push(writer, rng)
        await assert_eventually(lambda: _caught_up(publisher, stores), message="caught up after the snapshot")
    await nc.close()

    assert len(pushed_during) >= 8, "the store changed while the snapshot was exported"
    assert manifest.reason == "on demand: test"
    assert manifest.model_config and json.loads(manifest.model_config)["slot_dims"] == {"1": 16}
    assert (manifest.dense_sequence, manifest.dense_step) == (1, 3)
    assert len(manifest.chunks) > 2 * len(TABLES)  # pages of 64 rows
    assert manifest.rows == sum(c.rows for c in manifest.chunks)
    for position in manifest.shards:
        assert set(position.table_versions) == set(TABLES)
    deltas = await _deltas(js)
    covered = {p.shard: p.sequence for p in manifest.shards} | {DENSE_SHARD: manifest.dense_sequence}
    assert manifest.delta_stream_seq == max(seq for seq, d, _ in deltas if d.sequence <= covered[d.shard])
    assert any(d.sequence > covered[0] for _, d, _ in deltas if d.shard == 0), "deltas follow the snapshot"
    assert await _boot_from(js, manifest, deltas) == _store_rows(stores)
    chunks = [c async for c in snapshots.read_chunks(js, manifest)]
    assert chunks[-1].shard == DENSE_SHARD and chunks[-1].dense["bias"].tobytes() == dense["bias"].tobytes()
    candidate = await js.get_last_msg(bus.MODEL.name, snapshots.candidate_subject(MODEL))
    assert model_pb2.SnapshotManifest.FromString(candidate.data) == manifest


async def test_on_demand_snapshots_are_pruned_to_the_newest_and_the_approved_one(nats_url, js, stores, writer):
    rng = np.random.default_rng(5)
    nc = await bus.connect(BusConfig(nats_url=nats_url), "test-requester")
    ids = []
    async with PublisherService(_config(stores, snapshot_keep=2), BusConfig(nats_url=nats_url)) as publisher:
        for i in range(5):
            await _push(writer, rng, n=20)
            ids.append((await snapshots.request_snapshot(nc, MODEL, f"#{i}", timeout_s=20)).id)
            if i == 0:
                approval = model_pb2.Approval(model=MODEL, snapshot=ids[0], decision=model_pb2.DECISION_APPROVE)
                await bus.publish(js, snapshots.approved_subject(MODEL), approval.SerializeToString())
        # A request naming another model, sent to this model's publisher, gets an error reply.
        req = model_pb2.SnapshotRequest(model="other", reason="x")
        reply = await nc.request(snapshots.request_subject(MODEL), req.SerializeToString(), timeout=5)
        assert reply.headers[snapshots.ERROR_HEADER] == "this publisher serves model 'fm', not 'other'"
        assert publisher.stats["snapshots"] == 5
    await nc.close()

    assert ids == sorted(ids) and len(set(ids)) == 5
    assert list(await snapshots.list_snapshots(js, MODEL)) == [ids[0], ids[3], ids[4]]
    approved, manifest, _ = await snapshots.latest_approved(js, MODEL)
    assert manifest.id == ids[0] and manifest.reason == "on demand: #0"


async def test_interval_snapshots_are_taken_by_the_loop(nats_url, js, stores, writer):
    await _push(writer, np.random.default_rng(6), n=20)
    config = _config(stores, snapshot_interval_s=0.2)
    async with PublisherService(config, BusConfig(nats_url=nats_url)) as publisher:
        await assert_eventually(lambda: publisher.stats["snapshots"] >= 2, message="two interval snapshots")
    raw = await js.get_last_msg(bus.MODEL.name, snapshots.candidate_subject(MODEL))
    manifest = model_pb2.SnapshotManifest.FromString(raw.data)
    assert manifest.reason == "interval"
    assert await _boot_from(js, manifest, await _deltas(js)) == _store_rows(stores)


async def test_a_restart_recovers_every_cursor_without_resending_or_skipping_rows(nats_url, js, stores, writer):
    rng = np.random.default_rng(7)
    bus_config = BusConfig(nats_url=nats_url)
    async with PublisherService(_config(stores), bus_config) as first:
        await _publish_dense(js, step=2)
        await _push(writer, rng)
        await assert_eventually(lambda: _caught_up(first, stores) and first.dense.step == 2)
        before = {s.shard: (s.sequence, dict(s.cursors)) for s in first.shards}
    published = await _deltas(js)
    # While it is down only fm_17 changes, on a known set of fids.
    fids = np.arange(1000, 1040, dtype=np.int64)
    await writer.push("fm_17", fids, np.ones((len(fids), 17), np.float32))

    async with PublisherService(_config(stores), bus_config) as second:
        assert {s.shard: (s.sequence, s.cursors) for s in second.shards} == before
        assert (second.dense.sequence, second.dense.step) == (1, 2)
        assert second.last_stream_seq == max(seq for seq, _, _ in published)
        await assert_eventually(lambda: _caught_up(second, stores))
        await _publish_dense(js, step=4)
        await assert_eventually(lambda: second.dense.step == 4)

    deltas = await _deltas(js)
    _check_stream_order(deltas)
    new = deltas[len(published) :]
    assert {(d.shard, d.table) for _, d, _ in new} == {(0, "fm_17"), (1, "fm_17"), (DENSE_SHARD, "")}
    resent = sorted(f for _, d, _ in new for f in d.fids.tolist())
    assert resent == fids.tolist(), "exactly the rows changed while it was down, once"
    assert [d.sequence for _, d, _ in new if d.shard == DENSE_SHARD] == [2]
    assert _replay(deltas) == _store_rows(stores)


async def test_a_lagging_validator_slows_publishing_and_no_row_is_lost(nats_url, js, stores, writer):
    rng = np.random.default_rng(8)
    await bus.declare_consumer(js, bus.ConsumerSpec(bus.MODEL.name, "validator", f"model.{MODEL}.delta.>"))
    config = _config(stores, max_lag=3)
    async with PublisherService(config, BusConfig(nats_url=nats_url)) as publisher:
        await _push(writer, rng)
        await assert_eventually(lambda: publisher.throttled, message="publisher slowed down")
        held = len(await _deltas(js))
        waits = publisher.stats["lag_waits"]
        pushed = sum([await _push(writer, rng) for _ in range(3)])
        await assert_eventually(lambda: publisher.stats["lag_waits"] >= waits + 10, message="loop kept waiting")
        assert len(await _deltas(js)) == held, "nothing was published while the validator lagged"
        assert not _caught_up(publisher, stores)

        sub = await js.pull_subscribe_bind("validator", stream=bus.MODEL.name)

        async def validator_catches_up() -> bool:
            try:
                for msg in await sub.fetch(50, timeout=0.2):
                    await msg.ack()
            except TimeoutError:
                pass
            return _caught_up(publisher, stores) and not publisher.throttled

        await assert_eventually(validator_catches_up, timeout_s=20, message="publisher resumed and caught up")
        await sub.unsubscribe()

    deltas = await _deltas(js)
    _check_stream_order(deltas)
    assert _replay(deltas) == _store_rows(stores)
    # The held-back pushes coalesced into one export: a row pushed in several of them was sent once.
    sent: dict[tuple[int, str], list[int]] = defaultdict(list)
    for _, delta, _ in deltas[held:]:
        sent[(delta.shard, delta.table)] += delta.fids.tolist()
    assert all(len(fids) == len(set(fids)) for fids in sent.values())
    assert sum(map(len, sent.values())) < pushed


async def test_a_stream_that_refuses_deltas_is_retried_without_moving_cursors(nats_url, js, stores, writer):
    rng = np.random.default_rng(9)
    async with PublisherService(_config(stores), BusConfig(nats_url=nats_url)) as publisher:
        await _push(writer, rng)
        await assert_eventually(lambda: _caught_up(publisher, stores))
        held = len(await _deltas(js))
        full = bus.MODEL.config()
        full.max_msgs, full.discard = held, DiscardPolicy.NEW
        await js.update_stream(full)  # the MODEL stream now refuses every new message
        cursors = [dict(s.cursors) for s in publisher.shards]
        await _push(writer, rng)
        await assert_eventually(lambda: publisher.stats["retries"] >= 3, message="publish retried")
        assert [s.cursors for s in publisher.shards] == cursors, "no cursor moved past an unacknowledged delta"
        await bus.declare_streams(js, [bus.MODEL])  # back to its declared config
        await assert_eventually(lambda: _caught_up(publisher, stores), timeout_s=15)

    deltas = await _deltas(js)
    _check_stream_order(deltas)
    assert _replay(deltas) == _store_rows(stores)


async def test_failed_exports_are_retried_and_lose_nothing(nats_url, js, stores, writer):
    rng = np.random.default_rng(10)
    async with PublisherService(_config(stores, retry_backoff_s=0.05), BusConfig(nats_url=nats_url)) as publisher:
        export, failures = publisher.shards[1].client.export, []

        async def unavailable_thrice(table, since, limit):
            if len(failures) < 3:
                failures.append(since)
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "store restarting")
            return await export(table, since, limit)

        publisher.shards[1].client.export = unavailable_thrice
        await _push(writer, rng)
        await assert_eventually(
            lambda: _caught_up(publisher, stores), message="caught up after the store came back"
        )
        assert publisher.stats["retries"] >= 3 and not publisher.failed

    assert len(failures) == 3
    deltas = await _deltas(js)
    _check_stream_order(deltas)
    assert _replay(deltas) == _store_rows(stores)


async def test_a_store_without_a_table_of_the_model_stops_the_publisher_with_the_store_error(nats_url, js):
    async with StoreService(StoreConfig(port=0, tables=("fm:9",))) as store:
        config = PublisherConfig(store_address=store.address, model_config=MODEL_CONFIG, interval_s=0.02)
        async with PublisherService(config, BusConfig(nats_url=nats_url)) as publisher:
            await assert_eventually(lambda: publisher.failed is not None, message="publisher stopped")
            assert publisher.stopping.is_set()
    assert publisher.failed.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown table 'fm_17'" in publisher.failed.details()
