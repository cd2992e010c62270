"""The joiner: impressions + actions from ``events.>`` become labelled samples on ``samples.<p>``.

Events arrive one per message (``events.impressions.<p>``, ``events.actions.<p>``) or batched
(``events.batch.<p>``, an ``EventBatch``; see ``freshet.eventlog``). Exactly once, across crashes:
a fetched batch of messages is joined in steps of about ``FRESHET_JOINER_STEP_EVENTS`` events (whole
messages), and for each step the joiner (1) runs the event-time join (``EventJoin``; the rules are
in ``services/joiner/eventjoin.py``), (2) encodes the samples it produced as ``SampleBatch`` messages
of at most ``FRESHET_JOINER_SAMPLES_PER_MESSAGE`` samples and stages them in the join state's outbox,
(3) commits state and outbox atomically, (4) publishes the staged messages with
``Nats-Msg-Id = sb:<partition>:<epoch>:<seq>`` and waits for JetStream's acknowledgements, and only
then (5) acknowledges the step's input messages. Steps 4 and 5 run in a delivery worker per partition
(``services/joiner/delivery.py``), in outbox order with several publishes in flight, while the next
step is joined and the next batch fetched.

A crash before (3) replays the inputs against the previous state: the same samples are produced
again and staged under the same sequence numbers. A crash after (3) leaves the staged messages in
the outbox; on start the joiner publishes every one the SAMPLES stream does not hold (the last
message on ``samples.<p>`` bounds where to look; see ``delivery.py``), and the inputs replayed
after the ack floor are ones the state has already seen, which the join rules turn into no new
samples. ``epoch`` is chosen when a partition's state is created, so a joiner whose state was wiped
never reuses a message id JetStream might still remember.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from functools import partial
from pathlib import Path

import nats
import numpy as np
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from freshet import bus, telemetry
from freshet.batches import LABELS, SampleArrays, encode_sample_arrays, featurise
from freshet.config import BusConfig
from freshet.events.v1 import events_pb2
from freshet.runtime import NatsMixin, Service
from services.joiner.config import JoinerConfig
from services.joiner.delivery import Delivery, SampleDeliverer
from services.joiner.eventjoin import ActionEvent, EventJoin, ImpressionEvent, JoinedSample
from services.joiner.joinstate import ACTION_TYPES, MemoryJoinState, RocksJoinState, context_pairs

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


def joined_arrays(joined: list[JoinedSample]) -> SampleArrays:
    """The training samples of joined impressions."""
    if not joined:
        return featurise(
            [], [], np.zeros((0, LABELS), np.float32), np.zeros(0, np.float32), [], np.zeros(0, np.int32)
        )
    # Samples and impressions are tuples: transposing them with zip is the cheapest way to columns.
    sample_ids, _, label_vectors, versions, weights, _, impressions = zip(*joined, strict=True)
    return featurise(
        impressions,
        [imp.context for imp in impressions],
        np.array(label_vectors, np.float32),
        np.array(weights, np.float32),
        list(sample_ids),
        np.array(versions, np.int32),
    )


def parse_event(proto: events_pb2.Impression | events_pb2.Action) -> ImpressionEvent | ActionEvent:
    """The join's event for a decoded protobuf; raises ``bus.Reject`` naming a schema violation."""
    if isinstance(proto, events_pb2.Impression):
        if reason := validate_impression(proto):
            raise bus.Reject(reason)
        return ImpressionEvent.from_proto(proto)
    if reason := validate_action(proto):
        raise bus.Reject(reason)
    try:
        return ActionEvent.from_proto(proto)
    except ValueError as exc:
        raise bus.Reject(str(exc)) from None


_new = tuple.__new__  # a named tuple from ALL its fields, without its Python-level __new__ (faster)


