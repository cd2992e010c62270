"""Snapshots in the JetStream object store on a real nats-server: write, read, verify, prune, request."""

from __future__ import annotations

import numpy as np
import pytest

from freshet import bus, snapshots
from freshet.config import BusConfig
from freshet.delta import DENSE_SHARD, Delta
from freshet.model.v1 import model_pb2
from freshet.snapshots import SnapshotError

MODEL = "fm"


def _chunks(seed: int = 0) -> list[Delta]:
    rng = np.random.default_rng(seed)
    out = []
    for shard, table, n, dim in ((0, "fm", 300, 9), (1, "fm", 5, 9), (0, "fm_17", 40, 17)):
        out.append(
            Delta(
                model=MODEL,
                table=table,
                shard=shard,
                sequence=0,
                base_version=0,
                new_version=n,
                fids=rng.integers(0, 1 << 40, n, dtype=np.int64),
                values=rng.standard_normal((n, dim)).astype(np.float32),
            )
        )
    out.append(
        Delta(
            model=MODEL,
            table="",
            shard=DENSE_SHARD,
            sequence=0,
            base_version=0,
            new_version=0,
            fids=np.zeros(0, np.int64),
            values=np.zeros((0, 0), np.float32),
            dense={"mlp.0.weight": rng.standard_normal((4, 3)).astype(np.float32)},
            dense_step=17,
        )
    )
    return out


def _manifest(reason: str = "test") -> model_pb2.SnapshotManifest:
    return model_pb2.SnapshotManifest(
        model=MODEL,
        shards=[model_pb2.ShardPosition(shard=0, sequence=12, table_versions={"fm": 300, "fm_17": 40})],
        delta_stream_seq=99,
        dense_sequence=3,
        dense_step=17,
        reason=reason,
    )


def _rows() -> tuple[np.ndarray, np.ndarray]:
    return np.array([1], np.int64), np.ones((1, 9), np.float32)


async def _read_all(js, manifest) -> list[Delta]:
    return [d async for d in snapshots.read_chunks(js, manifest)]


async def test_a_written_snapshot_reads_back_bit_exactly(js):
    chunks = _chunks()
    written = await snapshots.write_snapshot(js, _manifest(), chunks)

    assert written.id and written.rows == 345
    assert [(c.table, c.shard, c.rows) for c in written.chunks] == [
        ("fm", 0, 300),
        ("fm", 1, 5),
        ("fm_17", 0, 40),
        ("", DENSE_SHARD, 0),
    ]
    manifest = await snapshots.read_manifest(js, MODEL, written.id)
    assert manifest == written
    got = await _read_all(js, manifest)
    assert len(got) == len(chunks)
    for want, have in zip(chunks, got, strict=True):
        assert (have.table, have.shard, have.sequence) == (want.table, want.shard, 0)
        np.testing.assert_array_equal(have.fids, want.fids)
        assert have.values.dtype == np.float32
        assert have.values.tobytes() == want.values.tobytes()
    assert got[-1].dense_step == 17
    assert got[-1].dense["mlp.0.weight"].tobytes() == chunks[-1].dense["mlp.0.weight"].tobytes()


async def test_a_missing_chunk_is_a_snapshot_error_naming_it(js):
    written = await snapshots.write_snapshot(js, _manifest(), _chunks())
    store = await snapshots.open_bucket(js)
    await store.delete(written.chunks[1].object)

    with pytest.raises(SnapshotError, match=f"'{written.chunks[1].object}' is missing"):
        await _read_all(js, written)


