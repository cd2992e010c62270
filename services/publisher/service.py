"""The publisher: store changes become ordered deltas, dense parameters their own deltas, and full
snapshots go to the object store, all from one loop so snapshots line up with the deltas.

- Deltas: every interval, for each store shard and each table of the model, the rows changed since
  that (shard, table)'s cursor become deltas on ``model.<m>.delta.<shard>``, numbered 1, 2, 3 ...
  per shard across tables; base/new version are the table's store versions. Each delta carries
  the shard's cursors of every table after it in the ``Freshet-Cursors`` header, so a restart
  recovers them all from the shard's last message. ``Nats-Msg-Id`` is (model, shard, sequence).
- Dense: when the trainer's ``dense.<m>`` changes, a dense delta (shard -1, no rows) goes to
  ``model.<m>.delta.dense`` with its own sequence, recovered from that subject on restart.
- Snapshots: every ``FRESHET_SNAPSHOT_INTERVAL_S`` and on request (``snapshot.request.<m>``),
  between two delta cycles: every delta exported so far is published, so each shard's last
  sequence is the snapshot's position; then every table is exported from version 0 into chunks
  (see ``freshet.snapshots``), the manifest is announced on ``model.<m>.snapshot.candidate``, and
  old snapshots are pruned. Later deltas are exported after the snapshot's rows, so applying them
  on top never makes a row older.
- Back-pressure: nothing is dropped. A failed export or publish is retried (the same message
  bytes, so a stored-but-unacknowledged delta deduplicates) without moving a cursor; while the
  validator's consumer lags more than ``FRESHET_PUBLISH_MAX_LAG`` messages the loop waits, and
  the rows changed meanwhile coalesce into the next, larger export.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import grpc
import nats.errors
import numpy as np
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential

from freshet import bus, snapshots, telemetry
from freshet.clients import StoreClient
from freshet.config import BusConfig
from freshet.delta import DENSE_SHARD, Delta, decode_delta, delta_subject, dense_subject
from freshet.model.v1 import model_pb2
from freshet.models import model_from_setting
from freshet.runtime import NatsMixin, Service
from freshet.tensors import from_tensor
from services.publisher.config import PublisherConfig

logger = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)

T = TypeVar("T")

CURSORS_HEADER = "Freshet-Cursors"
# Room left in a message for its header fields, checksum and trace/dedup headers.
_MESSAGE_OVERHEAD = 16 << 10
# Store answers that no retry can change: a table the store lacks, a malformed request.
_FATAL_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}


def _transient(exc: BaseException) -> bool:
    """Whether a failed export or publish may succeed when tried again (store or NATS unavailable, slow)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() not in _FATAL_CODES
    if isinstance(exc, nats.errors.MaxPayloadError):
        return False
    return isinstance(exc, (nats.errors.Error, TimeoutError, OSError))


@dataclass
class ShardCursor:
    """Where the delta stream of one store shard stands: its last sequence and each table's cursor."""

    shard: int
    client: StoreClient
    cursors: dict[str, int]  # table -> store version of the table its last delta ended at
    sequence: int = 0


@dataclass
class DenseState:
    """The dense parameters last published (shard -1) and where their stream stands."""

    sequence: int = 0
    step: int = -1
    params: dict[str, np.ndarray] = field(default_factory=dict)


