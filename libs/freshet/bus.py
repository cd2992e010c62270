"""NATS JetStream plumbing shared by every service.

- ``connect``: connect with a tenacity retry policy built from ``BusConfig``.
- ``declare_streams`` / ``declare_consumer``: idempotent declarations, run at start-up.
- ``publish``: publish with ``Nats-Msg-Id`` (JetStream deduplicates replays) and trace context.
- ``PullLoop``: fetch from a durable pull consumer and settle each message by the handler's
  outcome: ack, nak with delay, or term; failures past ``max_deliver`` go to the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from freshet import telemetry
from freshet.config import BusConfig

logger = logging.getLogger(__name__)

MSG_ID = "Nats-Msg-Id"
DEADLETTER_SUBJECT = "deadletter"


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream declared in code."""

    name: str
    subjects: tuple[str, ...]
    max_age_s: float = 24 * 3600
    max_msgs_per_subject: int = -1
    max_bytes: int = -1
    duplicate_window_s: float = 120.0

    def config(self) -> StreamConfig:
        return StreamConfig(
            name=self.name,
            subjects=list(self.subjects),
            max_age=self.max_age_s,
            max_msgs_per_subject=self.max_msgs_per_subject,
            max_bytes=self.max_bytes,
            duplicate_window=self.duplicate_window_s,
            discard=DiscardPolicy.OLD,
            allow_direct=True,
        )


