"""The embedding store's gRPC service: Pull, Push, Export and Describe over ``EmbeddingTable``s."""

from __future__ import annotations

import logging

import grpc
import numpy as np

from freshet.grpcutil import BadRequest, strict_service
from freshet.runtime import GrpcServer, Service
from freshet.store.v1 import store_pb2
from freshet.tensors import TensorError, from_tensor, to_tensor
from services.store.config import StoreConfig
from services.store.table import EmbeddingTable, HostTable, TableConfig

logger = logging.getLogger(__name__)

SERVICE_NAME = "freshet.store.v1.EmbeddingStore"


def parse_tables(config: StoreConfig) -> list[TableConfig]:
    """Table configs from ``name:dim`` specs.

    Raises:
        ValueError: a spec is not ``name:dim`` with a positive dim.
    """
    tables = []
    for spec in config.tables:
        name, _, dim = spec.partition(":")
        if not name or not dim.isdigit() or int(dim) <= 0:
            raise ValueError(f"FRESHET_STORE_TABLES: bad table spec {spec!r}, expected name:dim")
        tables.append(
            TableConfig(name=name, dim=int(dim), learning_rate=config.learning_rate, init_scale=config.init_scale)
        )
    return tables


class StoreHandlers:
    """Request validation and table dispatch, separate from the server so tests can call it directly."""

    def __init__(self, tables: dict[str, EmbeddingTable], config: StoreConfig) -> None:
        self.tables = tables
        self.config = config

    def _table(self, name: str) -> EmbeddingTable:
        if name not in self.tables:
            raise BadRequest(f"unknown table {name!r}; tables: {sorted(self.tables)}", grpc.StatusCode.NOT_FOUND)
        return self.tables[name]

    def _fids(self, request) -> np.ndarray:
        try:
            fids = from_tensor(request.fids, np.int64, 1, "fids")
        except TensorError as exc:
            raise BadRequest(str(exc)) from None
        if len(fids) > self.config.max_fids_per_request:
            raise BadRequest(
                f"{len(fids)} fids exceed the limit of {self.config.max_fids_per_request} per request",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
        return fids

    async def pull(self, request: store_pb2.PullRequest, context) -> store_pb2.PullResponse:
        table = self._table(request.table)
        values = table.pull(self._fids(request))
        return store_pb2.PullResponse(values=to_tensor(values), version=table.version)

    async def push(self, request: store_pb2.PushRequest, context) -> store_pb2.PushResponse:
        table = self._table(request.table)
        fids = self._fids(request)
        try:
            grads = from_tensor(request.grads, np.float32, 2, "grads")
        except TensorError as exc:
            raise BadRequest(str(exc)) from None
        if grads.shape != (len(fids), table.config.dim):
            raise BadRequest(f"grads shape {list(grads.shape)} does not match [{len(fids)}, {table.config.dim}]")
        if not np.isfinite(grads).all():
            bad = int((~np.isfinite(grads)).any(axis=1).sum())
            raise BadRequest(f"grads contain non-finite values in {bad} rows; nothing was applied")
        updated = table.push(fids, grads)
        return store_pb2.PushResponse(version=table.version, rows_updated=updated)

    async def export(self, request: store_pb2.ExportRequest, context) -> store_pb2.ExportResponse:
        table = self._table(request.table)
        if request.since_version < 0 or request.limit < 0:
            raise BadRequest("since_version and limit must be >= 0")
        page = table.export(request.since_version, request.limit or self.config.export_limit)
        return store_pb2.ExportResponse(
            fids=to_tensor(page.fids),
            values=to_tensor(page.values),
            versions=to_tensor(page.versions),
            next_version=page.next_version,
            has_more=page.has_more,
        )

    async def describe(self, request: store_pb2.DescribeRequest, context) -> store_pb2.DescribeResponse:
        infos = [
            store_pb2.TableInfo(name=name, dim=t.config.dim, rows=len(t), version=t.version)
            for name, t in sorted(self.tables.items())
        ]
        return store_pb2.DescribeResponse(tables=infos, shard=0, num_shards=1)


class StoreService(Service):
    """One store shard: tables in memory behind a gRPC server with health checks."""

    name = "store"

    def __init__(self, config: StoreConfig) -> None:
        super().__init__()
        self.config = config
        self.tables: dict[str, EmbeddingTable] = {t.name: HostTable(t) for t in parse_tables(config)}
        self.handlers = StoreHandlers(self.tables, config)
        self.grpc: GrpcServer | None = None

    @property
    def address(self) -> str:
        assert self.grpc is not None, "service not started"
        return self.grpc.address

    async def _start(self) -> None:
        self.grpc = GrpcServer(self.config.host, self.config.port)
        h = self.handlers
        self.grpc.server.add_generic_rpc_handlers(
            [
                strict_service(
                    SERVICE_NAME,
                    {
                        "Pull": (h.pull, store_pb2.PullRequest),
                        "Push": (h.push, store_pb2.PushRequest),
                        "Export": (h.export, store_pb2.ExportRequest),
                        "Describe": (h.describe, store_pb2.DescribeRequest),
                    },
                )
            ]
        )
        await self.grpc.start([SERVICE_NAME])
        self.grpc.write_port_file(self.config.port_file)
        logger.info("store serving", extra={"address": self.grpc.address, "tables": sorted(self.tables)})

    async def _before_drain(self) -> None:
        if self.grpc:
            await self.grpc.not_serving()

    async def _stop(self) -> None:
        if self.grpc:
            await self.grpc.stop(grace_s=1.0)
