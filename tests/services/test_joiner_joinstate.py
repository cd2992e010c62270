"""The reference join's state: windows, buffers, timers and meta behave as its contract says."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.joiner.joinstate import (
    ActionEvent,
    ActionType,
    ImpressionEvent,
    JoinMeta,
    JoinState,
    MemoryJoinState,
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


@pytest.fixture
def state() -> Iterator[JoinState]:
    s = MemoryJoinState()
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
