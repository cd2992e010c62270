"""The predictor: serves Predict over gRPC from a replica that follows the model's approved state.

``freshet.follower.Follower`` boots the replica from the latest approved snapshot, applies approved
deltas in order, repairs gaps by resync and honours rollbacks; rebuilt replicas are swapped in whole.
Each Predict reads the served replica once and scores it without awaiting, so it is answered by
exactly one model version, which it returns. gRPC health is NOT_SERVING until the boot catch-up is
done; reflection lists the Predictor and health services.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from freshet import telemetry
from freshet.config import BusConfig
from freshet.fids import example_fids
from freshet.follower import Follower, FollowerSettings, FollowerStats
from freshet.grpcutil import BadRequest, strict_service, tensor_arg
from freshet.models import model_from_setting
from freshet.predictor.v1 import predictor_pb2
from freshet.replica import Replica
from freshet.runtime import GrpcServer, NatsMixin, Service
from freshet.tensors import to_tensor
from services.predictor.config import PredictorConfig

logger = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)

SERVICE_NAME = "freshet.predictor.v1.Predictor"
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def register_metrics(meter: Meter, follower: Follower) -> None:
    """Observable gauges ``freshet.predictor.*``: the served version, its position and the follower's counters."""
    readings: dict[str, Callable[[], float]] = {
        "version": lambda: follower.version,
        "decision_position": lambda: follower.position,
        "rows": lambda: len(follower.replica),
    }
    for counter in dataclasses.fields(FollowerStats):
        readings[counter.name] = lambda name=counter.name: getattr(follower.stats, name)
    for name, read in readings.items():

        def observe(options: CallbackOptions, read: Callable[[], float] = read) -> list[Observation]:
            return [Observation(read())]

        meter.create_observable_gauge(f"freshet.predictor.{name}", callbacks=[observe])


class PredictorService(NatsMixin, Service):
    """One serving replica with its own decision consumer."""

    name = "predictor"

    def __init__(self, config: PredictorConfig, bus_config: BusConfig) -> None:
        super().__init__()
        self.config = config
        self.bus_config = bus_config
        if config.torch_threads > 0:
            torch.set_num_threads(config.torch_threads)
        self.model_config = model_from_setting(config.model_config)
        Replica(self.model_config, config.replica_dtype)  # a bad dtype fails here, at start-up
        self.settings = FollowerSettings(
            request_timeout_s=config.resync_request_timeout_s,
            approval_wait_s=config.resync_approval_wait_s,
            retry_max_s=config.resync_retry_max_s,
        )
        self.follower: Follower | None = None
        self.grpc: GrpcServer | None = None

    @property
    def address(self) -> str:
        assert self.grpc is not None, "service not started"
        return self.grpc.address

    @property
    def replica(self) -> Replica:
        """The replica served now (a rebuild replaces the object)."""
        assert self.follower is not None, "service not started"
        return self.follower.replica

    @property
    def stats(self) -> FollowerStats:
        assert self.follower is not None, "service not started"
        return self.follower.stats

    @property
    def gaps(self) -> int:
        return self.stats.gaps

    @property
    def rejected(self) -> int:
        return self.stats.rejected

    async def _start(self) -> None:
        await self._connect_nats(self.bus_config, "freshet-predictor")
        self.follower = Follower(
            self.nc,
            self.js,
            self.config.model,
            lambda: Replica(self.model_config, self.config.replica_dtype),
            self.settings,
            name="predictor",
        )
        register_metrics(telemetry.meter(__name__), self.follower)
        # The request limit is also the response limit: a response (float32 scores) is always
        # smaller than the request that asked for it (int64 ids).
        self.grpc = GrpcServer(self.config.host, self.config.port, max_message_bytes=self.config.max_request_bytes)
        self.grpc.server.add_generic_rpc_handlers(
            [strict_service(SERVICE_NAME, {"Predict": (self.predict, predictor_pb2.PredictRequest)})]
        )
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME), self.grpc.server)
        # Not GrpcServer.start, which reports SERVING at once: this replica serves once caught up.
        # Statuses are set before the server starts, so no check ever finds them unset.
        for svc in ("", SERVICE_NAME):
            await self.grpc.health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.server.start()
        self.grpc.write_port_file(self.config.port_file)
        self.spawn(self.follower.run(self.stopping), "predictor-follow")
        self.spawn(self._serve_when_ready(), "predictor-ready")
        logger.info("predictor started", extra={"address": self.grpc.address, "model": self.config.model})

    async def _serve_when_ready(self) -> None:
        ready = asyncio.ensure_future(self.follower.ready.wait())
        stopping = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait([ready, stopping], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopping.cancel()
        if self.stopping.is_set():
            return
        for svc in ("", SERVICE_NAME):
            await self.grpc.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        logger.info("predictor serving", extra={"model": self.config.model, "version": self.follower.version})

    async def _before_drain(self) -> None:
        if self.grpc:
            await self.grpc.not_serving()

    async def _stop(self) -> None:
        await self._drain_nats()
        if self.grpc:
            await self.grpc.stop(grace_s=1.0)

    async def predict(self, request: predictor_pb2.PredictRequest, context) -> predictor_pb2.PredictResponse:
        if request.model and request.model != self.config.model:
            raise BadRequest(
                f"model {request.model!r} is not served here (serving {self.config.model!r})",
                grpc.StatusCode.NOT_FOUND,
            )
        if not self.follower.ready.is_set():
            # An empty or half-caught-up replica would answer with a state no one approved.
            raise BadRequest(
                "the replica is still catching up with the model (health: NOT_SERVING)",
                grpc.StatusCode.UNAVAILABLE,
            )
        items = tensor_arg(request.item_ids, np.int64, 1, "item_ids", self.config.max_candidates, "candidates")
        if request.user_id < 0 or (items < 0).any() or request.position < 0:
            raise BadRequest("user_id, item_ids and position must be >= 0")
        fids = example_fids(request.user_id, items, request.position, dict(request.context))
        # One read of the served replica, then no await until the scores exist: a swap or a live
        # delta lands before or after this request, never inside it.
        replica = self.follower.replica
        version = replica.version
        scores = replica.score(fids)
        return predictor_pb2.PredictResponse(scores=to_tensor(scores), model_version=version)
