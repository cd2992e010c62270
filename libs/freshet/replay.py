"""Publishing a dataset's events to JetStream, paced by their event times or as fast as possible.

``replay`` feeds time-ordered events (``freshet.datasets.read_events``) through an
``EventPublisher`` (``events.columns.<p>``), so a public dataset drives the whole pipeline like live
traffic. Events keep their dataset times by default: the joiner's watermark follows event time,
so history is joined as it happened. ``shift_to_now`` moves every time by one offset so that the
first event happens now (for live demos; only the offset changes, so without a speedup near 1
the later events lie ahead of the wall clock).

Pacing: with ``speedup`` S, an event ``d`` ms of event time after the first one is published
``d / S`` ms of wall time after the start. One wait is capped at ``max_gap_s``: a quiet gap of
days in the data costs at most that, and the events after it keep their relative spacing. Before
every wait the buffered events are flushed, so they are not held back by the pause. With
``S < 1`` a wait longer than the joiner's idle timeout can move its watermark past the next
events' times (it follows processing time when idle), making them late.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nats.js import JetStreamContext

from freshet import bus
from freshet.config import BusConfig
from freshet.datasets import DatasetError, read_events
from freshet.eventlog import Event, EventPublisher
from freshet.events.v1 import events_pb2

DEFAULT_MAX_GAP_S = 10.0
# Waits shorter than this are skipped (publishing catches up instead): no busy loop, no flush per event.
_MIN_WAIT_S = 0.005


class Clock(Protocol):
    """Time as ``replay`` sees it (tests pass a fake one)."""

    def monotonic(self) -> float: ...

    def now_ms(self) -> int: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The process's clocks and ``asyncio.sleep``."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now_ms(self) -> int:
        return bus.now_ms()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass
class ReplayStats:
    """What a replay published.

    Attributes:
        events: events published (impressions + actions).
        impressions: impressions published.
        clicks: click actions published.
        messages: ``EventBatch`` messages published.
        seconds: wall time of the call, reading included, up to the last acknowledgement.
        waits: pacing waits taken; ``capped_waits`` of them were cut to ``max_gap_s``.
        first_event_ms: event time of the first event as published (after any shift), None if none.
        last_event_ms: event time of the last event as published.
        shift_ms: offset added to every event time (0 unless ``shift_to_now``).
        stopped: the ``stop`` event ended the replay before the last event.
    """

    events: int = 0
    impressions: int = 0
    clicks: int = 0
    messages: int = 0
    seconds: float = 0.0
    waits: int = 0
    capped_waits: int = 0
    first_event_ms: int | None = None
    last_event_ms: int | None = None
    shift_ms: int = 0
    stopped: bool = False

    def summary(self) -> str:
        """One line: events, impressions, clicks, messages, seconds."""
        rate = self.events / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.events} events ({self.impressions} impressions, {self.clicks} clicks) in {self.messages} "
            f"messages, {self.seconds:.2f} s ({rate:,.0f} events/s)" + (", stopped early" if self.stopped else "")
        )


async def replay(
    js: JetStreamContext,
    events: Iterable[Event],
    *,
    partitions: int,
    speedup: float | None,
    name: str,
    max_events: int = 256,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
    shift_to_now: bool = False,
    clock: Clock | None = None,
    stop: asyncio.Event | None = None,
) -> ReplayStats:
    """Publishes time-ordered events as ``EventBatch`` messages and returns what was published.

    Args:
        js: JetStream context (the EVENTS stream must exist).
        events: impressions and actions in non-decreasing event-time order.
        partitions: event partitions (``FRESHET_PARTITIONS``).
        speedup: event time runs this many times faster than wall time; None: as fast as possible.
        name: unique per run: the ``Nats-Msg-Id`` prefix; reusing it within JetStream's duplicate window
            (2 min) stores nothing new, which makes a retried replay idempotent.
        max_events: events per message at most.
        max_gap_s: the longest single pacing wait, in wall seconds.
        shift_to_now: shift every event time by one offset so the first event happens now.
        clock: time source; the system's by default.
        stop: once set (e.g. by SIGTERM), publishes what is buffered and returns early (``stopped``).

    Raises:
        ValueError: ``speedup`` or ``max_gap_s`` is not positive.
        DatasetError: from ``events``; what was read before the bad row is published first.
    """
    if speedup is not None and not speedup > 0:
        raise ValueError(f"speedup must be positive, got {speedup}")
    if not max_gap_s > 0:
        raise ValueError(f"max_gap_s must be positive, got {max_gap_s}")
    clock = clock or SystemClock()
    publisher = EventPublisher(js, partitions, name, max_events=max_events)
    stats = ReplayStats()
    began = start = clock.monotonic()
    first_ms: int | None = None
    skipped_s = 0.0  # wall time cut from capped waits; the schedule moves up by it
    try:
        for event in events:
            if stop is not None and stop.is_set():
                stats.stopped = True
                break
            time_ms = event.event_time_ms
            if first_ms is None:  # the schedule starts here, after any reading and sorting
                first_ms, start = time_ms, clock.monotonic()
                stats.shift_ms = clock.now_ms() - time_ms if shift_to_now else 0
            if speedup is not None:
                due = start + (time_ms - first_ms) / 1000.0 / speedup - skipped_s
                wait = due - clock.monotonic()
                if wait >= _MIN_WAIT_S:
                    if wait > max_gap_s:
                        skipped_s += wait - max_gap_s
                        due -= wait - max_gap_s
                        stats.capped_waits += 1
                    await publisher.flush()
                    stats.waits += 1
                    remaining = due - clock.monotonic()
                    if remaining > 0 and await _sleep_unless_stopped(clock, remaining, stop):
                        stats.stopped = True
                        break
            if stats.shift_ms:
                shifted = type(event)()
                shifted.CopyFrom(event)
                shifted.event_time_ms = time_ms + stats.shift_ms
                event = shifted
            await publisher.add(event)
            stats.events += 1
            if isinstance(event, events_pb2.Impression):
                stats.impressions += 1
            elif event.type == events_pb2.ACTION_TYPE_CLICK:
                stats.clicks += 1
            if stats.first_event_ms is None:
                stats.first_event_ms = event.event_time_ms
            stats.last_event_ms = event.event_time_ms
    except DatasetError:
        await publisher.flush()  # the rows before the bad one, so what was published is a clean prefix
        raise
    await publisher.flush()
    stats.messages = publisher.messages_published
    stats.seconds = clock.monotonic() - began
    return stats


async def _sleep_unless_stopped(clock: Clock, seconds: float, stop: asyncio.Event | None) -> bool:
    """Sleeps ``seconds`` on ``clock``; True if ``stop`` was set first (the sleep is then cut short)."""
    if stop is None:
        await clock.sleep(seconds)
        return False
    sleeping, stopping = asyncio.ensure_future(clock.sleep(seconds)), asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((sleeping, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sleeping, stopping):
            task.cancel()
    return stop.is_set()


async def replay_file(
    fmt: str,
    path: str | Path,
    *,
    bus_config: BusConfig,
    partitions: int,
    speedup: float | None,
    name: str | None = None,
    limit: int | None = None,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
    shift_to_now: bool = False,
) -> ReplayStats:
    """Reads a dataset file and replays it on the NATS server of ``bus_config`` (``freshet replay``).

    The format and file are checked before connecting. ``name`` defaults to
    ``replay-<format>-<unix ms>``, unique per run. SIGINT and SIGTERM stop it gracefully: what was
    read is published and the stats say ``stopped``.

    Raises:
        DatasetError: unknown format, no such file, or a malformed row.
    """
    events = read_events(fmt, path, limit=limit)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        nc = await bus.connect(bus_config, "freshet-replay")
        try:
            js = nc.jetstream()
            await bus.declare_streams(js, (bus.EVENTS,))
            return await replay(
                js,
                events,
                partitions=partitions,
                speedup=speedup,
                name=name or f"replay-{fmt}-{bus.now_ms()}",
                max_gap_s=max_gap_s,
                shift_to_now=shift_to_now,
                stop=stop,
            )
        finally:
            await nc.close()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
