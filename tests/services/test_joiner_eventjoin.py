"""The event-time join: a property test against a reference model, one test per rule, and crash-restore."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freshet.events.v1 import events_pb2
from services.joiner.columnjoin import ColumnJoin
from services.joiner.eventjoin import (
    COUNTERS,
    LATE_POLICIES,
    ActionEvent,
    ActionType,
    EventJoin,
    ImpressionEvent,
    JoinConfig,
    JoinedSample,
    negative_kept,
)
from services.joiner.joinstate import MemoryJoinState

FLUSH_MS = 10**9  # an idle jump that closes and forgets everything


# ---------------------------------------------------------------------------------------------- reference


def reference(config: JoinConfig, ops: list[tuple]) -> tuple[Counter, dict[str, int]]:
    """The samples and counters the rules predict for ops, computed key by key from the whole sequence.

    The only sequential part is the watermark at each arrival (a running maximum, plus idle gaps); each
    key's outcome then follows from its own events in arrival order and those watermarks.
    """
    L = config.allowed_lateness_ms
    wm, per_key = None, defaultdict(list)
    for kind, x in ops:
        if kind == "gap":
            wm = None if wm is None else wm + x
        else:
            per_key[x.key].append((kind, x, wm))
            wm = x.event_time_ms - L if wm is None else max(wm, x.event_time_ms - L)
    samples, counters = Counter(), Counter(dict.fromkeys(COUNTERS, 0))
    for key, events in per_key.items():
        _reference_key(config, key, events, samples, counters)
    return samples, dict(counters)


def _reference_key(config, key, events, samples, counters) -> None:
    W, R, rate = config.window_ms, config.retention_ms, config.negative_rate
    imp, labels, types, version, closed, forgotten, buffer = None, [0.0] * 4, set(), 0, False, False, []

    def emit(weight: float, correction: bool) -> None:
        sid = f"{key[0]}:{key[1]}:v{version}"
        samples[JoinedSample(sid, key, tuple(labels), version, weight, correction, imp)] += 1

    def passed(w, t) -> bool:  # the watermark w has reached t
        return w is not None and w >= t

    def label(a) -> None:
        labels[a.type - 1] = a.value if a.type == ActionType.DWELL else 1.0
        types.add(a.type)

    def joins(a) -> bool:
        if not imp.event_time_ms <= a.event_time_ms < imp.event_time_ms + W:
            counters["out_of_window_actions"] += 1
        elif a.type in types:
            counters["duplicate_actions"] += 1
        else:
            label(a)
            return True
        return False

    def catch_up(w) -> None:
        nonlocal closed, forgotten, version
        if imp is not None and not closed and passed(w, imp.event_time_ms + W):
            closed = True
            if version == 0:
                version = 1
                if negative_kept(key, rate, config.seed):
                    counters["negatives"] += 1
                    emit(1.0 / rate, False)
                else:
                    counters["downsampled_negatives"] += 1
        if closed and not forgotten and passed(w, imp.event_time_ms + W + R):
            forgotten = True
            counters["forgotten_keys"] += 1

    for kind, ev, w in events:
        catch_up(w)
        if kind == "imp":
            counters["impressions"] += 1
            if imp is not None and not forgotten:
                counters["duplicate_impressions"] += 1
            elif passed(w, ev.event_time_ms + W):
                counters["late_impressions"] += 1
            else:
                assert imp is None, "scenarios never reuse a forgotten key"
                imp, joined = ev, False
                for a in buffer:
                    if passed(w, a.event_time_ms + W):
                        counters["orphan_actions"] += 1
                    else:
                        joined |= joins(a)
                buffer = []
                if joined:
                    version = 1
                    counters["positives"] += 1
                    emit(1.0, False)
            continue
        counters["actions"] += 1
        if imp is None or forgotten:
            if passed(w, ev.event_time_ms + W):
                counters["orphan_actions"] += 1
            else:
                counters["buffered_actions"] += 1
                buffer.append(ev)
        elif not closed:
            if joins(ev):
                version += 1
                counters["positives" if version == 1 else "updates"] += 1
                emit(1.0, False)
        elif not imp.event_time_ms <= ev.event_time_ms < imp.event_time_ms + W:
            counters["out_of_window_actions"] += 1
        elif ev.type in types:
            counters["duplicate_actions"] += 1
        else:
            counters["late_actions"] += 1
            if config.late_policy == "correct":
                label(ev)
                version += 1
                counters["corrections"] += 1
                emit(1.0, True)
    catch_up(float("inf"))
    counters["orphan_actions"] += len(buffer)


# ---------------------------------------------------------------------------------------------- scenarios


@st.composite
def scenarios(draw) -> tuple[JoinConfig, list[tuple]]:
    """A config and ops: ("imp", ev), ("act", ev) or ("gap", idle processing ms), in arrival order."""
    config = JoinConfig(
        window_ms=100,
        allowed_lateness_ms=draw(st.sampled_from([0, 20, 80])),
        idle_timeout_ms=1,
        late_policy=draw(st.sampled_from(LATE_POLICIES)),
        negative_rate=draw(st.sampled_from([1.0, 0.5])),
        seed=draw(st.integers(0, 3)),
        retention_ms=draw(st.sampled_from([0, 40, 300])),
    )

    def action(rid: str, item: int, t: int) -> ActionEvent:
        kind = draw(st.sampled_from(ActionType))
        value = float(draw(st.integers(0, 30))) if kind == ActionType.DWELL else 1.0
        return ActionEvent(rid, item, kind, value, t)

    events: list = []
    for i in range(draw(st.integers(0, 8))):
        t, item = draw(st.integers(0, 400)), draw(st.integers(0, 2))
        events.append(ImpressionEvent(f"r{i}", i, item, draw(st.integers(0, 3)), t, (("slot", f"c{i}"),)))
        events += [action(f"r{i}", item, t + draw(st.integers(-20, 130))) for _ in range(draw(st.integers(0, 4)))]
    events += [action(f"x{j}", 0, draw(st.integers(0, 500))) for j in range(draw(st.integers(0, 2)))]
    if events:
        events += [events[i] for i in draw(st.lists(st.integers(0, len(events) - 1), max_size=4))]
    # Arrival = event time + jitter: mostly small reorderings, some far beyond the allowed lateness.
    jitter = st.one_of(st.integers(-10, 10), st.integers(-150, 150), st.integers(100, 400))
    shift = [draw(jitter) for _ in events]
    order = sorted(range(len(events)), key=lambda i: (events[i].event_time_ms + shift[i], i))
    ops = [("imp" if isinstance(events[i], ImpressionEvent) else "act", events[i]) for i in order]
    for pos, gap in sorted(draw(st.lists(st.tuples(st.integers(0, len(ops)), st.integers(1, 200)), max_size=2))):
        ops.insert(pos, ("gap", gap))
    return config, ops


# How a driver hands events to the join: one call per event, or ``on_events`` with chunks of this size.
PER_EVENT = 0
CHUNKS = st.one_of(st.just(PER_EVENT), st.integers(1, 4), st.just(10**6))


class Driver:
    """Feeds ops to a join with a processing clock that moves only in gaps.

    ``chunk``: ``PER_EVENT`` calls ``on_impression`` / ``on_action``; n > 0 passes the events between
    two gaps to ``on_events`` n at a time. ``commit``: commit after every call, as the service commits
    after every fetched batch (windows then close in a later commit than the one that stored them open).
    """

    def __init__(self, join: EventJoin, clock_ms: int = 0, chunk: int = PER_EVENT, commit: bool = False) -> None:
        self.join, self.clock_ms, self.chunk, self.commit = join, clock_ms, chunk, commit

    def feed(self, ops: list[tuple]) -> list[JoinedSample]:
        out: list[JoinedSample] = []
        events: list = []
        for kind, x in ops:
            if kind == "gap":
                out += self._events(events)
                events = []
                out += self.join.advance(self.clock_ms)
                self.clock_ms += x
                out += self.join.advance(self.clock_ms)
                self._commit()
            elif self.chunk == PER_EVENT:
                out += self.join.on_impression(x) if kind == "imp" else self.join.on_action(x)
                self._commit()
            else:
                events.append(x)
        return out + self._events(events)

    def _events(self, events: list) -> list[JoinedSample]:
        out: list[JoinedSample] = []
        for i in range(0, len(events), self.chunk or 1):
            out += self.join.on_events(events[i : i + self.chunk])
            self._commit()
        return out

    def _commit(self) -> None:
        if self.commit:
            self.join.commit()

    def flush(self) -> list[JoinedSample]:
        return self.feed([("gap", FLUSH_MS)])


def run_uninterrupted(
    config: JoinConfig, ops: list[tuple], chunk: int = PER_EVENT
) -> tuple[list[JoinedSample], EventJoin]:
    driver = Driver(EventJoin(config, MemoryJoinState()), chunk=chunk)
    return driver.feed(ops) + driver.flush(), driver.join


# ---------------------------------------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None)
@given(scenarios(), CHUNKS)
def test_join_in_memory_emits_exactly_the_reference_samples_and_counters(scenario, chunk):
    config, ops = scenario
    out, join = run_uninterrupted(config, ops, chunk)
    expected, counters = reference(config, ops)
    assert Counter(out) == expected
    assert join.counters == counters


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(1, 5))
def test_on_events_gives_the_samples_counters_and_state_of_one_call_per_event(scenario, chunk):
    config, ops = scenario
    runs = []
    for size in (PER_EVENT, chunk):
        driver = Driver(EventJoin(config, MemoryJoinState()), chunk=size)
        out = driver.feed(ops)
        windows = sorted(driver.join.state.windows())
        out += driver.flush()
        runs.append((out, driver.join.counters, driver.join.watermark_ms, windows))
    assert runs[0] == runs[1]  # the same samples in the same order, not only the same multiset


# ---------------------------------------------------------------------------------------------- rules


def imp(rid: str = "r", item: int = 1, t: int = 0) -> ImpressionEvent:
    return ImpressionEvent(rid, user_id=7, item_id=item, position=2, event_time_ms=t, context=(("dev", "ios"),))


def act(rid: str = "r", item: int = 1, t: int = 0, kind: ActionType = ActionType.CLICK, value: float = 1.0):
    return ActionEvent(rid, item, kind, value, t)


class CompiledTuples(ColumnJoin):
    """The compiled join, its ``advance`` giving the reference's tuples as ``EventJoin.advance`` does."""

    def advance(self, now_processing_ms: int, input_drained: bool = True) -> list[JoinedSample]:
        return super().advance(now_processing_ms, input_drained).samples()