# Every stream freshet uses. Subjects: see README "Subjects".
EVENTS = StreamSpec("EVENTS", ("events.>",))
SAMPLES = StreamSpec("SAMPLES", ("samples.>",))
MODEL = StreamSpec("MODEL", ("model.>",))
DENSE = StreamSpec("DENSE", ("dense.>",), max_msgs_per_subject=1)
DEADLETTER = StreamSpec("DEADLETTER", (f"{DEADLETTER_SUBJECT}.>",), max_age_s=7 * 24 * 3600)
ALL_STREAMS = (EVENTS, SAMPLES, MODEL, DENSE, DEADLETTER)


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer declared in code."""

    stream: str
    durable: str
    filter_subject: str
    ack_wait_s: float = 30.0
    max_deliver: int = 5  # -1: redeliver forever (failures are never the message's fault)
    max_ack_pending: int = 10_000
    deliver_policy: DeliverPolicy = DeliverPolicy.ALL
    opt_start_seq: int | None = None  # with DeliverPolicy.BY_START_SEQUENCE
    # Several subjects of the stream, delivered in stream order; replaces filter_subject when set.
    filter_subjects: tuple[str, ...] = ()

    def config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            max_ack_pending=self.max_ack_pending,
            filter_subject=None if self.filter_subjects else self.filter_subject,
            filter_subjects=list(self.filter_subjects) or None,
            deliver_policy=self.deliver_policy,
            opt_start_seq=self.opt_start_seq,
        )


async def _log_nats_error(exc: Exception) -> None:
    logger.warning("nats connection error", extra={"error": repr(exc)})


async def connect(config: BusConfig, name: str) -> NATS:
    """Connects to NATS, retrying with exponential backoff per ``config``.

    Raises:
        The last connection error once ``config.connect_attempts`` are used up.
    """
    servers = [s.strip() for s in config.nats_url.split(",") if s.strip()]
    async for attempt in AsyncRetrying(
        stop=stop_after_attempt(config.connect_attempts),
        wait=wait_exponential(multiplier=0.1, max=config.connect_backoff_s),
        retry=retry_if_exception_type((OSError, nats.errors.NoServersError, asyncio.TimeoutError)),
        reraise=True,
    ):
        with attempt:
            # nats-py retries the *first* connect by itself (60 times 2 s by default, forever when
            # max_reconnect_attempts < 0), hiding this policy: let it try each server twice, quickly,
            # then allow endless reconnects once connected (nats-py reads these at disconnect time).
            nc = await nats.connect(
                servers=servers,
                name=name,
                connect_timeout=2,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.05,
                error_cb=_log_nats_error,
            )
            nc.options["max_reconnect_attempts"] = -1
            nc.options["reconnect_time_wait"] = 1.0
            return nc
    raise AssertionError("unreachable")


async def declare_streams(js: JetStreamContext, specs: Sequence[StreamSpec] = ALL_STREAMS) -> None:
    """Creates each stream, or updates it when it exists (idempotent)."""
    for spec in specs:
        try:
            await js.stream_info(spec.name)
        except NotFoundError:
            try:
                await js.add_stream(spec.config())
                continue
            except BadRequestError:
                pass  # created concurrently by another service: fall through to update
        await js.update_stream(spec.config())


async def declare_consumer(js: JetStreamContext, spec: ConsumerSpec) -> None:
    """Creates the durable consumer, or updates its config when it exists (idempotent)."""
    await js.add_consumer(spec.stream, spec.config())


async def ack_floor(js: JetStreamContext, spec: ConsumerSpec) -> int | None:
    """The stream sequence everything up to which the durable consumer has acknowledged; None if it does not exist."""
    try:
        info = await js.consumer_info(spec.stream, spec.durable)
    except NotFoundError:
        return None
    return info.ack_floor.stream_seq if info.ack_floor else 0


async def restart_at(js: JetStreamContext, spec: ConsumerSpec, start_seq: int) -> ConsumerSpec:
    """Deletes the durable consumer (if any) and returns its spec delivering from ``start_seq`` on.

    Un-acknowledged messages of the old consumer would come back only after ``ack_wait``, behind
    newer ones; a consumer re-created at a known position delivers them first and in order.
    """
    try:
        await js.delete_consumer(spec.stream, spec.durable)
    except NotFoundError:
        pass
    return replace(spec, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start_seq))


async def publish(
    js: JetStreamContext, subject: str, payload: bytes, msg_id: str | None = None, headers: dict | None = None
) -> int:
    """Publishes with trace context and an optional ``Nats-Msg-Id``; returns the stream sequence.

    A duplicate ``msg_id`` within the stream's duplicate window is acknowledged but not stored.
    """
    headers = telemetry.inject_headers(dict(headers or {}))
    if msg_id:
        headers[MSG_ID] = msg_id
    ack = await js.publish(subject, payload, headers=headers)
    return ack.seq


async def dead_letter(
    js: JetStreamContext, source: str, msg: Msg, reason: str, *, part: int | None = None, data: bytes | None = None
) -> None:
    """Copies a message's bytes to ``deadletter.<source>`` with the reason and its origin.

    For one bad entry of a batched message, ``part`` is its index and ``data`` its own bytes.
    """
    meta = msg.metadata
    headers = {
        "Freshet-Reason": reason[:512],
        "Freshet-Subject": msg.subject,
        "Freshet-Stream-Seq": str(meta.sequence.stream),
    }
    msg_id = f"dl:{meta.stream}:{meta.sequence.stream}"
    if part is not None:
        headers["Freshet-Part"] = str(part)
        msg_id += f":{part}"
    await publish(
        js, f"{DEADLETTER_SUBJECT}.{source}", msg.data if data is None else data, msg_id=msg_id, headers=headers
    )


class Outcome(enum.Enum):
    """How the pull loop settles a message after the handler ran."""

    ACK = "ack"
    DEFER = "defer"  # the handler keeps the message and acks it later itself


@dataclass
class Reject(Exception):
    """Raised by a handler for input that can never succeed: the message is dead-lettered and termed."""

    reason: str


@dataclass
class PullLoop:
    """Fetches batches from a durable pull consumer until ``stop`` is set.

    ``handler(msgs)`` gets each batch and returns one ``Outcome`` per message. A handler
    exception naks the whole batch with ``nak_delay_s``; on the last allowed delivery the
    message is dead-lettered and termed instead, so a poison message never blocks the stream.
    ``PullLoop.per_message`` adapts a one-message handler, keeping failures per message.

    With ``prefetch`` the next fetch runs while the handler works on the current batch, so a handler
    that yields to the event loop (e.g. between parts of a large batch) does not sit idle while the
    next batch arrives. Batches still reach the handler one at a time, in delivery order: only one
    fetch is ever in flight, and the next one starts after the previous one returned. Empty fetches
    are not handed on.
    """

    js: JetStreamContext
    spec: ConsumerSpec
    handler: Callable[[list[Msg]], Awaitable[list[Outcome]]]
    source: str
    batch: int = 256
    fetch_timeout_s: float = 0.5
    nak_delay_s: float = 1.0
    prefetch: bool = False
    stats: dict[str, int] = field(default_factory=lambda: {"acked": 0, "naked": 0, "dead_lettered": 0})
    _handling: bool = field(default=False, init=False, repr=False)
    _next: asyncio.Future | None = field(default=None, init=False, repr=False)

    def holds_messages(self) -> bool:
        """Whether messages were fetched that the handler has not finished: the batch it is handling, or the
        next one, prefetched. The consumer no longer counts them as pending."""
        fetch = self._next
        ready = fetch is not None and fetch.done() and not fetch.cancelled() and fetch.exception() is None
        return self._handling or (ready and bool(fetch.result()))

    async def run(self, stop: asyncio.Event) -> None:
        await declare_consumer(self.js, self.spec)
        sub = await self.js.pull_subscribe_bind(self.spec.durable, stream=self.spec.stream)
        fetch: asyncio.Future | None = None  # the next batch, under way while one is handled (prefetch)
        try:
            while not stop.is_set():
                try:
                    msgs = await (fetch if fetch is not None else self._fetch(sub))
                except nats.errors.ConnectionClosedError:
                    if stop.is_set():
                        break
                    raise
                if self.prefetch:
                    fetch = self._next = asyncio.ensure_future(self._fetch(sub))
                if msgs:
                    self._handling = True
                    try:
                        await self._handle(msgs)
                    finally:
                        self._handling = False
        finally:
            if fetch is not None:
                # Messages a cancelled fetch already received stay unacknowledged: they come back as after a crash.
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
            await sub.unsubscribe()

    async def _fetch(self, sub) -> list[Msg]:
        try:
            return await sub.fetch(self.batch, timeout=self.fetch_timeout_s)
        except (NatsTimeoutError, TimeoutError):
            return []

    async def _handle(self, msgs: list[Msg]) -> None:
        try:
            outcomes = await self.handler(msgs)
        except Exception as exc:  # noqa: BLE001 - any handler failure is retried or dead-lettered
            logger.warning("batch failed, will retry", extra={"source": self.source, "error": repr(exc)})
            for msg in msgs:
                await self.retry_or_dead_letter(msg, repr(exc))
            return
        for msg, outcome in zip(msgs, outcomes, strict=True):
            if outcome is Outcome.ACK:
                await msg.ack()
                self.stats["acked"] += 1

    async def retry_or_dead_letter(self, msg: Msg, reason: str) -> None:
        """Naks with delay, or dead-letters and terms on the last delivery."""
        if 0 < self.spec.max_deliver <= msg.metadata.num_delivered:
            await self.reject(msg, f"failed {msg.metadata.num_delivered} deliveries: {reason}")
        else:
            await msg.nak(delay=self.nak_delay_s)
            self.stats["naked"] += 1

    @staticmethod
    def per_message(loop: PullLoop, handle_one: Callable[[Msg], Awaitable[Outcome]]):
        """Adapts a one-message handler to a batch handler.

        Failures stay with their message: a ``Reject`` dead-letters it at once, any other
        exception naks it (or dead-letters it on its last delivery); the rest of the batch goes on.
        """

        async def handler(msgs: list[Msg]) -> list[Outcome]:
            outcomes = []
            for msg in msgs:
                try:
                    outcomes.append(await handle_one(msg))
                except Reject as rej:
                    await loop.reject(msg, rej.reason)
                    outcomes.append(Outcome.DEFER)
                except Exception as exc:  # noqa: BLE001 - retried, then dead-lettered
                    logger.warning("message failed", extra={"source": loop.source, "error": repr(exc)})
                    await loop.retry_or_dead_letter(msg, repr(exc))
                    outcomes.append(Outcome.DEFER)
            return outcomes

        return handler

    async def reject(self, msg: Msg, reason: str) -> None:
        """Dead-letters and terms a message that can never be processed."""
        logger.warning("message rejected", extra={"source": self.source, "subject": msg.subject, "reason": reason})
        await dead_letter(self.js, self.source, msg, reason)
        await msg.term()
        self.stats["dead_lettered"] += 1


def event_partition(request_id: str, partitions: int) -> int:
    """The event partition of a request (stable across processes): clients publish its impressions
    and actions on ``events.impressions.<p>`` / ``events.actions.<p>``, and joiners own partitions."""
    return zlib.crc32(request_id.encode()) % partitions


def now_ms() -> int:
    """Wall-clock unix milliseconds."""
    return int(time.time() * 1000)
