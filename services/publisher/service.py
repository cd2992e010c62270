"""The publisher: every interval, rows changed in the store since its cursor become a delta.

Deltas on ``model.<model>.delta`` are numbered 1, 2, 3 ... and carry the store version range
they cover (base -> new). The cursor is recovered on restart from the last published delta,
and each delta's ``Nats-Msg-Id`` is its sequence, so a retried publish is never stored twice.
New dense parameters (``dense.<model>``) ride along in the next delta.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from nats.js.errors import NotFoundError

from freshet import bus, telemetry
from freshet.clients import StoreClient
from freshet.config import BusConfig
from freshet.delta import Delta, decode_delta, delta_subject
from freshet.model.v1 import model_pb2
from freshet.runtime import NatsMixin, Service
from freshet.tensors import from_tensor
from services.publisher.config import PublisherConfig

logger = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)


class PublisherService(NatsMixin, Service):
    """Exports one store shard's changes as an ordered delta stream."""

    name = "publisher"

    def __init__(self, config: PublisherConfig, bus_config: BusConfig) -> None:
        super().__init__()
        self.config = config
        self.bus_config = bus_config
        self.store = StoreClient(config.store_address)
        self.sequence = 0
        self.cursor = 0
        self.dense_step = -1
        self.published_rows = 0

    async def _start(self) -> None:
        await self._connect_nats(self.bus_config, "freshet-publisher")
        await self._recover_cursor()
        self.spawn(self._publish_forever(), "publisher-loop")

    async def _stop(self) -> None:
        await self._drain_nats()
        await self.store.close()

    async def _recover_cursor(self) -> None:
        try:
            raw = await self.js.get_last_msg(bus.MODEL.name, delta_subject(self.config.model))
        except NotFoundError:
            return
        last = decode_delta(raw.data)
        self.sequence, self.cursor, self.dense_step = last.sequence, last.new_version, last.dense_step
        logger.info("resuming delta stream", extra={"sequence": self.sequence, "cursor": self.cursor})

    async def _publish_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.publish_once()
            except grpc.aio.AioRpcError as exc:
                # The store is down or restarting: the cursor is unchanged, so nothing is skipped.
                logger.warning("store export failed; retrying", extra={"code": exc.code().name})
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=self.config.interval_s)
            except TimeoutError:
                pass

    async def _latest_dense(self) -> model_pb2.DenseSnapshot | None:
        try:
            raw = await self.js.get_last_msg(bus.DENSE.name, f"dense.{self.config.model}")
        except NotFoundError:
            return None
        snap = model_pb2.DenseSnapshot.FromString(raw.data)
        return snap if snap.step != self.dense_step else None

    async def publish_once(self) -> int:
        """Publishes every change since the cursor; returns the number of deltas published."""
        published = 0
        dense = await self._latest_dense()
        while True:
            page = await self.store.export(self.config.table, self.cursor, self.config.max_rows_per_delta)
            if page.next_version < self.cursor:
                logger.error(
                    "store version went backwards (store restarted without its state?); re-exporting from 0",
                    extra={"cursor": self.cursor, "store_version": page.next_version},
                )
                self.cursor = 0
                continue
            if not len(page.fids) and dense is None:
                return published
            delta = Delta(
                model=self.config.model,
                table=self.config.table,
                shard=0,
                sequence=self.sequence + 1,
                base_version=self.cursor,
                new_version=page.next_version,
                fids=page.fids,
                values=page.values,
                dense={k: from_tensor(v).copy() for k, v in dense.params.items()} if dense else {},
                dense_step=dense.step if dense else self.dense_step,
                created_ms=bus.now_ms(),
            )
            with tracer.start_as_current_span("publish_delta", attributes={"sequence": delta.sequence}):
                await bus.publish(
                    self.js,
                    delta_subject(self.config.model),
                    delta.to_proto().SerializeToString(),
                    msg_id=f"delta:{self.config.model}:0:{delta.sequence}",
                )
            self.sequence, self.cursor, self.dense_step = delta.sequence, delta.new_version, delta.dense_step
            self.published_rows += len(page.fids)
            published += 1
            dense = None
            if not page.has_more:
                return published