JOINS = {"reference": lambda config: EventJoin(config, MemoryJoinState()), "compiled": CompiledTuples}
_join_kind = ["reference"]


def pytest_generate_tests(metafunc):
    """Every test that calls ``make`` runs on the reference join and on the compiled one the joiner runs."""
    if _calls_make(metafunc.function.__code__):
        metafunc.fixturenames.append("join_kind")
        metafunc.parametrize("join_kind", sorted(JOINS), indirect=True)


def _calls_make(code) -> bool:
    nested = (c for c in code.co_consts if hasattr(c, "co_names"))
    return "make" in code.co_names or any(_calls_make(c) for c in nested)


@pytest.fixture
def join_kind(request):
    _join_kind[0] = request.param
    yield request.param
    _join_kind[0] = "reference"


def make(**overrides) -> EventJoin | ColumnJoin:
    settings_ = dict(window_ms=100, allowed_lateness_ms=10, idle_timeout_ms=50, retention_ms=200) | overrides
    return JOINS[_join_kind[0]](JoinConfig(**settings_))


_clock_keys = itertools.count()


def close_all(join: EventJoin, at_ms: int) -> list[JoinedSample]:
    """Push the watermark to at_ms with an impression of a fresh key; returns the other keys' samples."""
    out = join.on_impression(imp(f"clock{next(_clock_keys)}", 0, at_ms + join.config.allowed_lateness_ms))
    return [s for s in out if not s.key[0].startswith("clock")]


