"""The joiner: impressions + clicks from ``events.>`` become labelled samples on ``samples.<p>``.

Nothing is lost across a crash: an input event stays un-acknowledged until the sample it
resolves into has been acknowledged by JetStream, and every sample carries a deterministic
``Nats-Msg-Id`` so the replay after a restart is deduplicated by the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from freshet import bus, telemetry
from freshet.batches import Sample, encode_samples
from freshet.config import BusConfig
from freshet.events.v1 import events_pb2
from freshet.fids import example_fids
from freshet.runtime import NatsMixin, Service
from services.joiner.config import JoinerConfig
from services.joiner.join import JoinState, Resolution

logger = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)


def validate_impression(imp: events_pb2.Impression) -> str | None:
    """The reason an impression violates the schema, or ``None``."""
    if not imp.request_id:
        return "impression without request_id"
    if imp.user_id < 0 or imp.item_id < 0:
        return f"negative id (user {imp.user_id}, item {imp.item_id})"
    if imp.position < 0:
        return f"negative position {imp.position}"
    return None


def validate_action(action: events_pb2.Action) -> str | None:
    """The reason an action violates the schema, or ``None``."""
    if not action.request_id:
        return "action without request_id"
    if action.item_id < 0:
        return f"negative item id {action.item_id}"
    if action.type == events_pb2.ACTION_TYPE_UNSPECIFIED:
        return "action type unspecified"
    return None


def partition_of(request_id: str, partitions: int) -> int:
    """Partition of a request id (stable across processes)."""
    return zlib.crc32(request_id.encode()) % partitions


class JoinerService(NatsMixin, Service):
    """Runs the join on one durable consumer of the EVENTS stream."""

    name = "joiner"

    def __init__(self, config: JoinerConfig, bus_config: BusConfig) -> None:
        super().__init__()
        self.config = config
        self.bus_config = bus_config
        self.state = JoinState(window_s=config.window_s)
        self.loop: bus.PullLoop | None = None

    @property
    def counts(self):
        return self.state.counts

    async def _start(self) -> None:
        await self._connect_nats(self.bus_config, "freshet-joiner")
        spec = bus.ConsumerSpec(
            stream=bus.EVENTS.name,
            durable=self.config.durable,
            filter_subject=self.config.subject,
            ack_wait_s=self.config.window_s + 30.0,
            max_ack_pending=self.config.max_pending,
        )
        self.loop = bus.PullLoop(self.js, spec, handler=None, source="events", batch=self.config.fetch_batch)
        self.loop.handler = bus.PullLoop.per_message(self.loop, self._on_message)
        self.spawn(self.loop.run(self.stopping), "joiner-consume")
        self.spawn(self._expire_forever(), "joiner-expire")

    async def _stop(self) -> None:
        await self._drain_nats()

    async def _on_message(self, msg: Msg) -> bus.Outcome:
        kind = msg.subject.split(".")[1] if msg.subject.count(".") >= 1 else ""
        now = time.monotonic()
        if kind == "impressions":
            imp = self._parse(events_pb2.Impression, msg)
            if reason := validate_impression(imp):
                raise bus.Reject(reason)
            resolution = self.state.on_impression(imp, msg, now)
        elif kind == "actions":
            action = self._parse(events_pb2.Action, msg)
            if reason := validate_action(action):
                raise bus.Reject(reason)
            if action.type != events_pb2.ACTION_TYPE_CLICK:
                self.state.counts["ignored_actions"] += 1
                return bus.Outcome.ACK  # only clicks label samples in this model
            resolution = self.state.on_click(action, msg, now)
        else:
            raise bus.Reject(f"unknown event subject {msg.subject!r}")
        if resolution is not None:
            await self._emit([resolution])
        return bus.Outcome.DEFER

    @staticmethod
    def _parse(kind, msg: Msg):
        try:
            return kind.FromString(msg.data)
        except DecodeError as exc:
            raise bus.Reject(f"cannot decode {kind.DESCRIPTOR.name}: {exc}") from None

    async def _emit(self, resolutions: list[Resolution]) -> None:
        """Publishes the samples, then acknowledges the inputs that produced them."""
        for res in resolutions:
            if res.label >= 0:
                await self._publish_sample(res)
                self.state.counts["samples"] += 1
            for handle in res.handles:
                await handle.ack()

    async def _publish_sample(self, res: Resolution) -> None:
        imp = res.impression
        sample = Sample(
            sample_id=f"{imp.request_id}:{imp.item_id}",
            fids=example_fids(imp.user_id, [imp.item_id], imp.position, dict(imp.context))[0],
            label=res.label,
            event_time_ms=imp.event_time_ms,
            user_id=imp.user_id,
            item_id=imp.item_id,
        )
        subject = f"samples.{partition_of(imp.request_id, self.config.partitions)}"
        # The event that resolved the join (the click, or the impression on expiry) is the parent,
        # so the event's trace continues through training; the other input is linked.
        *others, trigger = res.handles
        parent = telemetry.extract_headers(trigger.headers)
        links = telemetry.links_from(h.headers for h in others)
        with tracer.start_as_current_span(
            "join_sample", context=parent, links=links, attributes={"label": res.label}
        ):
            await bus.publish(self.js, subject, encode_samples([sample]), msg_id=f"s:{sample.sample_id}")

    async def _expire_forever(self) -> None:
        while not self.stopping.is_set():
            negatives, orphans = self.state.expire(time.monotonic())
            if negatives:
                await self._emit(negatives)
            for handle in orphans:
                await handle.ack()
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=min(0.1, self.config.window_s / 4))
            except TimeoutError:
                pass