def batch_events(
    batch: events_pb2.EventBatch,
) -> tuple[list[ImpressionEvent | ActionEvent], list[tuple[int, str]]]:
    """The join's events of a decoded batch, in order, and (index, reason) for each entry that is not one.

    Valid entries (nearly all) are converted inline; the others go through ``parse_event`` for the reason.
    """
    events: list[ImpressionEvent | ActionEvent] = []
    bad: list[tuple[int, str]] = []
    action_types = ACTION_TYPES
    for index, entry in enumerate(batch.events):
        which = entry.WhichOneof("kind")
        if which == "impression":
            m = entry.impression
            request, user, item, position = m.request_id, m.user_id, m.item_id, m.position
            if request and user >= 0 and item >= 0 and position >= 0:
                context = m.context
                context = context_pairs(context) if context else ()
                events.append(_new(ImpressionEvent, (request, user, item, position, m.event_time_ms, context)))
                continue
        elif which == "action":
            m = entry.action
            request, item, kind = m.request_id, m.item_id, action_types.get(m.type)
            if request and item >= 0 and kind is not None:
                events.append(_new(ActionEvent, (request, item, kind, m.value, m.event_time_ms)))
                continue
        try:
            if which is None:
                raise bus.Reject("batch entry is neither an impression nor an action")
            events.append(parse_event(getattr(entry, which)))  # a valid event the checks above missed
        except bus.Reject as rej:
            bad.append((index, rej.reason))
    return events, bad


def message_events(
    subject: str, data: bytes
) -> tuple[list[ImpressionEvent | ActionEvent], list[tuple[int, bytes, str]]]:
    """The events of a message on ``subject``, and (index, bytes, reason) for each bad entry of a batch.

    Raises ``bus.Reject`` when the whole message is unusable (unknown subject, undecodable, or a
    single event that violates the schema).
    """
    kind = subject.split(".")[1] if subject.count(".") >= 1 else ""
    single = {"impressions": events_pb2.Impression, "actions": events_pb2.Action}.get(kind)
    if single is not None:
        try:
            return [parse_event(single.FromString(data))], []
        except DecodeError as exc:
            raise bus.Reject(f"cannot decode {single.DESCRIPTOR.name}: {exc}") from None
    if kind != "batch":
        raise bus.Reject(f"unknown event subject {subject!r}")
    try:
        batch = events_pb2.EventBatch.FromString(data)
    except DecodeError as exc:
        raise bus.Reject(f"cannot decode EventBatch: {exc}") from None
    events, bad = batch_events(batch)
    return events, [(index, batch.events[index].SerializeToString(), reason) for index, reason in bad]