def test_action_on_open_impression_emits_positive_version_1_at_once():
    join = make()
    assert join.on_impression(imp(t=0)) == []
    assert join.on_action(act(t=5)) == [
        JoinedSample("r:1:v1", ("r", 1), (1.0, 0.0, 0.0, 0.0), 1, 1.0, False, imp(t=0))
    ]
    assert close_all(join, 1000) == []  # a window with an action ends without a negative


def test_window_becomes_negative_only_when_watermark_reaches_its_close():
    join = make()
    join.on_impression(imp(t=0))
    assert join.on_impression(imp("a", t=109)) == []  # watermark 99 < close 100
    out = join.on_impression(imp("b", t=110))  # watermark 100
    assert [(s.sample_id, s.label_vector, s.weight) for s in out] == [("r:1:v1", (0.0,) * 4, 1.0)]


def test_new_action_type_emits_update_with_full_label_vector_and_next_version():
    join = make()
    join.on_impression(imp(t=0))
    out = join.on_action(act(t=1)) + join.on_action(act(t=2, kind=ActionType.DWELL, value=12.5))
    out += join.on_action(act(t=3, kind=ActionType.LIKE))
    assert [(s.sample_id, s.label_vector) for s in out] == [
        ("r:1:v1", (1.0, 0.0, 0.0, 0.0)),
        ("r:1:v2", (1.0, 0.0, 0.0, 12.5)),
        ("r:1:v3", (1.0, 1.0, 0.0, 12.5)),
    ]
    assert (join.counters["positives"], join.counters["updates"]) == (1, 2)