async def test_a_corrupt_chunk_is_a_snapshot_error_naming_it(js):
    written = await snapshots.write_snapshot(js, _manifest(), _chunks())
    store = await snapshots.open_bucket(js)
    name = written.chunks[2].object
    data = bytearray((await store.get(name)).data)
    data[len(data) // 2] ^= 0xFF
    await store.put(name, bytes(data))

    with pytest.raises(SnapshotError, match=f"chunk '{name}' is corrupt"):
        await _read_all(js, written)


async def test_a_chunk_swapped_for_another_valid_one_is_a_snapshot_error(js):
    written = await snapshots.write_snapshot(js, _manifest(), _chunks())
    store = await snapshots.open_bucket(js)
    other = (await store.get(written.chunks[0].object)).data
    await store.put(written.chunks[1].object, other)

    with pytest.raises(SnapshotError, match="the manifest says 5 rows"):
        await _read_all(js, written)


async def test_an_unknown_snapshot_is_a_snapshot_error(js):
    with pytest.raises(SnapshotError, match="manifest' is missing"):
        await snapshots.read_manifest(js, MODEL, "000000000000001-000000")


async def test_latest_approved_reads_the_last_approval_and_its_manifest(js):
    assert await snapshots.latest_approved(js, MODEL) is None
    first = await snapshots.write_snapshot(js, _manifest("first"), _chunks(1))
    second = await snapshots.write_snapshot(js, _manifest("second"), _chunks(2))
    for snap in (first, second):
        approval = model_pb2.Approval(model=MODEL, snapshot=snap.id, decision=model_pb2.DECISION_APPROVE)
        await bus.publish(js, snapshots.approved_subject(MODEL), approval.SerializeToString())

    approval, manifest, _ = await snapshots.latest_approved(js, MODEL)

    assert approval.snapshot == second.id
    assert manifest.reason == "second" and manifest == second


async def test_prune_keeps_the_newest_and_every_protected_snapshot(js):
    ids = [(await snapshots.write_snapshot(js, _manifest(str(i)), _chunks(i)[:1])).id for i in range(5)]
    assert ids == sorted(ids)
    # Another model's snapshots are not this model's to prune.
    other = await snapshots.write_snapshot(
        js, model_pb2.SnapshotManifest(model="other"), [Delta("other", "fm", 0, 0, 0, 1, *_rows())]
    )

    deleted = await snapshots.prune(js, MODEL, keep=2, protect=[ids[1]])

    assert deleted == [ids[0], ids[2]]
    assert list(await snapshots.list_snapshots(js, MODEL)) == [ids[1], ids[3], ids[4]]
    for gone in deleted:
        with pytest.raises(SnapshotError):
            await snapshots.read_manifest(js, MODEL, gone)
    for kept in (ids[1], ids[3], ids[4]):
        manifest = await snapshots.read_manifest(js, MODEL, kept)
        assert len(await _read_all(js, manifest)) == 1
    assert list(await snapshots.list_snapshots(js, "other")) == [other.id]


async def test_prune_leaves_a_newer_incomplete_snapshot_and_removes_an_older_one(js):
    store = await snapshots.open_bucket(js)
    await store.put(f"{MODEL}/000000000000001-000000/0", b"leftover of a dead writer")
    kept = await snapshots.write_snapshot(js, _manifest(), _chunks()[:1])
    await store.put(f"{MODEL}/999999999999999-000000/0", b"being written")

    deleted = await snapshots.prune(js, MODEL, keep=1)

    assert deleted == ["000000000000001-000000"]
    assert list(await snapshots.list_snapshots(js, MODEL)) == [kept.id, "999999999999999-000000"]


async def test_request_snapshot_returns_the_manifest_the_responder_sends(js, nats_url):
    nc = await bus.connect(BusConfig(nats_url=nats_url), "test-responder")
    asked = []

    async def respond(msg):
        req = model_pb2.SnapshotRequest.FromString(msg.data)
        asked.append((req.model, req.reason))
        await msg.respond(
            model_pb2.SnapshotManifest(model=req.model, id="x", reason=req.reason).SerializeToString()
        )

    await nc.subscribe(snapshots.request_subject(MODEL), cb=respond)
    try:
        manifest = await snapshots.request_snapshot(nc, MODEL, "gap in shard 1", timeout_s=5)
    finally:
        await nc.close()

    assert asked == [(MODEL, "gap in shard 1")]
    assert (manifest.id, manifest.reason) == ("x", "gap in shard 1")


async def test_request_snapshot_error_reply_is_a_snapshot_error_with_its_text(nats_url):
    nc = await bus.connect(BusConfig(nats_url=nats_url), "test-responder")

    async def respond(msg):
        await nc.publish(msg.reply, b"", headers={snapshots.ERROR_HEADER: "store shard 1 unavailable"})

    await nc.subscribe(snapshots.request_subject(MODEL), cb=respond)
    try:
        with pytest.raises(SnapshotError, match="failed: store shard 1 unavailable"):
            await snapshots.request_snapshot(nc, MODEL, "why", timeout_s=5)
    finally:
        await nc.close()


async def test_request_snapshot_without_a_publisher_is_a_snapshot_error(nats_url):
    nc = await bus.connect(BusConfig(nats_url=nats_url), "test-requester")
    try:
        with pytest.raises(SnapshotError, match="no publisher is listening"):
            await snapshots.request_snapshot(nc, MODEL, "why", timeout_s=5)
    finally:
        await nc.close()


async def test_request_snapshot_that_is_not_answered_in_time_is_a_snapshot_error(nats_url):
    nc = await bus.connect(BusConfig(nats_url=nats_url), "test-requester")

    async def ignore(msg):
        pass  # listens, never answers

    await nc.subscribe(snapshots.request_subject(MODEL), cb=ignore)
    try:
        with pytest.raises(SnapshotError, match="no reply within 0.2 s"):
            await snapshots.request_snapshot(nc, MODEL, "why", timeout_s=0.2)
    finally:
        await nc.close()
