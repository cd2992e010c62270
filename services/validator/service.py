"""The validator: gates every delta, publishing an approval or a rejection with its reason.

Decisions go to ``model.<model>.decision`` in delta order and name the delta's stream
sequence, so predictors fetch approved deltas from the stream instead of a second copy.
"""

from __future__ import annotations

import logging

import numpy as np
from nats.aio.msg import Msg

from freshet import bus, telemetry
from freshet.config import BusConfig
from freshet.delta import Delta, DeltaError, decision_subject, decode_delta
from freshet.model.v1 import model_pb2
from freshet.runtime import NatsMixin, Service
from services.validator.config import ValidatorConfig

logger = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)


def check_delta(delta: Delta, max_abs: float) -> str | None:
    """Why a delta must not be served, or ``None`` when it passes."""
    arrays = {"values": delta.values, **{f"dense {k}": v for k, v in delta.dense.items()}}
    for name, array in arrays.items():
        if array.size and not np.isfinite(array).all():
            return f"{name}: {int((~np.isfinite(array)).sum())} non-finite values"
        if array.size and float(np.abs(array).max()) > max_abs:
            return f"{name}: max |value| {float(np.abs(array).max()):.3g} exceeds {max_abs:.3g}"
    return None


class ValidatorService(NatsMixin, Service):
    """Checks each candidate delta (finite, bounded, intact) and records the decision."""

    name = "validator"

    def __init__(self, config: ValidatorConfig, bus_config: BusConfig) -> None:
        super().__init__()
        self.config = config
        self.bus_config = bus_config
        self.approved = 0
        self.rejected = 0

    async def _start(self) -> None:
        await self._connect_nats(self.bus_config, "freshet-validator")
        spec = bus.ConsumerSpec(
            stream=bus.MODEL.name,
            durable=self.config.durable,
            filter_subject=self.config.subject,
            max_ack_pending=1000,
        )
        self.loop = bus.PullLoop(self.js, spec, handler=None, source="deltas", batch=64)
        self.loop.handler = bus.PullLoop.per_message(self.loop, self._on_delta)
        self.spawn(self.loop.run(self.stopping), "validator-consume")

    async def _stop(self) -> None:
        await self._drain_nats()

    async def _on_delta(self, msg: Msg) -> bus.Outcome:
        parent = telemetry.extract_headers(msg.headers)
        with tracer.start_as_current_span("validate_delta", context=parent) as span:
            model = msg.subject.split(".")[1]
            approval = model_pb2.Approval(model=model, delta_stream_seq=msg.metadata.sequence.stream)
            try:
                delta = decode_delta(msg.data)
                reason = check_delta(delta, self.config.max_abs_value)
                approval.shard, approval.sequence, approval.new_version = (
                    delta.shard,
                    delta.sequence,
                    delta.new_version,
                )
            except DeltaError as exc:
                reason = str(exc)
            approval.decision = model_pb2.DECISION_REJECT if reason else model_pb2.DECISION_APPROVE
            approval.reason = reason or ""
            approval.decided_ms = bus.now_ms()
            span.set_attribute("decision", model_pb2.Decision.Name(approval.decision))
            await bus.publish(
                self.js,
                decision_subject(model),
                approval.SerializeToString(),
                msg_id=f"decision:{model}:{msg.metadata.sequence.stream}",
            )
        if reason:
            self.rejected += 1
            logger.warning(
                "delta rejected",
                extra={
                    "model": model,
                    "sequence": approval.sequence,
                    "stream_seq": approval.delta_stream_seq,
                    "reason": reason,
                },
            )
        else:
            self.approved += 1
        return bus.Outcome.ACK