def test_repeated_action_type_is_ignored_and_counted_duplicate():
    join = make()
    join.on_impression(imp(t=0))
    join.on_action(act(t=1))
    assert join.on_action(act(t=2)) == []
    assert join.counters["duplicate_actions"] == 1


def test_actions_before_impression_combine_into_one_version_1_sample():
    join = make()
    assert join.on_action(act(t=10)) + join.on_action(act(t=12, kind=ActionType.SHARE)) == []
    out = join.on_impression(imp(t=0))
    assert [(s.sample_id, s.label_vector) for s in out] == [("r:1:v1", (1.0, 0.0, 1.0, 0.0))]
    assert [s.sample_id for s in join.on_action(act(t=20, kind=ActionType.LIKE))] == ["r:1:v2"]
    close_all(join, 10_000)
    assert join.counters["orphan_actions"] == 0  # the buffered actions went into the window


def test_buffered_action_is_orphaned_once_no_window_can_take_it():
    join = make()
    join.on_action(act(t=10))
    close_all(join, 109)
    assert join.counters["orphan_actions"] == 0
    close_all(join, 110)  # any window holding t=10 closes by 110
    assert join.counters["orphan_actions"] == 1
    assert join.on_impression(imp(t=0)) == [] and join.counters["late_impressions"] == 1


def test_action_whose_every_window_has_closed_is_orphaned_on_arrival():
    join = make()
    close_all(join, 109)
    join.on_action(act("early", t=10))  # a window [10, 110) could still be open: buffered
    close_all(join, 110)
    assert join.on_action(act(t=10)) == []
    assert (join.counters["orphan_actions"], join.counters["buffered_actions"]) == (2, 1)


def test_duplicate_impression_is_ignored_and_counted_while_open_and_after_close():
    join = make()
    join.on_impression(imp(t=0))
    assert join.on_impression(imp(t=0)) == []
    close_all(join, 150)
    assert join.on_impression(imp(t=0)) == []
    assert join.counters["duplicate_impressions"] == 2 and join.counters["negatives"] == 1


def test_late_action_is_counted_and_dropped_under_drop_policy():
    join = make(late_policy="drop")
    join.on_impression(imp(t=0))
    close_all(join, 100)
    assert join.on_action(act(t=50)) == []
    assert join.counters["late_actions"] == 1


def test_late_action_emits_correction_with_next_version_under_correct_policy():
    join = make(late_policy="correct")
    join.on_impression(imp(t=0))
    join.on_action(act(t=5))
    close_all(join, 100)
    out = join.on_action(act(t=50, kind=ActionType.LIKE))
    assert [(s.sample_id, s.label_vector, s.version, s.correction) for s in out] == [
        ("r:1:v2", (1.0, 1.0, 0.0, 0.0), 2, True)
    ]
    assert join.on_action(act(t=50, kind=ActionType.LIKE)) == []  # a replay of it is a duplicate
    assert (join.counters["late_actions"], join.counters["duplicate_actions"]) == (1, 1)


def test_late_action_on_a_negative_corrects_it_with_version_2():
    join = make(late_policy="correct")
    join.on_impression(imp(t=0))
    assert [s.sample_id for s in close_all(join, 100)] == ["r:1:v1"]
    out = join.on_action(act(t=99))
    assert [(s.sample_id, s.label_vector, s.correction) for s in out] == [("r:1:v2", (1.0, 0, 0, 0), True)]


def test_closed_key_is_forgotten_once_watermark_passes_close_plus_retention():
    join = make(late_policy="correct", retention_ms=200)
    join.on_impression(imp(t=0))
    close_all(join, 299)
    assert join.counters["forgotten_keys"] == 0
    close_all(join, 300)
    assert join.counters["forgotten_keys"] == 1
    assert join.on_impression(imp(t=0)) == [] and join.counters["late_impressions"] == 1
    assert join.on_action(act(t=50)) == [] and join.counters["orphan_actions"] == 1


def test_action_outside_the_impressions_event_time_window_does_not_join():
    join = make()
    join.on_impression(imp(t=50))
    assert join.on_action(act(t=49)) + join.on_action(act(t=150)) == []
    assert join.counters["out_of_window_actions"] == 2
    assert [s.label_vector for s in close_all(join, 150)] == [(0.0,) * 4]


