"""The joiner: impressions + actions from ``events.>`` become labelled samples on ``samples.<p>``.

Events arrive one per message (``events.impressions.<p>``, ``events.actions.<p>``) or batched, as
columns (``events.columns.<p>``, an ``EventColumns``) or rows (``events.batch.<p>``, an ``EventBatch``;
see ``freshet.eventlog``); every form becomes columns (``message_events``). Exactly once, across crashes:
a fetched batch of messages is joined in steps of about ``FRESHET_JOINER_STEP_EVENTS`` events (whole
messages), and for each step the joiner (1) runs the event-time join (``ColumnJoin``, compiled; the
rules are in ``services/joiner/eventjoin.py``, the reference), (2) encodes the samples it produced as ``SampleBatch`` messages
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
from freshet.batches import SampleArrays, encode_sample_arrays, featurise_columns
from freshet.config import BusConfig
from freshet.eventcolumns import EventColumns, columns_of_events, decode_event_columns, row_event, row_problems
from freshet.events.v1 import events_pb2
from freshet.runtime import NatsMixin, Service
from services.joiner.columnjoin import ColumnJoin, JoinedColumns
from services.joiner.config import JoinerConfig
from services.joiner.delivery import Delivery, SampleDeliverer

logger = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)


def sample_arrays(joined: JoinedColumns) -> SampleArrays:
    """The training samples of joined impressions."""
    j = joined
    return featurise_columns(
        j.user_ids, j.item_ids, j.positions, j.event_time_ms, j.contexts, j.label_vectors, j.weights,
        j.sample_ids, j.versions,
    )  # fmt: skip


_SINGLE = {"impressions": events_pb2.Impression, "actions": events_pb2.Action}


def message_events(subject: str, data: bytes) -> tuple[EventColumns, list[tuple[int, bytes, str]]]:
    """The valid events of a message on ``subject`` as columns, and (index, bytes, reason) per bad entry.

    Columns (``events.columns.<p>``) decode with one copy per column; ``EventBatch`` messages
    (``events.batch.<p>``) and single events (``events.impressions.<p>``, ``events.actions.<p>``) are
    turned into columns first, so every message is checked and joined the same way. Raises ``bus.Reject``
    when the whole message is unusable: unknown subject, undecodable, or a single event that violates the
    schema.
    """
    kind = subject.split(".")[1] if subject.count(".") >= 1 else ""
    if kind == "columns":
        try:
            columns = decode_event_columns(data)
        except ValueError as exc:
            raise bus.Reject(str(exc)) from None
    elif kind == "batch":
        try:
            batch = events_pb2.EventBatch.FromString(data)
        except DecodeError as exc:
            raise bus.Reject(f"cannot decode EventBatch: {exc}") from None
        columns = columns_of_events(
            [getattr(entry, which) if (which := entry.WhichOneof("kind")) else None for entry in batch.events]
        )
    elif (single := _SINGLE.get(kind)) is not None:
        try:
            columns = columns_of_events([single.FromString(data)])
        except DecodeError as exc:
            raise bus.Reject(f"cannot decode {single.DESCRIPTOR.name}: {exc}") from None
        if problems := row_problems(columns):
            raise bus.Reject(problems[0][1])
        return columns, []
    else:
        raise bus.Reject(f"unknown event subject {subject!r}")
    problems = row_problems(columns)
    if not problems:
        return columns, []
    bad = [(index, row_event(columns, index), reason) for index, reason in problems]
    keep = np.ones(len(columns), np.bool_)
    keep[[index for index, _ in problems]] = False
    return columns.take(keep), bad


class PartitionJoin:
    """The join of one event partition: its own consumer, join state, watermark and sample deliverer."""

    def __init__(self, partition: int, config: JoinerConfig) -> None:
        self.partition = partition
        state_dir = str(Path(config.state_dir) / f"p{partition}") if config.state_dir else None
        self.join = ColumnJoin(config.join_config(), state_dir, sync_writes=config.sync_writes)
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

    def join_events(self, columns: EventColumns) -> JoinedColumns:
        """Joins a message's valid events (``message_events``) in order; their samples and those fired."""
        join = self.join
        contexts = np.array([*map(join.intern_context, columns.contexts), 0], np.int64)  # -1: no context
        return join.on_columns(
            columns.kinds,
            columns.request_ids,
            columns.request_index,
            columns.item_ids,
            columns.user_ids,
            columns.positions,
            columns.event_time_ms,
            columns.action_types,
            columns.values,
            contexts[columns.context_index],
        )

    def stage(self, produced: JoinedColumns) -> list[tuple[int, bytes, int]]:
        """Encodes the samples as messages in the outbox and commits them with the join state.

        Returns (outbox seq, message, samples) per message. Raises ``RuntimeError`` once a join step
        failed with uncommitted state (``broken``): committing it would make that step's events count
        as joined while their samples are lost.
        """
        if self.broken is not None:
            raise RuntimeError(f"partition {self.partition}: join state not committed after {self.broken!r}")
        size = self.samples_per_message
        staged = []
        for lo in range(0, len(produced), size):
            chunk = produced.take(lo, lo + size)
            data = encode_sample_arrays(sample_arrays(chunk))
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
        ColumnJoin.warm()  # before any consumer exists: the first join step does not wait for it
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
            part.join.close()

    async def _on_batch(self, part: PartitionJoin, msgs: list[Msg]) -> list[bus.Outcome]:
        """Joins a fetched batch in steps of about ``step_events`` events, each committed and handed to delivery.

        A large fetch (hundreds of messages of hundreds of events) would otherwise be joined whole before
        its first sample is published. Between steps the event loop runs: the deliverer publishes the
        previous steps' samples and the next fetch arrives.

        Failures: a step ends before a message's dead-letter or reject I/O, so a failing one finds the
        join state committed and its message and the rest are retried. A failure while the state holds
        joined events not yet committed (the join itself), or while a step ends (``advance`` fires windows,
        ``stage`` puts their samples in the outbox, the commit) stops the joiner instead: those samples
        would be lost (committed by a later step but never handed to delivery, or their events counted as
        duplicates by a retry). The messages stay unacknowledged; the restarted joiner reopens the
        committed state and reads them again first. The tick does the same when its step fails.
        """
        handed = 0  # msgs[:handed] are settled by delivery (or rejected)
        dirty = False  # the join state holds events of this step that are not committed
        async with part.lock:
            try:
                step_events = self.config.step_events
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
                    if len(events):
                        dirty = True
                        joined = part.join_events(events)
                        produced.append(joined)
                        if len(joined) and msg.headers:
                            parents.append(msg.headers)
                        events_in_step += len(events)
                    if events_in_step >= step_events or i == len(msgs) - 1:
                        dirty = True  # ending a step changes the join too (advance fires, stage stages)
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
    async def _hand_on(
        part: PartitionJoin, produced: list[JoinedColumns], parents: list, acked: list[Msg]
    ) -> None:
        """Ends a join step: stages and commits its samples, then queues them for delivery.

        The samples are committed in the outbox: the deliverer publishes them in order and acknowledges
        these inputs after JetStream has acknowledged the samples; meanwhile the join goes on. A full
        queue holds the join back (back-pressure).
        """
        produced.append(part.join.advance(bus.now_ms()))
        staged = part.stage(JoinedColumns.concat(produced))
        await part.deliveries.put(Delivery(staged, parents, acked))
        part.join.note_activity(bus.now_ms())  # time spent waiting on a full queue is not idleness

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
                # Messages fetched but not joined yet (the next batch, prefetched while this tick waited for the
                # lock) are input too, though the consumer no longer counts them as pending.
                drained = drained and not (part.loop is not None and part.loop.holds_messages())
                try:
                    fired = part.join.advance(bus.now_ms(), input_drained=drained)
                    staged = part.stage(fired) if len(fired) else []
                except Exception as exc:
                    # Windows fired (and maybe staged) but not handed to delivery: no later step may commit
                    # them. The crash stops the joiner (``spawn``); a restart fires them again.
                    part.broken = exc
                    raise
                if staged:  # queued under the lock, as join steps queue theirs: delivery sees outbox order
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
