"""Tests of the JetStream plumbing on a real nats-server: declarations, publish, and the pull loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from opentelemetry import trace

from freshet import telemetry
from freshet.bus import (
    ALL_STREAMS,
    DEADLETTER,
    DENSE,
    EVENTS,
    ConsumerSpec,
    Outcome,
    PullLoop,
    Reject,
    StreamSpec,
    connect,
    declare_consumer,
    declare_streams,
    publish,
)
from freshet.config import BusConfig
from freshet.natsserver import free_port
from freshet.testing import assert_eventually

SOURCE = "test-src"


@pytest.fixture
async def nc(nats_url) -> AsyncIterator[NATS]:
    client = await connect(BusConfig(nats_url=nats_url), "test-bus")
    yield client
    await client.drain()


@pytest.fixture
async def js(nc) -> JetStreamContext:
    js = nc.jetstream()
    await declare_streams(js)
    return js


def _spec(durable: str = "test-durable", **overrides) -> ConsumerSpec:
    params = {"ack_wait_s": 0.5, "max_deliver": 3} | overrides
    return ConsumerSpec(EVENTS.name, durable, "events.>", **params)


def _loop(js: JetStreamContext, handle_one: Callable[[Msg], Awaitable[Outcome]], **overrides) -> PullLoop:
    params = {"batch": 16, "fetch_timeout_s": 0.1, "nak_delay_s": 0.05} | overrides
    loop = PullLoop(js, _spec(), handler=None, source=SOURCE, **params)  # type: ignore[arg-type]
    loop.handler = PullLoop.per_message(loop, handle_one)
    return loop


@contextlib.asynccontextmanager
async def _running(loop: PullLoop) -> AsyncIterator[asyncio.Task]:
    """Runs the loop as a task; on exit stops it and surfaces any error it raised."""
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await assert_eventually(task.done, timeout_s=5, message="pull loop stopped")
    task.result()


async def _until(task: asyncio.Task, condition: Callable[[], object], message: str) -> object:
    """assert_eventually that fails at once, with the loop's own error, if the loop dies first."""

    def check():
        if task.done():
            task.result()
            pytest.fail(f"pull loop exited while waiting for: {message}")
        return condition()

    return await assert_eventually(check, timeout_s=8, message=message)


async def _settled(js: JetStreamContext, n: int, durable: str = "test-durable") -> bool:
    """True once the consumer has delivered ``n`` messages and every one is acked or termed."""
    try:
        info = await js.consumer_info(EVENTS.name, durable)
    except NotFoundError:
        return False  # the loop has not declared its consumer yet
    return info.ack_floor.stream_seq == n and info.num_ack_pending == 0 and info.num_pending == 0


async def _stream_messages(js: JetStreamContext, stream: str) -> int:
    return (await js.stream_info(stream)).state.messages


async def test_connect_returns_a_connected_client(nc, nats_server):
    assert nc.is_connected
    assert nc.connected_url.port == nats_server.port


async def test_connect_gives_up_after_the_configured_attempts():
    config = BusConfig(nats_url=f"nats://127.0.0.1:{free_port()}", connect_attempts=2, connect_backoff_s=0.05)

    with pytest.raises((ConnectionRefusedError, nats.errors.NoServersError)):
        await asyncio.wait_for(connect(config, "doomed"), timeout=1)


async def test_declare_streams_twice_leaves_every_stream_with_its_subjects(js):
    await declare_streams(js)
    await declare_streams(js)

    for spec in ALL_STREAMS:
        config = (await js.stream_info(spec.name)).config
        assert config.subjects == list(spec.subjects), spec.name
        assert config.duplicate_window == spec.duplicate_window_s
    assert (await js.stream_info(DENSE.name)).config.max_msgs_per_subject == 1
    assert (await js.account_info()).streams == len(ALL_STREAMS)


async def test_declare_streams_updates_a_changed_stream(js):
    changed = StreamSpec(EVENTS.name, ("events.>", "replay.>"), max_age_s=600)

    await declare_streams(js, [changed])

    config = (await js.stream_info(EVENTS.name)).config
    assert config.subjects == ["events.>", "replay.>"]
    assert config.max_age == 600


async def test_declare_consumer_twice_keeps_one_durable_with_its_config(js):
    spec = _spec()

    await declare_consumer(js, spec)
    await declare_consumer(js, spec)

    info = await js.consumer_info(EVENTS.name, spec.durable)
    assert info.config.filter_subject == "events.>"
    assert info.config.max_deliver == 3
    assert info.config.ack_wait == 0.5
    assert (await js.stream_info(EVENTS.name)).state.consumer_count == 1