def test_impression_arriving_after_its_window_closed_is_dropped_as_late():
    join = make()
    close_all(join, 100)
    assert join.on_impression(imp(t=0)) == [] and join.counters["late_impressions"] == 1
    assert close_all(join, 10_000) == []


def test_negative_downsampling_keeps_about_rate_deterministically_with_inverse_weight():
    def negatives(seed: int) -> list[JoinedSample]:
        join = make(negative_rate=0.25, seed=seed)
        for i in range(2000):
            join.on_impression(imp(f"q{i}", i, 0))
        out = close_all(join, 100)
        assert join.counters["negatives"] + join.counters["downsampled_negatives"] == 2000
        return out

    kept = negatives(seed=1)
    assert 400 < len(kept) < 600 and {s.weight for s in kept} == {4.0}
    assert kept == negatives(seed=1) and kept != negatives(seed=2)
    assert all(negative_kept(s.key, 0.25, 1) for s in kept)


def test_positive_ignores_negative_rate_and_weighs_one():
    join = make(negative_rate=0.1)
    join.on_impression(imp(t=0))
    assert [s.weight for s in join.on_action(act(t=1))] == [1.0]


def test_idle_partition_advances_watermark_by_elapsed_processing_time():
    join = make(idle_timeout_ms=50)  # watermark -10 after the impression at t=0
    join.on_impression(imp(t=0))
    assert join.advance(1000) == []  # the impression counts as arriving now
    assert join.advance(1040) == [] and join.watermark_ms == -10  # not idle yet
    assert join.advance(1060) == [] and join.watermark_ms == 50  # idle: 60 ms elapsed since the arrival
    assert [s.sample_id for s in join.advance(1120)] == ["r:1:v1"] and join.watermark_ms == 110


def test_a_reader_behind_its_input_does_not_make_the_partition_idle():
    join = make(idle_timeout_ms=50)
    join.on_impression(imp(t=0))
    join.advance(1000)
    assert join.advance(2000, input_drained=False) == [] and join.watermark_ms == -10  # events wait unread
    assert join.advance(2040) == [] and join.watermark_ms == -10  # idle counts from the last undrained tick
    assert join.advance(2060) == [] and join.watermark_ms == 50


def test_watermark_follows_event_time_while_events_keep_arriving():
    join = make(idle_timeout_ms=50)
    for step in range(10):
        join.on_impression(imp(f"q{step}", 0, step))
        join.advance(1000 * step)
    assert join.watermark_ms == 9 - 10


def test_windows_fire_in_event_time_order_of_their_close():
    join = make()
    for rid, t in [("c", 30), ("a", 10), ("d", 30), ("b", 20)]:
        join.on_impression(imp(rid, 1, t))
    assert [s.sample_id for s in close_all(join, 1000)] == ["a:1:v1", "b:1:v1", "c:1:v1", "d:1:v1"]


def test_same_calls_give_same_outputs_and_counters():
    def once() -> tuple[list[JoinedSample], dict[str, int]]:
        join = make(negative_rate=0.5, late_policy="correct")
        out = []
        for i in range(50):
            out += join.on_impression(imp(f"q{i}", i % 3, i * 7))
            if i % 3 == 0:
                out += join.on_action(act(f"q{i // 2}", (i // 2) % 3, i * 7, ActionType(1 + i % 4), float(i)))
        return out + close_all(join, 10_000), join.counters

    assert once() == once()


def test_events_convert_from_protobufs():
    msg = events_pb2.Impression(request_id="r", user_id=3, item_id=4, position=1, event_time_ms=9)
    msg.context["b"], msg.context["a"] = "2", "1"
    assert ImpressionEvent.from_proto(msg) == ImpressionEvent("r", 3, 4, 1, 9, (("a", "1"), ("b", "2")))
    action = events_pb2.Action(request_id="r", item_id=4, type=events_pb2.ACTION_TYPE_DWELL, value=2.5)
    assert ActionEvent.from_proto(action) == ActionEvent("r", 4, ActionType.DWELL, 2.5, 0)


def test_action_with_unspecified_type_is_rejected_at_conversion():
    with pytest.raises(ValueError, match="action type 0"):
        ActionEvent.from_proto(events_pb2.Action(request_id="r", item_id=1))


@pytest.mark.parametrize(
    "field, value",
    [
        ("window_ms", 0),
        ("allowed_lateness_ms", -1),
        ("idle_timeout_ms", 0),
        ("late_policy", "keep"),
        ("negative_rate", 0.0),
        ("negative_rate", 1.5),
        ("retention_ms", -1),
    ],
)
def test_join_config_rejects_invalid_setting_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        JoinConfig(**{field: value})
