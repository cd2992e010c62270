"""The embedding store's gRPC service: Pull, Push, Export, Describe, Checkpoint and Rollback over ``TieredTable``s."""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path

import grpc
import numpy as np

from freshet.fids import shard_of
from freshet.grpcutil import BadRequest, strict_service, tensor_arg
from freshet.runtime import GrpcServer, Service
from freshet.store.v1 import store_pb2
from freshet.tensors import to_tensor
from services.store.config import StoreConfig
from services.store.optimizers import AdagradConfig
from services.store.tables import TableSpec, tables_from_json
from services.store.tiered import RollbackError, TieredTable

logger = logging.getLogger(__name__)

SERVICE_NAME = "freshet.store.v1.EmbeddingStore"


def parse_tables(config: StoreConfig) -> list[TableSpec]:
    """Table specs from ``FRESHET_STORE_TABLES_FILE`` (JSON) or ``name:dim`` specs.

    Raises:
        ValueError: a spec is malformed; the message names the setting.
    """
    if config.tables_file:
        try:
            return tables_from_json(Path(config.tables_file).read_text())
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"FRESHET_STORE_TABLES_FILE={config.tables_file}: {exc}") from None
    tables = []
    for spec in config.tables:
        name, _, dim = spec.partition(":")
        if not name or not dim.isdigit() or int(dim) <= 0:
            raise ValueError(f"FRESHET_STORE_TABLES: bad table spec {spec!r}, expected name:dim")
        tables.append(
            TableSpec(
                name=name,
                dim=int(dim),
                optimizer=AdagradConfig(learning_rate=config.learning_rate),
                init_scale=config.init_scale,
                device_cache_rows=config.device_cache_rows,
            )
        )
    return tables