class PartitionJoin:
    """The join of one event partition: its own consumer, join state, watermark and sample deliverer."""

    def __init__(self, partition: int, config: JoinerConfig) -> None:
        self.partition = partition
        state_dir = str(Path(config.state_dir) / f"p{partition}") if config.state_dir else ""
        self.state = (
            RocksJoinState(state_dir, cached_windows=config.cached_windows) if state_dir else MemoryJoinState()
        )
        self.join = EventJoin(config.join_config(), self.state)
        self.samples_per_message = config.samples_per_message
        self.lock = asyncio.Lock()  # one join step (join, stage, commit) at a time
        self.broken: BaseException | None = None  # a join step failed with uncommitted state: never commit
        # Join steps' staged outputs waiting to be published, in outbox order (``Delivery``; None: stop).
        self.deliveries: asyncio.Queue = asyncio.Queue(maxsize=8)
        self.loop: bus.PullLoop | None = None
        self.delivery: SampleDeliverer | None = None
        self.deliverer: asyncio.Task | None = None
        self.spec = bus.ConsumerSpec(
            stream=bus.EVENTS.name,
            durable=f"{config.durable}-p{partition}",
            filter_subject=f"events.*.{partition}",
            max_ack_pending=max(10_000, 4 * config.fetch_batch),
            max_deliver=-1,  # failures here are publish/state failures, never the event's fault
        )

    def stage(self, produced: list[JoinedSample]) -> list[tuple[int, bytes, int]]:
        """Encodes the samples as messages in the outbox and commits them with the join state.

        Returns (outbox seq, message, samples) per message. Raises ``RuntimeError`` once a join step
        failed with uncommitted state (``broken``): committing it would make that step's events count
        as joined while their samples are lost.
        """
        if self.broken is not None:
            raise RuntimeError(f"partition {self.partition}: join state not committed after {self.broken!r}")
        size = self.samples_per_message
        staged = []
        for i in range(0, len(produced), size):
            chunk = produced[i : i + size]
            data = encode_sample_arrays(joined_arrays(chunk))
            staged.append((self.join.stage_output(data), data, len(chunk)))
        self.join.commit()
        return staged


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
        self.invalid_events = 0  # dead-lettered: whole messages and single entries of batches

    @property
    def samples_published(self) -> int:
        return sum(part.delivery.samples_published for part in self.partitions if part.delivery)

    @property
    def outputs_republished(self) -> int:
        """Outputs staged before a crash and published on start."""
        return sum(part.delivery.outputs_republished for part in self.partitions if part.delivery)

    @property
    def counts(self) -> dict[str, int]:
        """Join counters over all owned partitions (positives, negatives, every drop class) plus samples."""
        total: dict[str, int] = {}
        for part in self.partitions:
            for name, value in part.join.counters.items():
                total[name] = total.get(name, 0) + value
        return {**total, "samples": self.samples_published, "invalid_events": self.invalid_events}

    async def _start(self) -> None:
        await self._connect_nats(self.bus_config, "freshet-joiner")
        for part in self.partitions:
            part.delivery = SampleDeliverer(
                self.js,
                part.partition,
                part.join,
                window=self.config.publish_window,
                timeout_s=self.config.publish_timeout_s,
                give_up=lambda: self.stopping.is_set() and self.nc.is_closed,
            )
            await part.delivery.recover()
            spec = await self._resume_in_order(part.spec)
            part.loop = bus.PullLoop(
                self.js,
                spec,
                handler=partial(self._on_batch, part),
                source="events",
                batch=self.config.fetch_batch,
                fetch_timeout_s=self.config.fetch_timeout_s,
                prefetch=True,  # the next fetch arrives while a batch is joined (its steps yield in between)
            )
            self.spawn(part.loop.run(self.stopping), f"joiner-consume-p{part.partition}")
            self.spawn(self._tick_forever(part), f"joiner-tick-p{part.partition}")
            # Drains its queue on shutdown before exiting; what it cannot publish stays in the outbox.
            part.deliverer = self.spawn(part.delivery.run(part.deliveries), f"joiner-deliver-p{part.partition}")
        if self.config.gc_freeze_s > 0:
            self.spawn(self._freeze_forever(), "joiner-gc-freeze")

    async def _resume_in_order(self, spec: bus.ConsumerSpec) -> bus.ConsumerSpec:
        """Restarts the consumer right after its ack floor, so un-acked events come back first and in order.

        JetStream would redeliver them only after ``ack_wait``, behind newer events that would
        already have moved the watermark past their windows. Everything up to the ack floor is
        committed in the join state (inputs are acknowledged after the commit); events after it
        that were committed too are recognised as duplicates when they come again.
        """
        floor = await bus.ack_floor(self.js, spec)
        if floor is None:
            return spec
        logger.info(
            "resuming events after the ack floor", extra={"start_seq": floor + 1, "consumer": spec.durable}
        )
        return await bus.restart_at(self.js, spec, floor + 1)

    async def _stop(self) -> None:
        await self._drain_nats()
        for part in self.partitions:
            part.state.close()

    async def _on_batch(self, part: PartitionJoin, msgs: list[Msg]) -> list[bus.Outcome]:
        """Joins a fetched batch in steps of about ``step_events`` events, each committed and handed to delivery.

        A large fetch (hundreds of messages of hundreds of events) would otherwise be joined whole before
        its first sample is published. Between steps the event loop runs: the deliverer publishes the
        previous steps' samples and the next fetch arrives.

        Failures: a step ends before a message's dead-letter or reject I/O, so a failing one finds the
        join state committed and its message and the rest are retried. A failure while the state holds
        joined events not yet committed (the join itself, or the commit) stops the joiner instead: those
        events' samples would be lost, and a retry would count the events as duplicates. The messages stay
        unacknowledged; the restarted joiner reopens the committed state and reads them again first.
        """
        handed = 0  # msgs[:handed] are settled by delivery (or rejected)
        dirty = False  # the join state holds events of this step that are not committed
        async with part.lock:
            try:
                join, step_events = part.join, self.config.step_events
                produced, parents, acked, events_in_step = [], [], [], 0
                for i, msg in enumerate(msgs):
                    try:
                        events, bad = message_events(msg.subject, msg.data)
                        rejected = None
                    except bus.Reject as rej:
                        events, bad, rejected = [], [], rej.reason
                    if (rejected is not None or bad) and dirty:
                        await self._hand_on(part, produced, parents, acked)  # commit before the I/O below
                        handed, dirty = i, False
                        produced, parents, acked, events_in_step = [], [], [], 0
                    if rejected is not None:
                        await part.loop.reject(msg, rejected)
                        self.invalid_events += 1
                    else:
                        acked.append(msg)
                    for index, data, reason in bad:
                        logger.warning(
                            "event rejected", extra={"subject": msg.subject, "index": index, "reason": reason}
                        )
                        await bus.dead_letter(self.js, "events", msg, reason, part=index, data=data)
                        self.invalid_events += 1
                    if events:
                        dirty = True
                        before = len(produced)
                        produced += join.on_events(events)
                        if len(produced) > before and msg.headers:
                            parents.append(msg.headers)
                        events_in_step += len(events)
                    if events_in_step >= step_events or i == len(msgs) - 1:
                        await self._hand_on(part, produced, parents, acked)
                        handed, dirty = i + 1, False
                        produced, parents, acked, events_in_step = [], [], [], 0
                        if i < len(msgs) - 1:
                            await asyncio.sleep(0)  # let delivery and the next fetch run between steps
                            if self.stopping.is_set():
                                break  # the rest stays unacknowledged: it comes back first after a restart
            except Exception as exc:  # noqa: BLE001 - retried when the state is committed, fatal otherwise
                if dirty:
                    part.broken = exc
                    self.fail(
                        exc, "join step failed with uncommitted join state; stopping", partition=part.partition
                    )
                    return [bus.Outcome.DEFER] * len(msgs)
                logger.warning("join step failed, will retry", extra={"error": repr(exc)})
                for msg in msgs[handed:]:
                    await part.loop.retry_or_dead_letter(msg, repr(exc))
        return [bus.Outcome.DEFER] * len(msgs)

    @staticmethod
    async def _hand_on(part: PartitionJoin, produced: list[JoinedSample], parents: list, acked: list[Msg]) -> None:
        """Ends a join step: stages and commits its samples, then queues them for delivery.

        The samples are committed in the outbox: the deliverer publishes them in order and acknowledges
        these inputs after JetStream has acknowledged the samples; meanwhile the join goes on. A full
        queue holds the join back (back-pressure).
        """
        produced += part.join.advance(bus.now_ms())
        staged = part.stage(produced)
        await part.deliveries.put(Delivery(staged, parents, acked))

    async def _tick_forever(self, part: PartitionJoin) -> None:
        """Advances the watermark without events, so windows close when traffic stops."""
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=self.config.tick_s)
            except TimeoutError:
                pass
            if self.stopping.is_set():
                break  # what the watermark would fire now waits for the next start (its state is committed)
            drained = await self._drained(part)
            async with part.lock:
                fired = part.join.advance(bus.now_ms(), input_drained=drained)
                staged = part.stage(fired) if fired else []
            if staged:
                await part.deliveries.put(Delivery(staged))

    async def _freeze_forever(self) -> None:
        """Collects the young generation, then freezes every object left, every ``gc_freeze_s``.

        The join state's windows live seconds to minutes, and evicted ones are freed as new ones come:
        the collector's young and middle generations then grow to hundreds of thousands of objects, and
        their collections stalled the join for 40-60 ms every second and ~300 ms every few seconds once
        the window cache was full. Frozen objects are never scanned again but are still freed when
        their last reference goes (the state holds no reference cycles); cycles that form among frozen
        objects later are not collected, which the young collection before each freeze keeps rare.
        """
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=self.config.gc_freeze_s)
            except TimeoutError:
                pass
            gc.collect(0)
            gc.freeze()

    async def _drained(self, part: PartitionJoin) -> bool:
        """Whether the partition's consumer has nothing waiting: only then may its watermark follow the clock."""
        try:
            info = await self.js.consumer_info(part.spec.stream, part.spec.durable)
        except (NotFoundError, nats.errors.Error):
            return True  # not created yet, or NATS unreachable: the clock decides, as without this check
        return info.num_pending == 0

    async def _before_drain(self) -> None:
        for part in self.partitions:
            if part.deliverer is not None and not part.deliverer.done():
                await part.deliveries.put(None)  # waits only while the worker, still running, catches up
