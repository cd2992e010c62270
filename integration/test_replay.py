"""Replaying dataset files into JetStream on a real nats-server: what is stored, pacing, and the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from freshet import bus
from freshet.datasets import DatasetError, read_events
from freshet.eventcolumns import decode_event_columns, row_event
from freshet.events.v1 import events_pb2
from freshet.replay import replay
from freshet.testing import assert_eventually

# 30 MovieLens ratings in u.data's format, deliberately out of time order, some sharing a second.
U_DATA = "".join(f"{u % 7 + 1}\t{u * 13 % 11 + 1}\t{u % 5 + 1}\t{881250000 + (u * 37) % 10}\n" for u in range(30))


@pytest.fixture
def u_data(tmp_path) -> Path:
    """A u.data file of U_DATA."""
    return write(tmp_path / "u.data", U_DATA)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def stored(js) -> list[tuple[str, str, list]]:
    """(subject, Nats-Msg-Id, events) of every message in the EVENTS stream, in stream order."""
    info = await js.stream_info(bus.EVENTS.name)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else ():
        msg = await js.get_msg(bus.EVENTS.name, seq)
        out.append((msg.subject, msg.headers[bus.MSG_ID], columns_as_events(decode_event_columns(msg.data))))
    return out


def columns_as_events(columns) -> list:
    """The Impression / Action protobufs of a columns message, in order."""
    rows = [events_pb2.Event.FromString(row_event(columns, i)) for i in range(len(columns))]
    return [getattr(row, row.WhichOneof("kind")) for row in rows]


class FakeClock:
    """A clock that only moves when replay sleeps; each sleep records its length and what was stored."""

    def __init__(self, js, now_ms: int = 1_700_000_000_000) -> None:
        self.js, self.t, self._now_ms = js, 100.0, now_ms
        self.sleeps: list[tuple[float, int]] = []

    def monotonic(self) -> float:
        return self.t

    def now_ms(self) -> int:
        return self._now_ms

    async def sleep(self, seconds: float) -> None:
        events = sum(len(batch) for _, _, batch in await stored(self.js))
        self.sleeps.append((round(seconds, 6), events))
        self.t += seconds


def impression(request_id: str, time_ms: int) -> events_pb2.Impression:
    return events_pb2.Impression(request_id=request_id, user_id=1, item_id=2, event_time_ms=time_ms)


async def test_replay_stores_exactly_the_dataset_events_per_partition_in_order(js, u_data):
    expected = list(read_events("movielens", u_data))

    stats = await replay(js, iter(expected), partitions=3, speedup=None, name="ml-test", max_events=4)

    messages = await stored(js)
    by_partition: dict[int, list] = {0: [], 1: [], 2: []}
    for subject, msg_id, events in messages:
        partition = int(subject.rsplit(".", 1)[1])
        assert subject == f"events.columns.{partition}" and 1 <= len(events) <= 4
        by_partition[partition].append(msg_id)
        by_partition[partition].extend(events)
    for partition, items in by_partition.items():
        ids = [item for item in items if isinstance(item, str)]
        assert ids == [f"ml-test:{partition}:{n}" for n in range(1, len(ids) + 1)]
        events = [item for item in items if not isinstance(item, str)]
        assert events == [e for e in expected if bus.event_partition(e.request_id, 3) == partition]
    clicks = sum(isinstance(e, events_pb2.Action) for e in expected)
    assert (stats.events, stats.impressions, stats.clicks) == (len(expected), 30, clicks)
    assert stats.messages == len(messages)
    assert (stats.first_event_ms, stats.last_event_ms) == (expected[0].event_time_ms, expected[-1].event_time_ms)


async def test_replaying_again_under_the_same_name_stores_nothing_new(js, u_data):

    first = await replay(js, read_events("movielens", u_data), partitions=2, speedup=None, name="same")
    await replay(js, read_events("movielens", u_data), partitions=2, speedup=None, name="same")

    assert len(await stored(js)) == first.messages


async def test_speedup_waits_the_scaled_gaps_after_flushing_and_caps_a_long_gap(js):
    day_ms = 86_400_000
    times = [0, 1000, 1000, 5000, 5000 + day_ms, 6000 + day_ms]
    events = [impression(f"r{i}", t) for i, t in enumerate(times)]
    clock = FakeClock(js)

    stats = await replay(js, events, partitions=1, speedup=2.0, name="paced", max_gap_s=10.0, clock=clock)

    # (wait, events stored when it began): 1 s / 2, 4 s / 2, a day / 2 capped at 10 s, then 1 s / 2 again.
    assert clock.sleeps == [(0.5, 1), (2.0, 3), (10.0, 4), (0.5, 5)]
    assert (stats.waits, stats.capped_waits, stats.events, stats.seconds) == (4, 1, 6, 13.0)
    assert [e.event_time_ms for _, _, batch in await stored(js) for e in batch] == times


async def test_a_set_stop_event_ends_a_paced_replay_with_what_was_read_published(js):
    stop = asyncio.Event()

    class StoppingClock(FakeClock):
        async def sleep(self, seconds: float) -> None:
            await super().sleep(seconds)
            if len(self.sleeps) == 2:
                stop.set()  # as SIGTERM would, during the second wait

    events = [impression(f"r{i}", 1000 * i) for i in range(5)]

    stats = await replay(js, events, partitions=1, speedup=1.0, name="stop", clock=StoppingClock(js), stop=stop)

    assert stats.stopped and stats.events == 2
    assert [e.request_id for _, _, batch in await stored(js) for e in batch] == ["r0", "r1"]


async def test_shift_to_now_moves_every_event_by_one_offset_and_leaves_the_input_alone(js):
    events = [impression("a", 1000), impression("b", 1001), impression("c", 5000)]
    clock = FakeClock(js, now_ms=1_700_000_000_000)

    stats = await replay(js, events, partitions=1, speedup=None, name="shift", shift_to_now=True, clock=clock)

    published = [e.event_time_ms for _, _, batch in await stored(js) for e in batch]
    assert published == [1_700_000_000_000, 1_700_000_000_001, 1_700_000_004_000]
    assert stats.shift_ms == 1_700_000_000_000 - 1000 and stats.first_event_ms == 1_700_000_000_000
    assert [e.event_time_ms for e in events] == [1000, 1001, 5000]


async def test_a_malformed_row_raises_after_publishing_the_rows_before_it(js, tmp_path):
    row = "0" + "\t" * 39 + "\n"
    path = write(tmp_path / "train.txt", row + row.replace("0", "1", 1) + "0\tbad\n")

    with pytest.raises(DatasetError, match=r"train\.txt:3: expected 40"):
        await replay(js, read_events("criteo", path), partitions=1, speedup=None, name="bad")

    assert [e.request_id for _, _, batch in await stored(js) for e in batch] == [
        "criteo:1",
        "criteo:2",
        "criteo:2",
    ]


async def start_cli(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "freshet.cli",
        "replay",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await start_cli(*args, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode, out.decode(), err.decode()


async def test_cli_replays_a_file_on_the_partitions_of_freshet_partitions(js, nats_url, u_data):
    expected = list(read_events("movielens", u_data))
    clicks = sum(isinstance(e, events_pb2.Action) for e in expected)

    code, out, err = await run_cli(
        "movielens", str(u_data), "--nats-url", nats_url, env={"FRESHET_PARTITIONS": "2"}
    )

    assert code == 0, err
    assert f"{len(expected)} events (30 impressions, {clicks} clicks)" in out
    messages = await stored(js)
    assert {subject for subject, _, _ in messages} == {"events.columns.0", "events.columns.1"}
    assert sorted(e.SerializeToString(deterministic=True) for _, _, batch in messages for e in batch) == sorted(
        e.SerializeToString(deterministic=True) for e in expected
    )


async def test_cli_exits_2_with_the_line_of_a_malformed_row_and_publishes_nothing(js, nats_url, tmp_path):
    path = write(tmp_path / "u.data", "1\t2\t5\t100\n1\t2\t5\n")

    code, out, err = await run_cli("movielens", str(path), "--nats-url", nats_url, "--partitions", "1")

    assert code == 2 and out == ""
    assert f"{path}:2: expected 4" in err and "Traceback" not in err
    assert await stored(js) == []


async def test_cli_stops_gracefully_on_sigterm_with_what_it_read_published(js, nats_url, tmp_path):
    # One rating a minute at real speed: without the signal this would run for over an hour.
    path = write(tmp_path / "u.data", "".join(f"1\t{i}\t3\t{1000 + 60 * i}\n" for i in range(1, 80)))
    proc = await start_cli("movielens", str(path), "--nats-url", nats_url, "--speedup", "1", "--partitions", "1")

    async def first_stored():
        return await stored(js)

    await assert_eventually(first_stored, timeout_s=30)
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)

    assert proc.returncode == 0, err.decode()
    assert "stopped early" in out.decode()
    assert [e.request_id for _, _, batch in await stored(js) for e in batch] == ["ml:1"]