class PublisherService(NatsMixin, Service):
    """Exports every (store shard, table)'s changes as per-shard delta streams, dense deltas and snapshots."""

    name = "publisher"

    def __init__(self, config: PublisherConfig, bus_config: BusConfig) -> None:
        super().__init__()
        self.config = config
        self.bus_config = bus_config
        self.model_config = model_from_setting(config.model_config)
        self.tables = self.model_config.tables()  # store table -> row width, the trainer's names
        addresses = [a.strip() for a in config.store_address.split(",") if a.strip()]
        if not addresses:
            raise ValueError("FRESHET_STORE_ADDRESS names no store shard")
        self.shards = [
            ShardCursor(i, StoreClient(a), dict.fromkeys(self.tables, 0)) for i, a in enumerate(addresses)
        ]
        self.dense = DenseState()
        self.last_stream_seq = 0  # MODEL stream sequence of the last delta published (any shard, dense too)
        self.stats = dict.fromkeys(
            ("deltas", "rows", "dense_deltas", "snapshots", "retries", "lag_waits", "snapshot_failures"), 0
        )
        self.throttled = False
        self._requests: list[Msg] = []
        self._wake = asyncio.Event()
        self._next_snapshot = float("inf")

    @property
    def cursor(self) -> int:
        """Shard 0's cursor of the model's default table (the whole store's when it has one shard and table)."""
        return self.shards[0].cursors[self.model_config.table_prefix]

    @property
    def sequence(self) -> int:
        return self.shards[0].sequence

    @property
    def published_rows(self) -> int:
        return self.stats["rows"]

    async def _start(self) -> None:
        await self._connect_nats(self.bus_config, "freshet-publisher")
        for shard in self.shards:
            await self._recover_shard(shard)
        await self._recover_dense()
        await self.nc.subscribe(
            snapshots.request_subject(self.config.model), queue="publisher", cb=self._on_request
        )
        if self.config.snapshot_interval_s > 0:
            self._next_snapshot = time.monotonic() + self.config.snapshot_interval_s
        self.spawn(self._publish_forever(), "publisher-loop")

    async def _stop(self) -> None:
        await self._drain_nats()
        for shard in self.shards:
            await shard.client.close()

    # -- recovery -------------------------------------------------------------------------------------------

    async def _last(self, subject: str):
        try:
            return await self.js.get_last_msg(bus.MODEL.name, subject)
        except NotFoundError:
            return None

    async def _recover_shard(self, shard: ShardCursor) -> None:
        raw = await self._last(delta_subject(self.config.model, shard.shard))
        if raw is None:
            return
        last = decode_delta(raw.data)
        shard.sequence = last.sequence
        self.last_stream_seq = max(self.last_stream_seq, raw.seq)
        header = (raw.headers or {}).get(CURSORS_HEADER)
        if header:
            cursors = {str(k): int(v) for k, v in json.loads(header).items()}
        else:
            # Not written by this publisher: only the last delta's own table is known. The other
            # tables start over from version 0, which re-sends rows (harmless) but skips none.
            cursors = {last.table: last.new_version}
            logger.warning(
                "last delta has no cursors header; tables other than its own are re-exported from 0",
                extra={"shard": shard.shard, "sequence": last.sequence, "table": last.table},
            )
        shard.cursors = {table: cursors.get(table, 0) for table in self.tables}
        logger.info(
            "resuming delta stream",
            extra={"shard": shard.shard, "sequence": shard.sequence, "cursors": shard.cursors},
        )

    async def _recover_dense(self) -> None:
        raw = await self._last(dense_subject(self.config.model))
        if raw is None:
            return
        last = decode_delta(raw.data)
        self.dense = DenseState(last.sequence, last.dense_step, last.dense)
        self.last_stream_seq = max(self.last_stream_seq, raw.seq)
        logger.info("resuming dense stream", extra={"sequence": last.sequence, "step": last.dense_step})

    # -- the loop -------------------------------------------------------------------------------------------

    async def _publish_forever(self) -> None:
        try:
            while not self.stopping.is_set():
                # Cycles start every interval (not an interval after the last one ended), so a change
                # waits interval / 2 on average for its export, however long the cycles take.
                started = time.monotonic()
                try:
                    await self._snapshot_if_asked_or_due()
                    if await self._must_wait():
                        await self._pause(self.config.interval_s)
                        continue
                    await self.publish_once()
                except Exception:
                    if self.stopping.is_set():
                        break  # a retry given up on shutdown: cursors are where the last ack left them
                    raise
                await self._pause(self.config.interval_s - (time.monotonic() - started))
        finally:
            for msg in self._take_requests():
                await self._reply_error(msg, "the publisher is shutting down")

    async def _pause(self, seconds: float) -> None:
        """Waits ``seconds``, less when stopping or when a snapshot is asked for."""
        self._wake.clear()
        if seconds <= 0:
            return
        waits = [asyncio.ensure_future(self.stopping.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _must_wait(self) -> bool:
        """Back-pressure: whether the validator lags more than ``max_lag`` messages (logged once per episode)."""
        lag = await self.validator_lag()
        slow = lag is not None and lag > self.config.max_lag
        if slow and not self.throttled:
            logger.warning(
                "slowing down: the validator lags; changes coalesce until it catches up",
                extra={"lag": lag, "max_lag": self.config.max_lag, "durable": self.config.validator_durable},
            )
        elif not slow and self.throttled:
            logger.info("validator caught up; publishing again", extra={"lag": lag})
        self.throttled = slow
        self.stats["lag_waits"] += slow
        return slow

    async def validator_lag(self) -> int | None:
        """Messages the validator's consumer has not acknowledged (pending + unacknowledged), None if unknown."""
        if not self.config.max_lag:
            return None
        try:
            info = await self.js.consumer_info(bus.MODEL.name, self.config.validator_durable)
        except NotFoundError:
            return None  # no validator (yet): nobody to wait for
        except Exception as exc:  # noqa: BLE001 - JetStream slow or away: publishing retries will tell
            logger.warning("cannot read the validator's consumer", extra={"error": repr(exc)})
            return None
        return (info.num_pending or 0) + (info.num_ack_pending or 0)

    async def _retrying(self, what: str, op: Callable[[], Awaitable[T]], **fields: object) -> T:
        """Runs ``op`` until it succeeds, with exponential backoff, or until the service stops."""

        def log(state: RetryCallState) -> None:
            self.stats["retries"] += 1
            logger.warning(
                f"slowing down: {what} failed, retrying",
                extra={**fields, "attempt": state.attempt_number, "error": repr(state.outcome.exception())},
            )

        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_transient),
            wait=wait_exponential(multiplier=0.05, max=self.config.retry_backoff_s),
            stop=lambda _: self.stopping.is_set(),
            before_sleep=log,
            reraise=True,
        ):
            with attempt:
                return await op()
        raise AssertionError("unreachable")

    async def _publish(self, subject: str, payload: bytes, msg_id: str, headers: dict | None = None) -> int:
        """Publishes until the MODEL stream acknowledges; returns the stream sequence.

        The same bytes with the same ``msg_id`` are retried, so a message stored before its ack
        was lost is stored once.
        """

        async def once() -> int:
            return await asyncio.wait_for(
                bus.publish(self.js, subject, payload, msg_id=msg_id, headers=headers),
                self.config.publish_timeout_s,
            )

        seq = await self._retrying("publish", once, subject=subject, msg_id=msg_id)
        self.last_stream_seq = max(self.last_stream_seq, seq)
        return seq

    def _rows_per_message(self, width: int) -> int:
        """Rows of ``width`` floats per delta or chunk: the configured limit, lowered to fit the server's payload."""
        budget = self.nc.max_payload - _MESSAGE_OVERHEAD
        return max(1, min(self.config.max_rows_per_delta, budget // (8 + 4 * width)))

    # -- deltas ---------------------------------------------------------------------------------------------

    async def publish_once(self) -> int:
        """Publishes every change since the cursors and new dense parameters; returns the deltas published."""
        dense = await self._publish_dense()
        counts = await asyncio.gather(*(self._publish_shard(shard) for shard in self.shards))
        return dense + sum(counts)

    async def _publish_dense(self) -> int:
        subject = f"dense.{self.config.model}"

        async def latest() -> model_pb2.DenseSnapshot | None:
            try:
                raw = await self.js.get_last_msg(bus.DENSE.name, subject)
            except NotFoundError:
                return None
            return model_pb2.DenseSnapshot.FromString(raw.data)

        snap = await self._retrying("dense read", latest, subject=subject)
        if snap is None or snap.step == self.dense.step:
            return 0
        params = {k: from_tensor(v).copy() for k, v in snap.params.items()}
        delta = Delta(
            model=self.config.model,
            table="",
            shard=DENSE_SHARD,
            sequence=self.dense.sequence + 1,
            base_version=max(self.dense.step, 0),
            new_version=snap.step,
            fids=np.zeros(0, np.int64),
            values=np.zeros((0, 0), np.float32),
            dense=params,
            dense_step=snap.step,
            created_ms=bus.now_ms(),
        )
        payload = delta.to_proto().SerializeToString()
        if len(payload) > self.nc.max_payload - _MESSAGE_OVERHEAD:
            raise ValueError(
                f"dense parameters of step {snap.step} take {len(payload)} bytes, more than the NATS server's "
                f"max payload ({self.nc.max_payload}) allows in one message"
            )
        with tracer.start_as_current_span(
            "publish_dense", attributes={"sequence": delta.sequence, "step": snap.step}
        ):
            await self._publish(
                dense_subject(self.config.model),
                payload,
                msg_id=f"delta:{self.config.model}:dense:{delta.sequence}",
            )
        self.dense = DenseState(delta.sequence, snap.step, params)
        self.stats["dense_deltas"] += 1
        return 1

    async def _publish_shard(self, shard: ShardCursor) -> int:
        published = 0
        for table, width in self.tables.items():
            limit = self._rows_per_message(width)
            while True:
                cursor = shard.cursors[table]
                page = await self._retrying(
                    "export",
                    partial(shard.client.export, table, cursor, limit),
                    shard=shard.shard,
                    table=table,
                )
                if page.next_version < cursor:
                    logger.error(
                        "store version went backwards (store restored from an older checkpoint); re-exporting from 0",
                        extra={
                            "shard": shard.shard,
                            "table": table,
                            "cursor": cursor,
                            "store_version": page.next_version,
                        },
                    )
                    shard.cursors[table] = 0
                    continue
                if not len(page.fids):
                    break
                await self._publish_rows(shard, table, cursor, page)
                published += 1
                if not page.has_more:
                    break
        return published

    async def _publish_rows(self, shard: ShardCursor, table: str, cursor: int, page) -> None:
        delta = Delta(
            model=self.config.model,
            table=table,
            shard=shard.shard,
            sequence=shard.sequence + 1,
            base_version=cursor,
            new_version=page.next_version,
            fids=page.fids,
            values=page.values,
            created_ms=bus.now_ms(),
            encoding=self.config.encoding,
        )
        after = {**shard.cursors, table: page.next_version}
        with tracer.start_as_current_span(
            "publish_delta", attributes={"shard": shard.shard, "table": table, "sequence": delta.sequence}
        ):
            await self._publish(
                delta_subject(self.config.model, shard.shard),
                delta.to_proto().SerializeToString(),
                msg_id=f"delta:{self.config.model}:{shard.shard}:{delta.sequence}",
                headers={CURSORS_HEADER: json.dumps(after, sort_keys=True)},
            )
        shard.sequence, shard.cursors = delta.sequence, after
        self.stats["deltas"] += 1
        self.stats["rows"] += len(page.fids)

    # -- snapshots ------------------------------------------------------------------------------------------

    async def _on_request(self, msg: Msg) -> None:
        # Runs on the connection's task: the snapshot itself is taken by the loop, between delta cycles.
        self._requests.append(msg)
        self._wake.set()

    def _take_requests(self) -> list[Msg]:
        taken, self._requests = self._requests, []
        return taken

    async def _reply_error(self, msg: Msg, text: str) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, b"", headers={snapshots.ERROR_HEADER: text[:512]})

    async def _snapshot_if_asked_or_due(self) -> None:
        asked = []
        for msg in self._take_requests():
            try:
                req = model_pb2.SnapshotRequest.FromString(msg.data)
            except Exception as exc:  # noqa: BLE001 - protobuf raises several types for bad bytes
                await self._reply_error(msg, f"undecodable SnapshotRequest: {exc}")
                continue
            if req.model and req.model != self.config.model:
                await self._reply_error(
                    msg, f"this publisher serves model {self.config.model!r}, not {req.model!r}"
                )
                continue
            asked.append((msg, req.reason))
        due = time.monotonic() >= self._next_snapshot
        if not asked and not due:
            return
        # One snapshot answers every request waiting now: each was made before it started.
        reason = "; ".join(f"on demand: {r or 'no reason given'}" for _, r in asked) if asked else "interval"
        try:
            manifest = await self.take_snapshot(reason)
        except Exception as exc:  # noqa: BLE001 - a failed snapshot never stops the deltas
            self.stats["snapshot_failures"] += 1
            logger.error("snapshot failed", extra={"reason": reason, "error": repr(exc)})
            for msg, _ in asked:
                await self._reply_error(msg, f"snapshot failed: {exc!r}")
            if self.stopping.is_set():
                raise
            # Deltas go on meanwhile; a store or NATS hiccup is retried soon, anything else at the next interval.
            later = (
                self.config.retry_backoff_s if _transient(exc) else self.config.snapshot_interval_s or float("inf")
            )
            self._next_snapshot = time.monotonic() + later
            return
        data = manifest.SerializeToString()
        for msg, _ in asked:
            if msg.reply:
                await self.nc.publish(msg.reply, data)
        if self.config.snapshot_interval_s > 0:
            self._next_snapshot = time.monotonic() + self.config.snapshot_interval_s

    async def take_snapshot(self, reason: str) -> model_pb2.SnapshotManifest:
        """Writes a full snapshot aligned with the deltas published so far, announces it, prunes old ones.

        Call it between delta cycles (the loop does): every exported row is then published, so each
        shard's last sequence is what the snapshot covers.
        """
        model = self.config.model
        manifest = model_pb2.SnapshotManifest(
            model=model,
            created_ms=bus.now_ms(),
            delta_stream_seq=self.last_stream_seq,
            dense_sequence=self.dense.sequence,
            dense_step=max(self.dense.step, 0),
            model_config=self.model_config.to_json(),
            reason=reason,
        )
        positions = {s.shard: manifest.shards.add(shard=s.shard, sequence=s.sequence) for s in self.shards}
        dense = self.dense

        async def chunks():
            for shard in self.shards:
                for table, width in self.tables.items():
                    since, limit = 0, self._rows_per_message(width)
                    while True:
                        page = await self._retrying(
                            "snapshot export",
                            partial(shard.client.export, table, since, limit),
                            shard=shard.shard,
                            table=table,
                        )
                        if len(page.fids):
                            yield Delta(
                                model, table, shard.shard, 0, since, page.next_version, page.fids, page.values,
                                created_ms=manifest.created_ms, encoding=self.config.encoding,
                            )  # fmt: skip
                        since = page.next_version
                        if not page.has_more:
                            break
                    positions[shard.shard].table_versions[table] = since
            if dense.params:
                yield Delta(
                    model, "", DENSE_SHARD, 0, 0, dense.step, np.zeros(0, np.int64), np.zeros((0, 0), np.float32),
                    dense=dense.params, dense_step=dense.step, created_ms=manifest.created_ms,
                )  # fmt: skip

        with tracer.start_as_current_span("take_snapshot", attributes={"reason": reason}) as span:
            manifest = await snapshots.write_snapshot(self.js, manifest, chunks())
            span.set_attribute("snapshot", manifest.id)
            await self._publish(
                snapshots.candidate_subject(model),
                manifest.SerializeToString(),
                msg_id=f"snapshot:{model}:{manifest.id}",
            )
        self.stats["snapshots"] += 1
        logger.info(
            "snapshot published",
            extra={
                "snapshot": manifest.id,
                "reason": reason,
                "rows": manifest.rows,
                "chunks": len(manifest.chunks),
                "delta_stream_seq": manifest.delta_stream_seq,
            },
        )
        await self._prune()
        return manifest

    async def _prune(self) -> None:
        """Keeps the newest ``snapshot_keep`` snapshots and the latest approved one; failures only log."""
        model = self.config.model
        try:
            approved = await snapshots.latest_approved(self.js, model)
            protect = [approved[0].snapshot] if approved else []
            await snapshots.prune(self.js, model, self.config.snapshot_keep, protect)
        except Exception as exc:  # noqa: BLE001 - the next snapshot prunes again
            logger.warning("snapshot pruning failed", extra={"error": repr(exc)})
