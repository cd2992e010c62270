"""The publisher: every interval, rows changed in each store shard since its cursor become a delta.

Deltas of shard ``s`` go to ``model.<model>.delta.<s>``, numbered 1, 2, 3 ... per shard, and carry
the store version range they cover (base -> new). Each shard's cursor is recovered on restart
from its last published delta, and each delta's ``Nats-Msg-Id`` is (model, shard, sequence), so a
retried publish is stored once. New dense parameters (``dense.<model>``) ride along in shard 0's
next delta.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from nats.js.errors import NotFoundError

from freshet import bus, telemetry
from freshet.clients import StoreClient
from freshet.config import BusConfig
from freshet.delta import Delta, decode_delta, delta_subject
from freshet.model.v1 import model_pb2
from freshet.models import model_from_setting
from freshet.runtime import NatsMixin, Service
from freshet.tensors import from_tensor
from services.publisher.config import PublisherConfig

logger = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)


@dataclass
class ShardCursor:
    """Where the delta stream of one store shard stands."""

    shard: int
    client: StoreClient
    sequence: int = 0
    cursor: int = 0


class PublisherService(NatsMixin, Service):
    """Exports every store shard's changes as ordered per-shard delta streams."""

    name = "publisher"

    def __init__(self, config: PublisherConfig, bus_config: BusConfig) -> None:
        super().__init__()
        self.config = config
        self.bus_config = bus_config
        tables = model_from_setting(config.model_config).tables()
        if list(tables) != [config.table]:
            raise ValueError(
                f"the publisher streams one table (FRESHET_TABLE={config.table!r}) but the model "
                f"(FRESHET_MODEL_CONFIG) has tables {sorted(tables)}: models with several tables (per-slot "
                "dims) train, but cannot be served yet"
            )
        addresses = [a.strip() for a in config.store_address.split(",") if a.strip()]
        self.shards = [ShardCursor(i, StoreClient(a)) for i, a in enumerate(addresses)]
        self.dense_step = -1
        self.published_rows = 0

    @property
    def cursor(self) -> int:
        """Shard 0's cursor (the whole store's when it has one shard)."""
        return self.shards[0].cursor

    @property
    def sequence(self) -> int:
        return self.shards[0].sequence

    async def _start(self) -> None:
        await self._connect_nats(self.bus_config, "freshet-publisher")
        for shard in self.shards:
            await self._recover_cursor(shard)
        self.spawn(self._publish_forever(), "publisher-loop")

    async def _stop(self) -> None:
        await self._drain_nats()
        for shard in self.shards:
            await shard.client.close()

    async def _recover_cursor(self, shard: ShardCursor) -> None:
        try:
            raw = await self.js.get_last_msg(bus.MODEL.name, delta_subject(self.config.model, shard.shard))
        except NotFoundError:
            return
        last = decode_delta(raw.data)
        shard.sequence, shard.cursor = last.sequence, last.new_version
        if shard.shard == 0:
            self.dense_step = last.dense_step
        logger.info(
            "resuming delta stream",
            extra={"shard": shard.shard, "sequence": shard.sequence, "cursor": shard.cursor},
        )

    async def _publish_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.publish_once()
            except grpc.aio.AioRpcError as exc:
                # The store is down or restarting: cursors are unchanged, so nothing is skipped.
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
        """Publishes every change since the cursors; returns the number of deltas published."""
        dense = await self._latest_dense()
        counts = await asyncio.gather(
            *(self._publish_shard(shard, dense if shard.shard == 0 else None) for shard in self.shards)
        )
        return sum(counts)

    async def _publish_shard(self, shard: ShardCursor, dense: model_pb2.DenseSnapshot | None) -> int:
        published = 0
        while True:
            page = await shard.client.export(self.config.table, shard.cursor, self.config.max_rows_per_delta)
            if page.next_version < shard.cursor:
                logger.error(
                    "store version went backwards (store restored from an older checkpoint); re-exporting from 0",
                    extra={"shard": shard.shard, "cursor": shard.cursor, "store_version": page.next_version},
                )
                shard.cursor = 0
                continue
            if not len(page.fids) and dense is None:
                return published
            delta = Delta(
                model=self.config.model,
                table=self.config.table,
                shard=shard.shard,
                sequence=shard.sequence + 1,
                base_version=shard.cursor,
                new_version=page.next_version,
                fids=page.fids,
                values=page.values,
                dense={k: from_tensor(v).copy() for k, v in dense.params.items()} if dense else {},
                dense_step=dense.step if dense else self.dense_step,
                created_ms=bus.now_ms(),
                encoding=self.config.encoding,
            )
            with tracer.start_as_current_span(
                "publish_delta", attributes={"shard": shard.shard, "sequence": delta.sequence}
            ):
                await bus.publish(
                    self.js,
                    delta_subject(self.config.model, shard.shard),
                    delta.to_proto().SerializeToString(),
                    msg_id=f"delta:{self.config.model}:{shard.shard}:{delta.sequence}",
                )
            shard.sequence, shard.cursor = delta.sequence, delta.new_version
            if dense is not None:
                self.dense_step = dense.step
            self.published_rows += len(page.fids)
            published += 1
            dense = None
            if not page.has_more:
                return published
