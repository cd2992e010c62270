"""The joiner: impressions + actions from ``events.>`` become labelled samples on ``samples.<p>``.

Exactly once, across crashes: for each fetched batch the joiner (1) runs the event-time join
(``EventJoin``), (2) publishes the samples it produced with their deterministic ``Nats-Msg-Id``
and waits for JetStream's acknowledgements, (3) commits the join state atomically, and only then
(4) acknowledges the input messages. A crash before (3) replays the inputs against the previous
state and regenerates the same sample ids (deduplicated by the stream); a crash between (3) and
(4) replays inputs the state has already seen, which the join rules turn into no new samples.
The join rules are documented in ``services/joiner/eventjoin.py``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from functools import partial
from pathlib import Path

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from freshet import bus, telemetry
from freshet.batches import Sample, encode_samples
from freshet.config import BusConfig
from freshet.events.v1 import events_pb2
from freshet.fids import example_fids
from freshet.runtime import NatsMixin, Service
from services.joiner.config import JoinerConfig
from services.joiner.eventjoin import ActionEvent, EventJoin, ImpressionEvent, JoinedSample
from services.joiner.joinstate import MemoryJoinState, RocksJoinState

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


def to_sample(joined: JoinedSample) -> Sample:
    """The training sample of a joined impression: the click label, the down-sampling weight."""
    imp = joined.impression
    return Sample(
        sample_id=joined.sample_id,
        fids=example_fids(imp.user_id, [imp.item_id], imp.position, dict(imp.context))[0],
        label=joined.label_vector[0],
        weight=joined.weight,
        event_time_ms=imp.event_time_ms,
        user_id=imp.user_id,
        item_id=imp.item_id,
        label_vector=joined.label_vector,
        version=joined.version,
    )


class PartitionJoin:
    """The join of one event partition: its own consumer, join state and watermark."""

    def __init__(self, partition: int, config: JoinerConfig) -> None:
        self.partition = partition
        state_dir = str(Path(config.state_dir) / f"p{partition}") if config.state_dir else ""
        self.state = RocksJoinState(state_dir) if state_dir else MemoryJoinState()
        self.join = EventJoin(config.join_config(), self.state)
        self.lock = asyncio.Lock()  # one join step (process, publish, commit) at a time
        self.loop: bus.PullLoop | None = None
        self.spec = bus.ConsumerSpec(
            stream=bus.EVENTS.name,
            durable=f"{config.durable}-p{partition}",
            filter_subject=f"events.*.{partition}",
            max_ack_pending=max(10_000, 4 * config.fetch_batch),
            max_deliver=-1,  # failures here are publish/state failures, never the event's fault
        )


class JoinerService(NatsMixin, Service):
    """Runs one event-time join per owned partition, each on its own durable consumer."""

    name = "joiner"

    def __init__(self, config: JoinerConfig, bus_config: BusConfig) -> None:
        super().__init__()
        self.config = config
        self.bus_config = bus_config
        owned = [int(p) for p in config.owned_partitions] or list(range(config.partitions))
        bad = [p for p in owned if not 0 <= p < config.partitions]
        if bad:
            raise ValueError(
                f"FRESHET_JOINER_PARTITIONS {bad} outside [0, FRESHET_PARTITIONS={config.partitions})"
            )
        self.partitions = [PartitionJoin(p, config) for p in owned]
        self.samples_published = 0

    @property
    def counts(self) -> dict[str, int]:
        """Join counters over all owned partitions (positives, negatives, every drop class) plus samples."""
        total: dict[str, int] = {}
        for part in self.partitions:
            for name, value in part.join.counters.items():
                total[name] = total.get(name, 0) + value
        return {**total, "samples": self.samples_published}

    async def _start(self) -> None:
        await self._connect_nats(self.bus_config, "freshet-joiner")
        for part in self.partitions:
            spec = await self._resume_in_order(part.spec)
            part.loop = bus.PullLoop(
                self.js,
                spec,
                handler=partial(self._on_batch, part),
                source="events",
                batch=self.config.fetch_batch,
            )
            self.spawn(part.loop.run(self.stopping), f"joiner-consume-p{part.partition}")
            self.spawn(self._tick_forever(part), f"joiner-tick-p{part.partition}")

    async def _resume_in_order(self, spec: bus.ConsumerSpec) -> bus.ConsumerSpec:
        """Restarts the consumer right after its ack floor, so un-acked events come back first and in order.

        JetStream would redeliver them only after ``ack_wait``, behind newer events that would
        already have moved the watermark past their windows. Everything up to the ack floor is
        committed in the join state (inputs are acknowledged after the commit); events after it
        that were committed too are recognised as duplicates when they come again.
        """
        try:
            info = await self.js.consumer_info(spec.stream, spec.durable)
        except NotFoundError:
            return spec
        start = info.ack_floor.stream_seq + 1 if info.ack_floor else 1
        await self.js.delete_consumer(spec.stream, spec.durable)
        logger.info("resuming events after the ack floor", extra={"start_seq": start, "consumer": spec.durable})
        return replace(spec, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)

    async def _stop(self) -> None:
        await self._drain_nats()
        for part in self.partitions:
            part.state.close()

    def _event(self, msg: Msg) -> ImpressionEvent | ActionEvent:
        kind = msg.subject.split(".")[1] if msg.subject.count(".") >= 1 else ""
        proto, validate, event = {
            "impressions": (events_pb2.Impression, validate_impression, ImpressionEvent),
            "actions": (events_pb2.Action, validate_action, ActionEvent),
        }.get(kind, (None, None, None))
        if proto is None:
            raise bus.Reject(f"unknown event subject {msg.subject!r}")
        try:
            parsed = proto.FromString(msg.data)
        except DecodeError as exc:
            raise bus.Reject(f"cannot decode {proto.DESCRIPTOR.name}: {exc}") from None
        if reason := validate(parsed):
            raise bus.Reject(reason)
        try:
            return event.from_proto(parsed)
        except ValueError as exc:
            raise bus.Reject(str(exc)) from None

    async def _on_batch(self, part: PartitionJoin, msgs: list[Msg]) -> list[bus.Outcome]:
        async with part.lock:
            outcomes, produced = [], []
            for msg in msgs:
                try:
                    ev = self._event(msg)
                except bus.Reject as rej:
                    await part.loop.reject(msg, rej.reason)
                    outcomes.append(bus.Outcome.DEFER)
                    continue
                join = part.join
                joined = join.on_impression(ev) if isinstance(ev, ImpressionEvent) else join.on_action(ev)
                produced.append((msg.headers, joined))
                outcomes.append(bus.Outcome.ACK)
            produced.append((None, part.join.advance(bus.now_ms())))
            await self._publish(part, produced)
            part.join.commit()
        return outcomes  # acknowledged by the loop only now, after the commit

    async def _tick_forever(self, part: PartitionJoin) -> None:
        """Advances the watermark without events, so windows close when traffic stops."""
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=self.config.tick_s)
            except TimeoutError:
                pass
            async with part.lock:
                fired = part.join.advance(bus.now_ms())
                if fired:
                    await self._publish(part, [(None, fired)])
                    part.join.commit()

    async def _publish(self, part: PartitionJoin, produced: list[tuple[dict | None, list[JoinedSample]]]) -> None:
        """Publishes samples to ``samples.<partition>`` concurrently and waits for every acknowledgement."""
        tasks = []
        for headers, samples in produced:
            parent = telemetry.extract_headers(headers)
            for joined in samples:
                tasks.append(self._publish_one(part.partition, joined, parent))
        if tasks:
            await asyncio.gather(*tasks)
            self.samples_published += len(tasks)

    async def _publish_one(self, partition: int, joined: JoinedSample, parent) -> None:
        subject = f"samples.{partition}"
        # The event that produced the sample is the parent, so its trace continues through training.
        with tracer.start_as_current_span(
            "join_sample", context=parent, attributes={"label": joined.label_vector[0], "version": joined.version}
        ):
            await bus.publish(
                self.js, subject, encode_samples([to_sample(joined)]), msg_id=f"s:{joined.sample_id}"
            )
