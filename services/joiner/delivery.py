"""Delivery of one partition's committed sample messages: in outbox order, several in flight, exactly once.

Each join step stages its ``SampleBatch`` messages in the join state's outbox and commits them; the
``SampleDeliverer`` then publishes them on ``samples.<p>`` with ``Nats-Msg-Id = sb:<p>:<epoch>:<seq>``,
up to ``window`` of them sent and not yet acknowledged (sent in outbox order on the one connection), and
confirms them in outbox order: a message whose acknowledgement fails or times out is published again
with the same id (JetStream drops the copy if the first one was stored) before any later message is
confirmed, and a step's inputs are acknowledged only once all its messages are confirmed.

A failed message may so be stored after messages that followed it, or be missing from the stream while
they are in it, and a crash can come before it is published again: the last message of ``samples.<p>``
alone no longer says what was delivered. So every message carries ``Freshet-Outbox: <u>:<b>``: every
output before ``u`` (the oldest unconfirmed one when it was sent, itself included) is in the stream, and
every output from ``u`` on that is in the stream was stored after stream sequence ``b`` (the highest
sequence acknowledged to this deliverer before ``u`` was first sent). On start the deliverer reads the
last message of ``samples.<p>``, takes every pending output before its ``u`` as delivered, and looks up
the others among the messages of ``samples.<p>`` after ``b`` (at most about a window of them); what it
does not find it publishes again, in order. A last message without the header was published one at a
time, awaited each: every output up to it is in the stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from opentelemetry import trace

from freshet import bus, telemetry
from services.joiner.columnjoin import ColumnJoin

logger = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)

OUTBOX_HEADER = "Freshet-Outbox"


@dataclass
class Delivery:
    """What one join step hands to delivery.

    ``staged`` is (outbox seq, message, samples) per message, ``parents`` the headers of the inputs that
    produced samples (for tracing), ``acked`` the inputs to acknowledge once every message is confirmed.
    """

    staged: list[tuple[int, bytes, int]]
    parents: list = field(default_factory=list)
    acked: list[Msg] = field(default_factory=list)


@dataclass
class _Sent:
    """A message sent and not yet confirmed; ``delivery`` is set on the last message of its step."""

    seq: int
    data: bytes
    samples: int
    ack: asyncio.Future | None = None
    delivery: Delivery | None = None
    span: trace.Span | None = None


class SampleDeliverer:
    """Publishes one partition's outbox on ``samples.<p>``; see the module docstring for the guarantees."""

    def __init__(
        self,
        js: JetStreamContext,
        partition: int,
        join: ColumnJoin,
        *,
        window: int,
        timeout_s: float,
        give_up: Callable[[], bool] = lambda: False,
    ) -> None:
        self.js = js
        self.partition = partition
        self.subject = f"samples.{partition}"
        self.join = join
        self.window = max(1, window)
        self.timeout_s = timeout_s
        self.give_up = give_up  # true once publishing can no longer succeed (shut down): retries stop
        self.samples_published = 0
        self.outputs_republished = 0  # staged before a crash, published on start
        self._bound = 0  # highest SAMPLES sequence acknowledged to us: later sends are stored after it
        self._unconfirmed: deque[tuple[int, int]] = deque()  # (outbox seq, bound at its first send)
        self._slots = asyncio.Semaphore(self.window)

    def msg_id(self, seq: int) -> str:
        return f"sb:{self.partition}:{self.join.epoch}:{seq}"

    def _own_seq(self, headers: dict | None) -> int | None:
        """The outbox seq of one of this state's messages (by its id), or None for anyone else's."""
        prefix = self.msg_id(0)[:-1]
        msg_id = (headers or {}).get(bus.MSG_ID, "")
        return (
            int(msg_id[len(prefix) :]) if msg_id.startswith(prefix) and msg_id[len(prefix) :].isdigit() else None
        )

    # -- start: what the stream holds of the outbox --------------------------------------------------------

    async def recover(self) -> None:
        """Publishes the outputs committed before a crash that ``samples.<p>`` does not hold, in order."""
        self._bound = (await self.js.stream_info(bus.SAMPLES.name)).state.last_seq
        pending = self.join.pending_outputs()
        if not pending:
            return
        delivered = await self._delivered([seq for seq, _ in pending])
        for seq, data in pending:
            if seq in delivered:
                self.join.output_delivered(seq)
                continue
            self._unconfirmed.append((seq, self._bound))
            ack = await self._publish_until_stored(seq, data, None)
            self._unconfirmed.popleft()
            self._bound = max(self._bound, ack.seq)
            self.join.output_delivered(seq)
            self.outputs_republished += 1
        self.join.commit()
        logger.info(
            "outbox recovered",
            extra={"partition": self.partition, "pending": len(pending), "republished": self.outputs_republished},
        )

    async def _delivered(self, pending: list[int]) -> set[int]:
        """The pending outbox seqs the stream holds."""
        try:
            last = await self.js.get_last_msg(bus.SAMPLES.name, self.subject)
        except NotFoundError:
            return set()
        last_seq = self._own_seq(last.headers)
        if last_seq is None:
            return set()  # not ours (a state wiped since has a new epoch): nothing pending was delivered
        floor = (last.headers or {}).get(OUTBOX_HEADER)
        if floor is None:
            return {seq for seq in pending if seq <= last_seq}
        oldest, after = (int(part) for part in floor.split(":"))
        found = {seq for seq in pending if seq < oldest}
        stream_seq = after + 1
        while True:
            try:
                msg = await self.js.get_msg(bus.SAMPLES.name, seq=stream_seq, subject=self.subject, next=True)
            except NotFoundError:
                return found
            own = self._own_seq(msg.headers)
            if own is not None:
                found.add(own)
            stream_seq = msg.seq + 1

    # -- running: send in order with a window, confirm in order --------------------------------------------

    async def run(self, queue: asyncio.Queue) -> None:
        """Delivers the ``Delivery`` items of ``queue`` until a ``None``, then what is sent by then."""
        sent: asyncio.Queue = asyncio.Queue()
        confirming = asyncio.ensure_future(self._confirm_forever(sent))
        sending = asyncio.current_task()
        # A confirmer that failed (gave up at shutdown) frees no more slots: stop sending too.
        confirming.add_done_callback(lambda done: done.cancelled() or done.exception() is None or sending.cancel())
        try:
            while (item := await queue.get()) is not None:
                await self._send_delivery(item, sent)
            while not queue.empty():  # queued before the None (shutdown): deliver those too
                if (item := queue.get_nowait()) is not None:
                    await self._send_delivery(item, sent)
        except asyncio.CancelledError:
            confirming.cancel()
            await asyncio.gather(confirming, return_exceptions=True)
            if not confirming.cancelled() and confirming.exception() is not None:
                raise confirming.exception() from None  # the confirmer gave up: that is the failure
            raise
        sent.put_nowait(None)
        await confirming

    async def _send_delivery(self, item: Delivery, sent: asyncio.Queue) -> None:
        span = self._span(item)
        if not item.staged:  # nothing to publish; its inputs are acknowledged in turn
            sent.put_nowait(_Sent(-1, b"", 0, delivery=item, span=span))
            return
        last = len(item.staged) - 1
        for i, (seq, data, samples) in enumerate(item.staged):
            await self._slots.acquire()
            entry = _Sent(seq, data, samples, delivery=item if i == last else None, span=span)
            self._unconfirmed.append((seq, self._bound))
            entry.ack = await self._send(seq, data, span)
            sent.put_nowait(entry)

    def _span(self, item: Delivery) -> trace.Span | None:
        # The first input carrying a trace is the parent, so its trace continues through training; the
        # others are linked. Without any, there is nothing to continue and no span (a span costs about as
        # much as publishing the samples).
        traced = [headers for headers in item.parents if telemetry.links_from([headers])]
        if not traced:
            return None
        return tracer.start_span(
            "join_batch",
            context=telemetry.extract_headers(traced[0]),
            links=telemetry.links_from(traced[1:]),
            attributes={"samples": sum(n for _, _, n in item.staged), "partition": self.partition},
        )

    async def _send(self, seq: int, data: bytes, span: trace.Span | None) -> asyncio.Future:
        """Sends one message without waiting for its acknowledgement; returns the acknowledgement's future."""
        oldest, after = self._unconfirmed[0]
        headers = {bus.MSG_ID: self.msg_id(seq), OUTBOX_HEADER: f"{oldest}:{after}"}
        if span is not None:
            with trace.use_span(span, end_on_exit=False):
                telemetry.inject_headers(headers)
        try:
            return await self.js.publish_async(self.subject, data, headers=headers)
        except (nats.errors.Error, TimeoutError) as exc:
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed

    async def _confirm_forever(self, sent: asyncio.Queue) -> None:
        while (entry := await sent.get()) is not None:
            if entry.ack is not None:
                ack = await self._confirmed(entry)
                self._unconfirmed.popleft()
                self._bound = max(self._bound, ack.seq)
                self.join.output_delivered(entry.seq)
                self.samples_published += entry.samples
                self._slots.release()
            if entry.delivery is not None:
                if entry.span is not None:
                    entry.span.end()
                for msg in entry.delivery.acked:
                    await msg.ack()

    async def _confirmed(self, entry: _Sent):
        """The acknowledgement of a sent message, publishing it again (same id) until JetStream stores it."""
        try:
            return await asyncio.wait_for(entry.ack, self.timeout_s)  # cancels the future on timeout
        except (nats.errors.Error, TimeoutError) as exc:
            logger.warning("publishing samples failed; retrying", extra={"seq": entry.seq, "error": repr(exc)})
        return await self._publish_until_stored(entry.seq, entry.data, entry.span, first_delay_s=0.05)

    async def _publish_until_stored(
        self, seq: int, data: bytes, span: trace.Span | None, first_delay_s: float = 0.0
    ):
        """Publishes one message and waits for its acknowledgement, again and again until it comes.

        Gives up (raises) only once ``give_up()`` holds: what is not confirmed stays in the outbox.
        """
        delay = 0.05
        if first_delay_s:
            await asyncio.sleep(first_delay_s)
        while True:
            try:
                return await asyncio.wait_for(await self._send(seq, data, span), self.timeout_s)
            except (nats.errors.Error, TimeoutError) as exc:
                if self.give_up():
                    raise
                logger.warning("publishing samples failed; retrying", extra={"seq": seq, "error": repr(exc)})
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