async def test_declare_consumer_updates_a_changed_durable(js):
    await declare_consumer(js, _spec(max_deliver=3))

    await declare_consumer(js, _spec(max_deliver=7, ack_wait_s=2.0))

    config = (await js.consumer_info(EVENTS.name, "test-durable")).config
    assert (config.max_deliver, config.ack_wait) == (7, 2.0)


async def test_publish_with_a_repeated_msg_id_stores_one_message(js):
    first = await publish(js, "events.impression", b"one", msg_id="req-1")
    again = await publish(js, "events.impression", b"one", msg_id="req-1")
    other = await publish(js, "events.impression", b"two", msg_id="req-2")

    assert again == first
    assert other == first + 1
    assert await _stream_messages(js, EVENTS.name) == 2


async def test_publish_carries_trace_context_msg_id_and_given_headers(js):
    telemetry.setup_tracing("test")
    with telemetry.tracer(__name__).start_as_current_span("publish_events") as span:
        await publish(js, "events.impression", b"x", msg_id="req-9", headers={"Freshet-Kind": "impression"})

    stored = await js.get_last_msg(EVENTS.name, "events.impression")
    assert stored.data == b"x"
    assert stored.headers["Nats-Msg-Id"] == "req-9"
    assert stored.headers["Freshet-Kind"] == "impression"
    assert f"{span.get_span_context().trace_id:032x}" in stored.headers["traceparent"]
    received = telemetry.extract_headers(stored.headers)
    assert trace.get_current_span(received).get_span_context().trace_id == span.get_span_context().trace_id


async def test_acked_messages_are_not_redelivered(js):
    seen: list[tuple[bytes, int]] = []

    async def handle_one(msg: Msg) -> Outcome:
        seen.append((msg.data, msg.metadata.num_delivered))
        return Outcome.ACK

    loop = _loop(js, handle_one)
    for i in range(5):
        await publish(js, f"events.e{i}", f"m{i}".encode())

    async with _running(loop) as task:
        await _until(task, lambda: _settled(js, 5), "all five acked")

    info = await js.consumer_info(EVENTS.name, "test-durable")
    assert info.num_redelivered == 0
    assert seen == [(f"m{i}".encode(), 1) for i in range(5)]
    assert loop.stats == {"acked": 5, "naked": 0, "dead_lettered": 0}


async def test_rejected_message_is_dead_lettered_and_later_messages_are_processed(js):
    handled: list[bytes] = []
    poison = b"\x00\xffpoison"

    async def handle_one(msg: Msg) -> Outcome:
        if b"poison" in msg.data:
            raise Reject("bad payload")
        handled.append(msg.data)
        return Outcome.ACK

    loop = _loop(js, handle_one)
    await publish(js, "events.a", b"good-1")
    await publish(js, "events.b", poison)
    await publish(js, "events.c", b"good-2")

    async with _running(loop) as task:
        await _until(task, lambda: _settled(js, 3), "batch settled")
        await publish(js, "events.d", b"good-3")
        await _until(task, lambda: _settled(js, 4), "message after the reject settled")

    assert handled == [b"good-1", b"good-2", b"good-3"]
    assert await _stream_messages(js, DEADLETTER.name) == 1
    dead = await js.get_last_msg(DEADLETTER.name, f"deadletter.{SOURCE}")
    assert dead.data == poison
    assert dead.headers["Freshet-Reason"] == "bad payload"
    assert dead.headers["Freshet-Subject"] == "events.b"
    assert dead.headers["Freshet-Stream-Seq"] == "2"
    assert loop.stats == {"acked": 3, "naked": 0, "dead_lettered": 1}


async def test_failing_message_is_redelivered_then_dead_lettered_after_max_deliver(js):
    attempts: Counter[bytes] = Counter()
    handled: list[tuple[bytes, int]] = []

    async def handle_one(msg: Msg) -> Outcome:
        attempts[msg.data] += 1
        if msg.data == b"always" or (msg.data == b"once" and msg.metadata.num_delivered == 1):
            raise RuntimeError("flaky")
        handled.append((msg.data, msg.metadata.num_delivered))
        return Outcome.ACK

    loop = _loop(js, handle_one)
    await publish(js, "events.a", b"always")
    await publish(js, "events.b", b"once")
    await publish(js, "events.c", b"fine")

    async with _running(loop) as task:
        await _until(task, lambda: _settled(js, 3), "all settled")
        await _until(task, lambda: _stream_messages(js, DEADLETTER.name), "dead letter stored")

    assert attempts == {b"always": 3, b"once": 2, b"fine": 1}
    assert sorted(handled) == [(b"fine", 1), (b"once", 2)]
    dead = await js.get_last_msg(DEADLETTER.name, f"deadletter.{SOURCE}")
    assert dead.data == b"always"
    assert dead.headers["Freshet-Reason"] == "failed 3 deliveries: RuntimeError('flaky')"
    assert loop.stats == {"acked": 2, "naked": 3, "dead_lettered": 1}


