"""The predictor: a replica that applies approved deltas in order and serves Predict over gRPC.

It follows ``model.<model>.decision`` from the start of the stream with an ordered consumer;
each approval names the delta's stream sequence, which is fetched and applied. A delta whose
sequence is not the next one expected is logged as a gap and counted (repair by snapshot
resync is issue #6's work); a rejection advances the expected sequence without applying.
"""

from __future__ import annotations

import logging

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from freshet import bus, telemetry
from freshet.config import BusConfig
from freshet.delta import DeltaError, decision_subject, decode_delta
from freshet.fids import example_fids
from freshet.grpcutil import BadRequest, strict_service, tensor_arg
from freshet.model.v1 import model_pb2
from freshet.models import model_from_setting
from freshet.predictor.v1 import predictor_pb2
from freshet.runtime import GrpcServer, NatsMixin, Service
from freshet.tensors import to_tensor
from services.predictor.config import PredictorConfig
from freshet.replica import Replica

logger = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)

SERVICE_NAME = "freshet.predictor.v1.Predictor"


class PredictorService(NatsMixin, Service):
    """One serving replica."""

    name = "predictor"

    def __init__(self, config: PredictorConfig, bus_config: BusConfig) -> None:
        super().__init__()
        self.config = config
        self.bus_config = bus_config
        if config.torch_threads > 0:
            torch.set_num_threads(config.torch_threads)
        self.replica = Replica(model_from_setting(config.model_config), config.replica_dtype)
        self.grpc: GrpcServer | None = None
        self.gaps = 0
        self.rejected = 0
        self.bad_decisions = 0
        self._decided: dict[int, int] = {}  # last delta sequence decided (applied or rejected) per shard

    @property
    def address(self) -> str:
        assert self.grpc is not None, "service not started"
        return self.grpc.address

    async def _start(self) -> None:
        await self._connect_nats(self.bus_config, "freshet-predictor")
        self.grpc = GrpcServer(self.config.host, self.config.port)
        self.grpc.server.add_generic_rpc_handlers(
            [strict_service(SERVICE_NAME, {"Predict": (self.predict, predictor_pb2.PredictRequest)})]
        )
        await self.grpc.start([SERVICE_NAME])
        self.grpc.write_port_file(self.config.port_file)
        self._sub = await self.js.subscribe(
            decision_subject(self.config.model), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        self.spawn(self._follow(), "predictor-follow")
        logger.info("predictor serving", extra={"address": self.grpc.address, "model": self.config.model})

    async def _before_drain(self) -> None:
        if self.grpc:
            await self.grpc.not_serving()

    async def _stop(self) -> None:
        await self._drain_nats()
        if self.grpc:
            await self.grpc.stop(grace_s=1.0)

    async def _follow(self) -> None:
        while not self.stopping.is_set():
            try:
                msg = await self._sub.next_msg(timeout=0.25)
            except TimeoutError:
                continue
            except Exception:  # noqa: BLE001 - subscription closed by drain on shutdown
                if self.stopping.is_set():
                    return
                raise
            await self._on_decision(msg)

    async def _on_decision(self, msg) -> None:
        try:
            approval = model_pb2.Approval.FromString(msg.data)
        except DecodeError as exc:
            self.bad_decisions += 1
            logger.error("undecodable decision skipped", extra={"error": str(exc)})
            return
        expected = self.expected_sequence(approval.shard)
        if approval.sequence and approval.sequence < expected:
            return  # already applied or skipped: deltas are idempotent, nothing to do
        if approval.sequence > expected:
            self.gaps += 1
            logger.error(
                "delta sequence gap",
                extra={
                    "expected": expected,
                    "got": approval.sequence,
                    "shard": approval.shard,
                    "model": approval.model,
                },
            )
        if approval.decision != model_pb2.DECISION_APPROVE:
            self.rejected += 1
            self._decided[approval.shard] = approval.sequence
            return
        try:
            raw = await self.js.get_msg(bus.MODEL.name, seq=approval.delta_stream_seq, direct=True)
        except NotFoundError:
            # Not skipped silently: the sequence stays expected, so the next delta shows as a gap.
            self.bad_decisions += 1
            logger.error(
                "approved delta missing from the stream",
                extra={"sequence": approval.sequence, "stream_seq": approval.delta_stream_seq},
            )
            return
        parent = telemetry.extract_headers(raw.headers)
        with tracer.start_as_current_span(
            "apply_delta", context=parent, attributes={"sequence": approval.sequence}
        ):
            try:
                delta = decode_delta(raw.data)
                self.replica.apply(delta)
            except (DeltaError, ValueError) as exc:
                logger.error(
                    "approved delta cannot be applied", extra={"sequence": approval.sequence, "error": str(exc)}
                )
                return

    def expected_sequence(self, shard: int = 0) -> int:
        """The next delta sequence this replica expects from a store shard."""
        return max(self._decided.get(shard, 0), self.replica.shard_sequences.get(shard, 0)) + 1

    async def predict(self, request: predictor_pb2.PredictRequest, context) -> predictor_pb2.PredictResponse:
        if request.model and request.model != self.config.model:
            raise BadRequest(
                f"model {request.model!r} is not served here (serving {self.config.model!r})",
                grpc.StatusCode.NOT_FOUND,
            )
        items = tensor_arg(request.item_ids, np.int64, 1, "item_ids", self.config.max_candidates, "candidates")
        if request.user_id < 0 or (items < 0).any() or request.position < 0:
            raise BadRequest("user_id, item_ids and position must be >= 0")
        # No await between reading the version and scoring: one request sees one version.
        version = self.replica.version
        scores = self.replica.score(example_fids(request.user_id, items, request.position, dict(request.context)))
        return predictor_pb2.PredictResponse(scores=to_tensor(scores), model_version=version)
