"""The joiner's delivery on a real nats-server: join steps hand samples on early, several publishes in
flight keep the outbox order, the recovery and the input acknowledgements exactly once."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np

from freshet import bus
from freshet.batches import Sample, encode_samples
from freshet.config import BusConfig
from freshet.events.v1 import events_pb2
from freshet.testing import SampleReader, assert_eventually
from services.joiner.columnjoin import ColumnJoin
from services.joiner.config import JoinerConfig
from services.joiner.delivery import OUTBOX_HEADER, Delivery, SampleDeliverer
from services.joiner.service import JoinerService


def _output(name: str) -> bytes:
    return encode_samples([Sample(f"{name}:1:v1", np.arange(3, dtype=np.int64), 1.0)])


async def _stream_ids(js) -> list[str]:
    reader = SampleReader(js)
    await reader.read()
    return reader.ids


def _backlog_config(step_events: int, **overrides) -> JoinerConfig:
    """Windows that close once the next message is joined, and a fetch timeout long enough for the first
    fetch to take the whole backlog."""
    return JoinerConfig(
        window_s=0.05,
        allowed_lateness_s=0,
        idle_timeout_s=60,
        step_events=step_events,
        fetch_batch=512,
        fetch_timeout_s=1.0,
        **overrides,
    )


async def _publish_backlog(js, prefix: str) -> None:
    """40 messages of 10 impressions, 1 s apart in event time, so each message's impressions close
    (become samples) when the next message is joined; request ids ``<prefix><m>-<i>``, item ``i``."""
    t = bus.now_ms() - 60_000
    for m in range(40):
        batch = events_pb2.EventBatch()
        for i in range(10):
            imp = batch.events.add().impression
            imp.request_id, imp.user_id, imp.item_id, imp.event_time_ms = f"{prefix}{m}-{i}", 1, i, t + m * 1000
        await bus.publish(js, "events.batch.0", batch.SerializeToString())


class _Input:
    """An input message whose acknowledgement checks that its samples are in the stream by then."""

    def __init__(self, js, deliverer: SampleDeliverer, expected: list[str], log: list) -> None:
        self.js, self.deliverer, self.expected, self.log = js, deliverer, expected, log

    async def ack(self) -> None:
        pending = {seq for seq, _ in self.deliverer.join.pending_outputs()}
        self.log.append((set(self.expected) <= set(await _stream_ids(self.js)), pending))


async def test_several_publishes_are_in_flight_and_stored_in_outbox_order(js):
    join = ColumnJoin(JoinerConfig().join_config())
    deliverer = SampleDeliverer(js, 0, join, window=4, timeout_s=5)
    await deliverer.recover()
    names = [f"o{i}" for i in range(10)]
    staged = [(join.stage_output(_output(name)), _output(name), 1) for name in names]
    acks: list = []
    queue: asyncio.Queue = asyncio.Queue()
    queue.put_nowait(Delivery(staged[:6], acked=[_Input(js, deliverer, [f"{n}:1:v1" for n in names[:6]], acks)]))
    queue.put_nowait(Delivery(staged[6:], acked=[_Input(js, deliverer, [f"{n}:1:v1" for n in names], acks)]))
    queue.put_nowait(None)
    await deliverer.run(queue)

    assert await _stream_ids(js) == [f"{name}:1:v1" for name in names]
    # Each input was acknowledged once its step's samples were stored and confirmed (out of the outbox).
    assert [stored for stored, _ in acks] == [True, True]
    assert not acks[0][1] & {seq for seq, _, _ in staged[:6]} and join.pending_outputs() == []
    # The headers name the oldest unconfirmed output when each was sent: later ones went before the
    # earlier ones' acknowledgements came back.
    floors = []
    for stream_seq in range(1, 11):
        msg = await js.get_msg(bus.SAMPLES.name, stream_seq)
        floors.append(int(msg.headers[OUTBOX_HEADER].split(":")[0]))
    seqs = [seq for seq, _, _ in staged]
    assert any(floor < seq for floor, seq in zip(floors, seqs, strict=True))
    assert deliverer.samples_published == 10


async def test_a_lost_publish_in_the_window_is_sent_again_and_its_inputs_wait_for_it(js, monkeypatch):
    join = ColumnJoin(JoinerConfig().join_config())
    deliverer = SampleDeliverer(js, 0, join, window=4, timeout_s=5)
    await deliverer.recover()
    names = [f"l{i}" for i in range(6)]
    staged = [(join.stage_output(_output(name)), _output(name), 1) for name in names]
    lost = staged[1][0]
    send = SampleDeliverer._send
    attempts: list[int] = []

    async def losing_send(self, seq, data, span):
        attempts.append(seq)
        if seq == lost and attempts.count(seq) == 1:  # as if the connection dropped it: no ack ever comes
            return asyncio.get_running_loop().create_future()
        return await send(self, seq, data, span)

    monkeypatch.setattr(SampleDeliverer, "_send", losing_send)
    deliverer.timeout_s = 0.3
    acks: list = []
    queue: asyncio.Queue = asyncio.Queue()
    queue.put_nowait(Delivery(staged, acked=[_Input(js, deliverer, [f"{n}:1:v1" for n in names], acks)]))
    queue.put_nowait(None)
    await deliverer.run(queue)

    ids = await _stream_ids(js)
    assert sorted(ids) == sorted(f"{name}:1:v1" for name in names)  # each once
    assert ids.index("l1:1:v1") > ids.index("l2:1:v1")  # stored after outputs sent behind it
    assert attempts.count(lost) == 2
    assert acks == [(True, set())]


async def test_recovery_republishes_an_output_missing_behind_a_later_stored_one_and_nothing_stored(
    nats_url, tmp_path
):
    """A crash while the first of three in-flight outputs was lost and the second stored: on start the
    joiner publishes the first and the third, not the second (its last message's header bounds the search)."""
    config = JoinerConfig(state_dir=str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    join = ColumnJoin(config.join_config(), str(tmp_path / "state" / "p0"))
    outputs = [_output(f"x{i}") for i in range(3)]
    seqs = [join.stage_output(data) for data in outputs]
    join.commit()
    join.close()
    async with JoinerService(JoinerConfig(), BusConfig(nats_url=nats_url)) as other:  # declares streams
        await bus.publish(other.js, "samples.1", _output("elsewhere"))  # another partition's, before
        before = (await other.js.stream_info(bus.SAMPLES.name)).state.last_seq
        headers = {OUTBOX_HEADER: f"{seqs[0]}:{before}"}
        await bus.publish(
            other.js, "samples.0", outputs[1], msg_id=f"sb:0:{join.epoch}:{seqs[1]}", headers=headers
        )
    async with JoinerService(config, BusConfig(nats_url=nats_url)) as joiner:
        assert joiner.outputs_republished == 2
        assert await _stream_ids(joiner.js) == ["elsewhere:1:v1", "x1:1:v1", "x0:1:v1", "x2:1:v1"]
        assert joiner.partitions[0].join.pending_outputs() == []


async def test_a_fetch_joined_in_steps_publishes_its_first_samples_before_its_last_events_are_joined(
    js, nats_url, monkeypatch
):
    order: list[str] = []
    on_columns, send = ColumnJoin.on_columns, SampleDeliverer._send

    def recording_join(self, *columns):
        order.append("join")
        return on_columns(self, *columns)

    async def recording_send(self, seq, data, span):
        order.append("send")
        return await send(self, seq, data, span)

    monkeypatch.setattr(ColumnJoin, "on_columns", recording_join)
    monkeypatch.setattr(SampleDeliverer, "_send", recording_send)
    config = _backlog_config(step_events=10)
    await _publish_backlog(js, "s")  # the joiner's first fetch takes it whole
    async with JoinerService(config, BusConfig(nats_url=nats_url)) as joiner:
        await assert_eventually(lambda: joiner.counts["negatives"] >= 390, timeout_s=10)
    joins = [i for i, what in enumerate(order) if what == "join"]
    assert len(joins) == 40
    assert order.index("send") < joins[-1]


async def test_a_join_step_failing_with_uncommitted_state_stops_the_joiner_and_a_restart_loses_nothing(
    js, nats_url, tmp_path, monkeypatch
):
    """The join raises in the middle of a step, after earlier messages of the step were joined: retrying
    the step's messages would find their events in the state (duplicates) while their samples were never
    staged. The joiner stops instead, unacknowledged; restarted on the committed state, it makes every
    sample exactly once."""
    on_columns = ColumnJoin.on_columns
    calls = {"n": 0}

    def failing_once(self, *columns):
        calls["n"] += 1
        if calls["n"] == 15:  # the 5th message of the second step of 10
            raise OSError("injected failure inside the join")
        return on_columns(self, *columns)

    monkeypatch.setattr(ColumnJoin, "on_columns", failing_once)
    config = _backlog_config(step_events=100, state_dir=str(tmp_path / "state"))
    await _publish_backlog(js, "f")
    async with JoinerService(config, BusConfig(nats_url=nats_url)) as joiner:
        await asyncio.wait_for(joiner.stopping.wait(), timeout=10)
        assert isinstance(joiner.failed, OSError)
    assert calls["n"] == 15
    with_samples = len(await _stream_ids(js))
    assert with_samples < 390  # it stopped before the end

    async with JoinerService(config, BusConfig(nats_url=nats_url)) as joiner:
        await assert_eventually(lambda: joiner.counts["negatives"] >= 390, timeout_s=10)
        assert joiner.failed is None
    ids = await _stream_ids(js)
    expected = {f"f{m}-{i}:{i}:v1" for m in range(39) for i in range(10)}  # the last message's stay open
    assert len(ids) == len(set(ids)) == 390
    assert set(ids) == expected


async def test_a_tick_whose_commit_fails_stops_the_joiner_and_a_restart_loses_nothing(
    js, nats_url, tmp_path, monkeypatch
):
    """The last message's windows close only when the idle partition's tick moves the watermark. Its
    commit fails: the fired samples are in the outbox but were never handed to delivery, so no later step
    may commit them. The joiner stops instead; restarted on the committed state, it fires them again."""
    commit = ColumnJoin.commit
    failed = []

    def failing_once(self):
        if not failed and self.counters["impressions"] == 400 and self.counters["negatives"] == 400:
            failed.append(True)
            raise OSError("injected failure of the tick's commit")
        commit(self)

    monkeypatch.setattr(ColumnJoin, "commit", failing_once)
    config = replace(_backlog_config(step_events=100, state_dir=str(tmp_path / "state")), idle_timeout_s=0.3)
    await _publish_backlog(js, "t")
    async with JoinerService(config, BusConfig(nats_url=nats_url)) as joiner:
        await asyncio.wait_for(joiner.stopping.wait(), timeout=10)
        assert isinstance(joiner.failed, OSError)
    assert failed and len(await _stream_ids(js)) == 390  # the last message's 10 were not published

    async with JoinerService(config, BusConfig(nats_url=nats_url)) as joiner:
        await assert_eventually(lambda: joiner.counts["samples"] >= 10, timeout_s=10)
        assert joiner.failed is None
    ids = await _stream_ids(js)
    assert len(ids) == len(set(ids)) == 400
    assert set(ids) == {f"t{m}-{i}:{i}:v1" for m in range(40) for i in range(10)}