async def test_failing_batch_handler_naks_the_whole_batch_for_redelivery(js):
    calls = 0
    deliveries: list[tuple[bytes, int]] = []

    async def handler(msgs: list[Msg]) -> list[Outcome]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("store unavailable")
        deliveries.extend((m.data, m.metadata.num_delivered) for m in msgs)
        return [Outcome.ACK] * len(msgs)

    await publish(js, "events.a", b"a")
    await publish(js, "events.b", b"b")
    loop = PullLoop(js, _spec(), handler, SOURCE, batch=16, fetch_timeout_s=0.1, nak_delay_s=0.05)

    async with _running(loop) as task:
        await _until(task, lambda: _settled(js, 2), "batch redelivered and acked")

    assert sorted(deliveries) == [(b"a", 2), (b"b", 2)]
    assert loop.stats == {"acked": 2, "naked": 2, "dead_lettered": 0}


async def test_deferred_message_stays_pending_until_the_handler_acks_it(js):
    kept: list[Msg] = []

    async def handle_one(msg: Msg) -> Outcome:
        kept.append(msg)
        return Outcome.DEFER

    loop = _loop(js, handle_one)
    loop.spec = _spec(ack_wait_s=30.0)
    await publish(js, "events.a", b"a")

    async with _running(loop) as task:
        await _until(task, lambda: kept, "message handed to the handler")
        info = await js.consumer_info(EVENTS.name, "test-durable")
        assert info.num_ack_pending == 1
        await kept[0].ack()
        await _until(task, lambda: _settled(js, 1), "deferred message acked")

    assert loop.stats["acked"] == 0


async def test_loop_returns_once_stop_is_set(js):
    async def handle_one(msg: Msg) -> Outcome:
        return Outcome.ACK

    loop = _loop(js, handle_one, fetch_timeout_s=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    await _until(task, lambda: _settled(js, 0), "consumer declared by the loop")

    stop.set()

    await assert_eventually(task.done, timeout_s=3, message="loop returned after stop")
    assert task.result() is None


async def test_prefetching_loop_fetches_the_next_batch_while_handling_and_keeps_delivery_order(js):
    fetches_started = 0
    next_fetch_started = asyncio.Event()
    handled: list[bytes] = []
    overlapped = 0

    class Recording(PullLoop):
        async def _fetch(self, sub) -> list[Msg]:
            nonlocal fetches_started
            fetches_started += 1
            next_fetch_started.set()
            return await super()._fetch(sub)

    async def handler(msgs: list[Msg]) -> list[Outcome]:
        nonlocal overlapped
        started = fetches_started
        next_fetch_started.clear()
        # Yields until the next fetch is under way: with prefetch it starts before this batch is handled.
        await asyncio.wait_for(next_fetch_started.wait(), timeout=5)
        overlapped += fetches_started > started
        handled.extend(m.data for m in msgs)
        return [Outcome.ACK] * len(msgs)

    sent = [f"m{i}".encode() for i in range(40)]
    for data in sent:
        await publish(js, "events.a", data)
    loop = Recording(js, _spec(), handler, SOURCE, batch=4, fetch_timeout_s=0.1, prefetch=True)

    async with _running(loop) as task:
        await _until(task, lambda: _settled(js, len(sent)), "every message handled and acked")

    assert handled == sent  # once each, in stream order
    assert overlapped >= len(sent) // 4  # every batch was handled while the next fetch ran


async def test_a_prefetching_loop_holds_messages_while_it_handles_a_batch_or_has_the_next_one_fetched(js):
    """What the consumer no longer counts as pending: the batch being handled, and a prefetched one."""
    gate, handling = asyncio.Event(), asyncio.Event()

    async def handler(msgs: list[Msg]) -> list[Outcome]:
        handling.set()
        await gate.wait()
        return [Outcome.ACK] * len(msgs)

    loop = PullLoop(js, _spec(), handler, SOURCE, batch=2, fetch_timeout_s=0.05, prefetch=True)
    assert not loop.holds_messages()
    for i in range(4):
        await publish(js, "events.a", f"m{i}".encode())
    async with _running(loop) as task:
        await asyncio.wait_for(handling.wait(), timeout=5)
        assert loop.holds_messages()  # the first batch, in the handler
        await _until(task, lambda: _fetched(loop), "the second batch prefetched")
        gate.set()
        await _until(task, lambda: _settled(js, 4), "every message handled and acked")
        await _until(task, lambda: _not_holding(loop), "nothing held once the stream is drained")


async def _fetched(loop: PullLoop) -> bool:
    return loop._next is not None and loop._next.done() and bool(loop._next.result())


async def _not_holding(loop: PullLoop) -> bool:
    return not loop.holds_messages()