class StoreHandlers:
    """Request validation and table dispatch, separate from the server so tests can call it directly."""

    def __init__(self, tables: dict[str, TieredTable], config: StoreConfig) -> None:
        self.tables = tables
        self.config = config
        # Drawn per process: tells writers that the shard restarted and restored its last checkpoint.
        self.incarnation = secrets.randbits(63) | 1

    def _table(self, name: str) -> TieredTable:
        if name not in self.tables:
            raise BadRequest(f"unknown table {name!r}; tables: {sorted(self.tables)}", grpc.StatusCode.NOT_FOUND)
        return self.tables[name]

    def _fids(self, request) -> np.ndarray:
        fids = tensor_arg(request.fids, np.int64, 1, "fids", self.config.max_fids_per_request)
        if self.config.num_shards > 1:
            wrong = np.flatnonzero(shard_of(fids, self.config.num_shards) != self.config.shard)
            if len(wrong):
                raise BadRequest(
                    f"{len(wrong)} fids belong to other shards (e.g. fid {int(fids[wrong[0]])}); "
                    f"this is shard {self.config.shard} of {self.config.num_shards}"
                )
        return fids

    def _push_args(
        self, request: store_pb2.PushRequest
    ) -> tuple[TieredTable, np.ndarray, np.ndarray, np.ndarray | None]:
        """A Push's table, fids, gradients and counts, checked (nothing applied yet)."""
        table = self._table(request.table)
        fids = self._fids(request)
        grads = tensor_arg(request.grads, np.float32, 2, "grads")
        if grads.shape != (len(fids), table.spec.dim):
            raise BadRequest(f"grads shape {list(grads.shape)} does not match [{len(fids)}, {table.spec.dim}]")
        if not np.isfinite(grads).all():
            bad = int((~np.isfinite(grads)).any(axis=1).sum())
            raise BadRequest(f"grads contain non-finite values in {bad} rows; nothing was applied")
        counts = None
        if request.HasField("counts"):
            counts = tensor_arg(request.counts, np.int32, 1, "counts")
            if counts.shape != (len(fids),) or (counts < 1).any():
                raise BadRequest(f"counts must be {len(fids)} positive int32 values, one per fid")
        return table, fids, grads, counts

    def _push_response(self, table: TieredTable, updated: int) -> store_pb2.PushResponse:
        return store_pb2.PushResponse(version=table.version, rows_updated=updated, incarnation=self.incarnation)

    def _pull_response(self, table: TieredTable, fids: np.ndarray) -> store_pb2.PullResponse:
        return store_pb2.PullResponse(
            values=to_tensor(table.pull(fids)), version=table.version, incarnation=self.incarnation
        )

    async def pull(self, request: store_pb2.PullRequest, context) -> store_pb2.PullResponse:
        return self._pull_response(self._table(request.table), self._fids(request))

    async def push(self, request: store_pb2.PushRequest, context) -> store_pb2.PushResponse:
        table, fids, grads, counts = self._push_args(request)
        return self._push_response(table, table.push(fids, grads, counts))

    async def push_pull(self, request: store_pb2.PushPullRequest, context) -> store_pb2.PushPullResponse:
        """Every push, then every pull; all parts are checked before the first push is applied."""
        pushes = [self._push_args(p) for p in request.pushes]
        pulls = [(self._table(p.table), self._fids(p)) for p in request.pulls]
        pushed = [
            self._push_response(table, table.push(fids, grads, counts)) for table, fids, grads, counts in pushes
        ]
        return store_pb2.PushPullResponse(
            pushes=pushed,
            pulls=[self._pull_response(table, fids) for table, fids in pulls],
            incarnation=self.incarnation,
        )

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

    def table_infos(self) -> list[store_pb2.TableInfo]:
        infos = []
        for name, t in sorted(self.tables.items()):
            ckpt = t.checkpoint_info
            infos.append(
                store_pb2.TableInfo(
                    name=name,
                    dim=t.spec.dim,
                    rows=len(t),
                    version=t.version,
                    checkpoint_id=ckpt.checkpoint_id,
                    checkpoint_version=ckpt.version,
                    checkpoint_tag=ckpt.tag,
                    stats={k: int(v) for k, v in t.stats.items()},
                )
            )
        return infos

    async def describe(self, request: store_pb2.DescribeRequest, context) -> store_pb2.DescribeResponse:
        return store_pb2.DescribeResponse(
            tables=self.table_infos(),
            shard=self.config.shard,
            num_shards=self.config.num_shards,
            incarnation=self.incarnation,
        )

    async def checkpoint(self, request: store_pb2.CheckpointRequest, context) -> store_pb2.CheckpointResponse:
        if not self.config.data_dir:
            raise BadRequest(
                "this store has no data dir (FRESHET_STORE_DATA_DIR): checkpoints need one",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        if request.expected_incarnation and request.expected_incarnation != self.incarnation:
            raise BadRequest(
                f"this shard restarted (incarnation {self.incarnation}, the caller expected "
                f"{request.expected_incarnation}) and restored its last checkpoint; nothing was checkpointed",
                grpc.StatusCode.ABORTED,
            )
        self.checkpoint_all(request.tag, request.snapshot_dir)
        return store_pb2.CheckpointResponse(tables=self.table_infos())

    def checkpoint_all(self, tag: str, snapshot_dir: str = "") -> None:
        """Checkpoints every table (and snapshots them under ``snapshot_dir`` when given).

        Runs synchronously on the event loop on purpose: no Push interleaves, so all tables of
        the shard are captured at one point of the update stream.
        """
        if snapshot_dir and Path(snapshot_dir).exists():
            raise BadRequest(f"snapshot_dir {snapshot_dir!r} already exists", grpc.StatusCode.ALREADY_EXISTS)
        for name, table in self.tables.items():
            if snapshot_dir:
                Path(snapshot_dir).mkdir(parents=True, exist_ok=True)
                table.snapshot(str(Path(snapshot_dir) / name), tag)
            else:
                table.checkpoint(tag)

    async def rollback(self, request: store_pb2.RollbackRequest, context) -> store_pb2.CheckpointResponse:
        if not self.config.data_dir:
            raise BadRequest(
                "this store has no data dir (FRESHET_STORE_DATA_DIR): rollback needs checkpoints, and they need one",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        try:
            self.rollback_all(request.expected_tag or None)
        except RollbackError as exc:
            raise BadRequest(str(exc), grpc.StatusCode.FAILED_PRECONDITION) from None
        return store_pb2.CheckpointResponse(tables=self.table_infos())

    def rollback_all(self, expected_tag: str | None = None) -> None:
        """Rolls every table back to its last tagged checkpoint, or none of them.

        Every table is checked before any is changed, so a wrong tag on one rolls back nothing.
        Synchronous on the event loop, like ``checkpoint_all``: no Pull or Push interleaves, so the
        shard moves from its current state to the checkpoint in one step.

        Raises:
            RollbackError: a table has no data dir or another tag; nothing was changed.
        """
        for table in self.tables.values():
            table.check_rollback(expected_tag)
        for table in self.tables.values():
            table.rollback(expected_tag)


class StoreService(Service):
    """One store shard: tables in memory behind a gRPC server with health checks."""

    name = "store"

    def __init__(self, config: StoreConfig) -> None:
        super().__init__()
        self.config = config
        if not 0 <= config.shard < config.num_shards:
            raise ValueError(
                f"FRESHET_STORE_SHARD={config.shard} outside [0, FRESHET_STORE_NUM_SHARDS={config.num_shards})"
            )
        self.tables: dict[str, TieredTable] = {}
        for spec in parse_tables(config):
            data_dir = str(Path(config.data_dir) / spec.name) if config.data_dir else None
            self.tables[spec.name] = TieredTable(spec, data_dir)
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
                        "PushPull": (h.push_pull, store_pb2.PushPullRequest),
                        "Export": (h.export, store_pb2.ExportRequest),
                        "Describe": (h.describe, store_pb2.DescribeRequest),
                        "Checkpoint": (h.checkpoint, store_pb2.CheckpointRequest),
                        "Rollback": (h.rollback, store_pb2.RollbackRequest),
                    },
                )
            ]
        )
        await self.grpc.start([SERVICE_NAME])
        self.grpc.write_port_file(self.config.port_file)
        logger.info(
            "store serving",
            extra={"address": self.grpc.address, "tables": sorted(self.tables), "shard": self.config.shard},
        )
        self.spawn(self._maintain_forever(), "store-maintain")

    async def _maintain_forever(self) -> None:
        """TTL eviction and periodic checkpoints, between requests on the event loop."""
        loop = asyncio.get_running_loop()
        next_evict = loop.time() + self.config.maintain_interval_s
        interval = self.config.checkpoint_interval_s if self.config.data_dir else 0
        next_ckpt = loop.time() + interval if interval > 0 else float("inf")
        while not self.stopping.is_set():
            now = loop.time()
            if now >= next_evict:
                for table in self.tables.values():
                    table.maintain()  # TTL eviction, demotion to capacity, device cache refresh
                next_evict = now + self.config.maintain_interval_s
            if now >= next_ckpt:
                for table in self.tables.values():
                    table.checkpoint()  # automatic: keeps the tag and the rollback point
                next_ckpt = now + interval
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=max(0.05, min(next_evict, next_ckpt) - now))
            except TimeoutError:
                pass

    async def _before_drain(self) -> None:
        if self.grpc:
            await self.grpc.not_serving()

    async def _stop(self) -> None:
        if self.grpc:
            await self.grpc.stop(grace_s=1.0)
        for table in self.tables.values():
            if self.config.data_dir:
                table.checkpoint()  # flush state last, after requests stopped (automatic, like above)
            table.close()
