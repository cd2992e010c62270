"""Full model snapshots in the JetStream object store ``FRESHET_SNAPSHOTS``.

A snapshot ``<id>`` of model ``<m>`` is a set of objects written in this order:

- ``<m>/<id>/<n>`` for n = 0, 1, 2 ...: chunks, each a serialized ``ModelDelta`` with sequence 0
  holding up to ~1 MB of one (shard, table)'s rows, or the dense parameters (shard -1, no rows);
- ``<m>/<id>/manifest``: the ``SnapshotManifest``, written last, so a snapshot without a manifest
  is incomplete (a writer died) and is never read.

The publisher writes snapshots (``write_snapshot``) and announces them on ``candidate_subject``;
the validator approves them on ``approved_subject``; replicas boot from ``latest_approved`` and
ask for a new one with ``request_snapshot`` when they find a gap. Ids sort by creation time, so
``prune`` keeps the newest.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import AsyncIterable, AsyncIterator, Collection, Iterable
from typing import NamedTuple

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.errors import Error as JetStreamError
from nats.js.object_store import ObjectStore

from freshet import bus
from freshet.delta import Delta, DeltaError, decode_delta
from freshet.model.v1 import model_pb2

logger = logging.getLogger(__name__)

BUCKET = "FRESHET_SNAPSHOTS"
ERROR_HEADER = "Freshet-Error"
MANIFEST = "manifest"

_ids = itertools.count()


class SnapshotError(Exception):
    """A snapshot cannot be read or obtained: missing objects, checksum mismatch, undecodable bytes,
    an error reply or a timeout. The message names the snapshot and the object."""


def candidate_subject(model: str) -> str:
    """Where the publisher announces a written snapshot (a ``SnapshotManifest``)."""
    return f"model.{model}.snapshot.candidate"


def approved_subject(model: str) -> str:
    """Where the validator repeats each snapshot APPROVE (an ``Approval``); the last one is the latest."""
    return f"model.{model}.snapshot.approved"


def request_subject(model: str) -> str:
    """Core NATS request/reply subject asking the publisher for a snapshot now (outside every stream)."""
    return f"snapshot.request.{model}"


def new_snapshot_id(created_ms: int) -> str:
    """A sortable id: zero-padded creation time in ms, then a per-process counter (two in one ms differ)."""
    return f"{created_ms:015d}-{next(_ids) % 1_000_000:06d}"


def chunk_object(model: str, snapshot_id: str, n: int) -> str:
    return f"{model}/{snapshot_id}/{n}"


def manifest_object(model: str, snapshot_id: str) -> str:
    return f"{model}/{snapshot_id}/{MANIFEST}"


async def open_bucket(js: JetStreamContext) -> ObjectStore:
    """The snapshot bucket, created when missing (idempotent; safe when several services race)."""
    try:
        return await js.object_store(BUCKET)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_object_store(BUCKET)
    except BadRequestError:
        return await js.object_store(BUCKET)  # created concurrently with another config


async def write_snapshot(
    js: JetStreamContext,
    manifest: model_pb2.SnapshotManifest,
    chunks: Iterable[Delta] | AsyncIterable[Delta],
) -> model_pb2.SnapshotManifest:
    """Writes each chunk as an object, then the manifest; returns the manifest written.

    ``manifest`` gets ``id`` (when empty, from ``created_ms``), ``chunks`` and ``rows`` filled in;
    the candidate is not published (the caller does, once it is sure of the snapshot). Chunks are
    written as they come, so an async iterable of exported pages never holds the whole model.

    Args:
        manifest: model, created_ms, shard positions, delta_stream_seq, dense fields, model_config
            and reason set by the caller.
        chunks: deltas of up to ~1 MB: rows fids int64 [n], values float32 [n, dim] of one
            (shard, table), or a dense chunk (shard -1). Their sequence is written as 0.
    """
    if not manifest.model:
        raise ValueError("a snapshot manifest needs its model")
    if not manifest.created_ms:
        manifest.created_ms = bus.now_ms()
    if not manifest.id:
        manifest.id = new_snapshot_id(manifest.created_ms)
    store = await open_bucket(js)
    del manifest.chunks[:]
    manifest.rows = 0
    n = 0

    async def put(delta: Delta) -> None:
        nonlocal n
        if delta.sequence != 0:
            delta = dataclasses.replace(delta, sequence=0)
        msg = delta.to_proto()
        name = chunk_object(manifest.model, manifest.id, n)
        await store.put(name, msg.SerializeToString())
        manifest.chunks.append(
            model_pb2.SnapshotChunk(
                object=name, table=delta.table, shard=delta.shard, rows=len(delta.fids), checksum=msg.checksum
            )
        )
        manifest.rows += len(delta.fids)
        n += 1

    if isinstance(chunks, AsyncIterable):
        async for delta in chunks:
            await put(delta)
    else:
        for delta in chunks:
            await put(delta)
    await store.put(manifest_object(manifest.model, manifest.id), manifest.SerializeToString())
    logger.info(
        "snapshot written",
        extra={"model": manifest.model, "snapshot": manifest.id, "chunks": n, "rows": manifest.rows},
    )
    return manifest


async def _get(store: ObjectStore, name: str, what: str) -> bytes:
    try:
        result = await store.get(name)
    except ObjectNotFoundError:
        raise SnapshotError(f"{what}: object {name!r} is missing from bucket {BUCKET}") from None
    except JetStreamError as exc:  # digest mismatch, bad object meta
        raise SnapshotError(f"{what}: object {name!r} cannot be read: {exc!r}") from None
    return bytes(result.data)


async def read_manifest(js: JetStreamContext, model: str, snapshot_id: str) -> model_pb2.SnapshotManifest:
    """The manifest of snapshot ``snapshot_id``.

    Raises:
        SnapshotError: no such snapshot (or it is incomplete), or undecodable.
    """
    store = await open_bucket(js)
    name = manifest_object(model, snapshot_id)
    data = await _get(store, name, f"snapshot {model}/{snapshot_id}")
    try:
        manifest = model_pb2.SnapshotManifest.FromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for bad bytes
        raise SnapshotError(f"snapshot {model}/{snapshot_id}: manifest {name!r} is undecodable: {exc}") from None
    if manifest.model != model or manifest.id != snapshot_id:
        raise SnapshotError(
            f"snapshot {model}/{snapshot_id}: manifest {name!r} names {manifest.model}/{manifest.id}"
        )
    return manifest


async def read_chunks(js: JetStreamContext, manifest: model_pb2.SnapshotManifest) -> AsyncIterator[Delta]:
    """Yields the snapshot's chunks in order, decoded and checked against the manifest.

    Each chunk's own checksum, and its checksum, table, shard and row count as the manifest
    recorded them, must match. Rows come as float32 whatever encoding they travelled in; the
    dense chunk has shard -1 and its parameters in ``dense``.

    Raises:
        SnapshotError: a chunk object is missing, corrupt or not the one the manifest names.
    """
    store = await open_bucket(js)
    what = f"snapshot {manifest.model}/{manifest.id}"
    for chunk in manifest.chunks:
        data = await _get(store, chunk.object, what)
        try:
            delta = decode_delta(data)
        except DeltaError as exc:
            raise SnapshotError(f"{what}: chunk {chunk.object!r} is corrupt: {exc}") from None
        if (delta.checksum, delta.table, delta.shard, len(delta.fids)) != (
            chunk.checksum,
            chunk.table,
            chunk.shard,
            chunk.rows,
        ):
            raise SnapshotError(
                f"{what}: chunk {chunk.object!r} holds {len(delta.fids)} rows of {delta.table!r}/{delta.shard} "
                f"(crc {delta.checksum}), the manifest says {chunk.rows} rows of {chunk.table!r}/{chunk.shard} "
                f"(crc {chunk.checksum})"
            )
        yield delta


class ApprovedSnapshot(NamedTuple):
    """The latest snapshot approval: the APPROVE, the snapshot's manifest, and the approval's stream sequence."""

    approval: model_pb2.Approval
    manifest: model_pb2.SnapshotManifest
    seq: int


async def latest_approved(js: JetStreamContext, model: str) -> ApprovedSnapshot | None:
    """The validator's latest snapshot APPROVE and that snapshot's manifest; None when none was approved.

    Raises:
        SnapshotError: the approved snapshot's manifest is missing or undecodable.
    """
    try:
        raw = await js.get_last_msg(bus.MODEL.name, approved_subject(model))
    except NotFoundError:
        return None
    try:
        approval = model_pb2.Approval.FromString(raw.data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for bad bytes
        raise SnapshotError(f"approval #{raw.seq} on {approved_subject(model)} is undecodable: {exc}") from None
    if not approval.snapshot:
        raise SnapshotError(f"approval #{raw.seq} on {approved_subject(model)} names no snapshot")
    return ApprovedSnapshot(approval, await read_manifest(js, model, approval.snapshot), raw.seq)


async def request_snapshot(
    nc: NATS, model: str, reason: str, timeout_s: float = 30.0
) -> model_pb2.SnapshotManifest:
    """Asks the publisher for a snapshot now and returns its manifest (written, announced as a candidate).

    Raises:
        SnapshotError: no publisher answers, it did not answer within ``timeout_s``, or it replied
            with an error (its text in the message).
    """
    subject = request_subject(model)
    req = model_pb2.SnapshotRequest(model=model, reason=reason)
    try:
        reply = await nc.request(subject, req.SerializeToString(), timeout=timeout_s)
    except nats.errors.NoRespondersError:
        raise SnapshotError(f"snapshot request on {subject}: no publisher is listening") from None
    except (nats.errors.TimeoutError, TimeoutError):
        raise SnapshotError(f"snapshot request on {subject}: no reply within {timeout_s} s") from None
    error = (reply.headers or {}).get(ERROR_HEADER)
    if error:
        raise SnapshotError(f"snapshot request on {subject} failed: {error}")
    try:
        return model_pb2.SnapshotManifest.FromString(reply.data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for bad bytes
        raise SnapshotError(f"snapshot request on {subject}: undecodable reply: {exc}") from None


async def list_snapshots(js: JetStreamContext, model: str) -> dict[str, list[str]]:
    """Object names of each snapshot id of ``model`` (complete or not), ids sorted oldest first."""
    store = await open_bucket(js)
    try:
        infos = await store.list(ignore_deletes=True)
    except NotFoundError:  # an empty bucket
        return {}
    by_id: dict[str, list[str]] = {}
    prefix = f"{model}/"
    for info in infos:
        if info.name.startswith(prefix) and not info.deleted:
            snapshot_id = info.name[len(prefix) :].split("/", 1)[0]
            by_id.setdefault(snapshot_id, []).append(info.name)
    return dict(sorted(by_id.items()))


async def prune(js: JetStreamContext, model: str, keep: int, protect: Collection[str] = ()) -> list[str]:
    """Deletes every snapshot of ``model`` but the newest ``keep`` complete ones and those in ``protect``.

    An incomplete snapshot (chunks without a manifest) older than the oldest one kept is a dead
    writer's leftover and goes too; a newer one may still be being written and stays. Manifests are
    deleted first, so a reader never finds a manifest whose chunks are gone.

    Returns:
        The deleted ids, oldest first.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    snapshots = await list_snapshots(js, model)
    complete = [i for i, names in snapshots.items() if manifest_object(model, i) in names]
    kept = set(complete[-keep:] if keep else []) | set(protect)
    oldest_kept = min(complete[-keep:]) if keep and complete else None
    store = await open_bucket(js)
    deleted = []
    for snapshot_id, names in snapshots.items():
        if snapshot_id in kept:
            continue
        if snapshot_id not in complete and (oldest_kept is None or snapshot_id > oldest_kept):
            continue  # possibly still being written
        for name in sorted(names, key=lambda n: not n.endswith(f"/{MANIFEST}")):
            try:
                await store.delete(name)
            except ObjectNotFoundError:
                pass  # pruned concurrently
        deleted.append(snapshot_id)
    if deleted:
        logger.info("snapshots pruned", extra={"model": model, "deleted": deleted, "kept": sorted(kept)})
    return deleted
