"""The join state: one contract for memory and RocksDB, plus commit, crash and reopen on RocksDB."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rocksdict import Options, Rdict

from services.joiner.eventjoin import EventJoin, JoinConfig
from services.joiner.joinstate import (
    ActionEvent,
    ActionType,
    ImpressionEvent,
    JoinMeta,
    JoinState,
    MemoryJoinState,
    RocksJoinState,
    Timer,
    TimerKind,
    WindowRecord,
)

KEYS = [("a", 1), ("b", -3), ("", 0), ("é", 2**40)]


def record(key, version: int) -> WindowRecord:
    return WindowRecord(
        impression=ImpressionEvent(key[0], 5, key[1], 1, version * 10, (("k", "v"),)),
        close_ms=version * 10 + 100,
        labels=(float(version), 0.0, 0.0, 0.5),
        types=frozenset(ActionType(1 + i) for i in range(version % 5)),
        version=version,
        closed=version % 2 == 1,
    )


def actions(key, n: int) -> tuple[ActionEvent, ...]:
    return tuple(ActionEvent(key[0], key[1], ActionType(1 + i % 4), i * 1.5, i) for i in range(n))


@pytest.fixture(params=["memory", "rocks"])
def state(request, tmp_path: Path) -> Iterator[JoinState]:
    s = MemoryJoinState() if request.param == "memory" else RocksJoinState(str(tmp_path / "join"))
    yield s
    s.close()


def test_window_record_round_trips_and_delete_removes_it(state: JoinState):
    for i, key in enumerate(KEYS):
        state.put_window(key, record(key, i + 1))
    state.commit()
    state.delete_window(KEYS[0])
    assert state.get_window(KEYS[0]) is None
    assert [state.get_window(k) for k in KEYS[1:]] == [record(k, i + 2) for i, k in enumerate(KEYS[1:])]


def test_buffer_keeps_arrival_order_and_empty_tuple_deletes_it(state: JoinState):
    state.put_buffer(KEYS[1], actions(KEYS[1], 3))
    state.commit()
    assert state.get_buffer(KEYS[1]) == actions(KEYS[1], 3)
    state.put_buffer(KEYS[1], ())
    assert state.get_buffer(KEYS[1]) == () and state.get_buffer(KEYS[0]) == ()


def test_due_timers_pop_once_ordered_by_time_kind_then_key(state: JoinState):
    timers = [
        Timer(20, TimerKind.CLOSE, ("a", 1)),
        Timer(-5, TimerKind.ORPHAN, ("z", -(2**40))),
        Timer(10, TimerKind.ORPHAN, ("a", 1)),
        Timer(10, TimerKind.CLOSE, ("b", 2)),
        Timer(10, TimerKind.CLOSE, ("a", 2)),
        Timer(10, TimerKind.FORGET, ("a", 1)),
    ]
    for t in timers[:3]:
        state.add_timer(t)
    state.commit()  # half the timers on disk, half in the uncommitted overlay
    for t in timers[3:]:
        state.add_timer(t)
    state.add_timer(timers[0])  # adding twice schedules once
    assert state.pop_due(9) == [timers[1]]
    assert state.pop_due(10) == [timers[4], timers[3], timers[5], timers[2]]
    assert state.pop_due(10) == []
    assert state.pop_due(100) == [timers[0]]


def test_removed_timer_never_fires_whether_committed_or_not(state: JoinState):
    on_disk, in_overlay = Timer(5, TimerKind.CLOSE, KEYS[0]), Timer(6, TimerKind.CLOSE, KEYS[1])
    state.add_timer(on_disk)
    state.commit()
    state.add_timer(in_overlay)
    state.remove_timer(on_disk)
    state.remove_timer(in_overlay)
    state.remove_timer(Timer(7, TimerKind.CLOSE, KEYS[2]))  # never scheduled: ignored
    assert state.pop_due(100) == []


def test_timer_due_just_after_an_earlier_pop_still_fires(state: JoinState):
    timers = [Timer(t, TimerKind.CLOSE, KEYS[0]) for t in (5, 6, 7)]
    for t in timers:
        state.add_timer(t)
    state.commit()
    assert state.pop_due(5) == timers[:1]
    assert state.pop_due(6) == timers[1:2]
    state.commit()
    assert state.pop_due(7) == timers[2:]


def test_timer_scheduled_earlier_than_a_previous_pop_still_fires(state: JoinState):
    assert state.pop_due(100) == []
    late = Timer(50, TimerKind.FORGET, KEYS[0])
    state.add_timer(late)
    state.commit()
    assert state.pop_due(200) == [late]


def test_meta_round_trips(state: JoinState):
    assert state.load_meta() is None
    meta = JoinMeta(max_event_ms=12, watermark_ms=-3, counters={"impressions": 4})
    state.save_meta(meta)
    state.commit()
    assert state.load_meta() == meta


def test_reopening_rocks_state_restores_every_committed_change(tmp_path: Path):
    path = str(tmp_path / "join")
    with RocksJoinState(path) as s:
        s.put_window(KEYS[0], record(KEYS[0], 3))
        s.put_buffer(KEYS[1], actions(KEYS[1], 2))
        s.add_timer(Timer(9, TimerKind.ORPHAN, KEYS[1]))
        s.save_meta(JoinMeta(20, 10, {"actions": 2}))
        s.put_outbox(7, b"out")
        s.commit()
    with RocksJoinState(path) as s:
        assert s.get_window(KEYS[0]) == record(KEYS[0], 3)
        assert s.get_buffer(KEYS[1]) == actions(KEYS[1], 2)
        assert s.load_meta() == JoinMeta(20, 10, {"actions": 2})
        assert s.outbox() == [(7, b"out")]
        # Timers are process memory; the windows and buffers they follow from are listed for EventJoin.
        assert s.pop_due(9) == []
        assert list(s.windows()) == [(KEYS[0], 130, True)]
        assert list(s.buffers()) == [(KEYS[1], actions(KEYS[1], 2))]


def test_changes_after_the_last_commit_are_lost_when_closed_like_a_crash(tmp_path: Path):
    path = str(tmp_path / "join")
    with RocksJoinState(path) as s:
        s.put_window(KEYS[0], record(KEYS[0], 1))
        s.add_timer(Timer(1, TimerKind.CLOSE, KEYS[0]))
        s.commit()
        s.put_window(KEYS[0], record(KEYS[0], 2))
        s.put_window(KEYS[1], record(KEYS[1], 2))
        assert s.pop_due(5) == [Timer(1, TimerKind.CLOSE, KEYS[0])]
        s.save_meta(JoinMeta(1, 1, {}))
    with RocksJoinState(path) as s:
        assert s.get_window(KEYS[0]) == record(KEYS[0], 1) and s.get_window(KEYS[1]) is None
        assert s.load_meta() is None
        assert [key for key, _, _ in s.windows()] == [KEYS[0]]


def test_closed_rocks_state_refuses_use_naming_its_path(tmp_path: Path):
    s = RocksJoinState(str(tmp_path / "join"))
    s.close()
    s.close()  # twice is fine
    with pytest.raises(RuntimeError, match="join"):
        s.get_window(KEYS[0])


def test_event_join_reopened_on_rocks_resumes_watermark_counters_and_open_windows(tmp_path: Path):
    config = JoinConfig(window_ms=100, allowed_lateness_ms=0, retention_ms=50)
    path = str(tmp_path / "join")
    with RocksJoinState(path) as s:
        join = EventJoin(config, s)
        join.on_impression(ImpressionEvent("r", 1, 1, 0, 0))
        join.on_action(ActionEvent("r", 1, ActionType.CLICK, 1.0, 10))
        join.on_impression(ImpressionEvent("s", 1, 1, 0, 30))
        join.commit()
    with RocksJoinState(path) as s:
        join = EventJoin(config, s)
        assert join.watermark_ms == 30 and join.counters["positives"] == 1
        assert join.on_action(ActionEvent("r", 1, ActionType.CLICK, 1.0, 11)) == []  # still a duplicate
        out = join.on_impression(ImpressionEvent("t", 1, 1, 0, 130))
        assert [s.sample_id for s in out] == ["s:1:v1"]


# ------------------------------------------------------------------------------------- model-based test

_key = st.sampled_from(KEYS)
_time = st.integers(-5, 30)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put_w"), _key, st.integers(0, 5)),
        st.tuples(st.just("del_w"), _key),
        st.tuples(st.just("put_b"), _key, st.integers(0, 3)),
        st.tuples(st.just("add_t"), _time, st.sampled_from("cfo"), _key),
        st.tuples(st.just("rm_t"), _time, st.sampled_from("cfo"), _key),
        st.tuples(st.just("pop"), _time),
        st.sampled_from([("commit",), ("reopen",), ("crash",)]),
    ),
    max_size=40,
)


def _order(t: Timer) -> tuple:
    return (t.at_ms, t.kind, t.key[1], t.key[0].encode())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ops, st.sampled_from([0, 1, 1 << 18]))
def test_rocks_state_behaves_like_a_dict_model_across_commits_crashes_and_reopens(ops, cached):
    model: dict = {"w": {}, "b": {}, "t": set()}
    committed = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as path:
        open_state: Callable[[], RocksJoinState] = lambda: RocksJoinState(path, cached_windows=cached)  # noqa: E731
        s = open_state()
        try:
            for op in ops:
                name = op[0]
                if name == "put_w":
                    model["w"][op[1]] = record(op[1], op[2])
                    s.put_window(op[1], record(op[1], op[2]))
                elif name == "del_w":
                    model["w"].pop(op[1], None)
                    s.delete_window(op[1])
                elif name == "put_b":
                    model["b"][op[1]] = actions(op[1], op[2])
                    s.put_buffer(op[1], actions(op[1], op[2]))
                elif name in ("add_t", "rm_t"):
                    timer = Timer(*op[1:])
                    getattr(model["t"], "add" if name == "add_t" else "discard")(timer)
                    (s.add_timer if name == "add_t" else s.remove_timer)(timer)
                elif name == "pop":
                    due = sorted((t for t in model["t"] if t.at_ms <= op[1]), key=_order)
                    model["t"] -= set(due)
                    assert s.pop_due(op[1]) == due
                elif name == "commit":
                    s.commit()
                    committed = copy.deepcopy(model)
                else:
                    if name == "reopen":
                        s.commit()
                        committed = copy.deepcopy(model)
                    s.close()
                    model = copy.deepcopy(committed)
                    model["t"] = set()  # timers are process memory (EventJoin rebuilds them)
                    s = open_state()
                assert {k: s.get_window(k) for k in KEYS} == {k: model["w"].get(k) for k in KEYS}
                assert {k: s.get_buffer(k) for k in KEYS} == {k: model["b"].get(k, ()) for k in KEYS}
            assert s.pop_due(10**6) == sorted(model["t"], key=_order)
            stored = {key: value for key, value in model["w"].items() if value is not None}
            assert {key: (close, closed) for key, close, closed in s.windows()} == {
                key: (r.close_ms, r.closed) for key, r in stored.items()
            }
            assert dict(s.buffers()) == {key: value for key, value in model["b"].items() if value}
        finally:
            s.close()


def test_event_join_reopened_on_rocks_rebuilds_close_forget_and_orphan_timers(tmp_path: Path):
    config = JoinConfig(window_ms=100, allowed_lateness_ms=0, retention_ms=50, idle_timeout_ms=1)
    path = str(tmp_path / "join")
    with RocksJoinState(path) as s:
        join = EventJoin(config, s)
        join.on_impression(ImpressionEvent("old", 1, 1, 0, 0))  # closes at 100, forgotten at 150
        join.on_action(ActionEvent("early", 2, ActionType.CLICK, 1.0, 60))  # buffered until 160
        join.on_impression(ImpressionEvent("open", 1, 3, 0, 110))  # watermark 110: "old" closed
        join.commit()
    with RocksJoinState(path) as s:
        join = EventJoin(config, s)
        assert join.on_impression(ImpressionEvent("later", 1, 4, 0, 155)) == []  # fires FORGET of "old"
        assert join.counters["forgotten_keys"] == 1
        fired = join.on_impression(ImpressionEvent("last", 1, 5, 0, 215))  # CLOSE "open", ORPHAN "early"
        assert [x.sample_id for x in fired] == ["open:3:v1"]
        assert join.counters["orphan_actions"] == 1


def stored_segments(path: str) -> int:
    db = Rdict(path, Options(raw_mode=True))
    try:
        return sum(1 for key in db.keys() if key.startswith(b"s/"))
    finally:
        db.close()


def test_segments_are_dropped_once_every_window_written_in_them_is_deleted_or_written_again(tmp_path: Path):
    path = str(tmp_path / "join")
    keys = [(f"r{i}", i) for i in range(6)]
    with RocksJoinState(path, cached_windows=0) as s:
        for round_ in range(3):  # one segment per commit
            for key in keys[2 * round_ : 2 * round_ + 2]:
                s.put_window(key, record(key, 1))
            s.commit()
        s.put_window(keys[0], record(keys[0], 2))  # written again: now in the fourth segment
        s.delete_window(keys[1])
        s.delete_window(keys[4])  # the third segment keeps keys[5]: the second and third stay
        s.commit()
    assert stored_segments(path) == 4 - 1
    with RocksJoinState(path, cached_windows=0) as s:
        assert [s.get_window(k) for k in keys] == [
            record(keys[0], 2),
            None,
            *[record(k, 1) for k in keys[2:4]],
            None,
            record(keys[5], 1),
        ]
        for key in keys:
            s.delete_window(key)
        s.commit()
    assert stored_segments(path) == 0
    with RocksJoinState(path) as s:
        assert list(s.windows()) == [] and [s.get_window(k) for k in keys] == [None] * 6


def test_rocks_state_reads_a_window_closed_by_the_committed_watermark_as_closed(tmp_path: Path):
    path = str(tmp_path / "join")
    key = KEYS[0]
    open_record = WindowRecord(ImpressionEvent(key[0], 5, key[1], 1, 10, ()), close_ms=110)
    with RocksJoinState(path, cached_windows=0) as s:
        s.put_window(key, open_record)
        s.save_meta(JoinMeta(watermark_ms=100))
        s.commit()
        s.close_window(key, open_record._replace(version=1, closed=True))
        s.save_meta(JoinMeta(watermark_ms=110))
        s.commit()
    with RocksJoinState(path, cached_windows=0) as s:
        assert s.get_window(key) == open_record._replace(version=1, closed=True)
        assert list(s.windows()) == [(key, 110, True)]
