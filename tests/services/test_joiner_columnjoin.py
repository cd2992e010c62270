"""ColumnJoin, the compiled join: the same samples and counters as the reference rules, in memory and on
RocksDB, across clean restarts and crashes (the property tests of ``test_joiner_eventjoin`` on it)."""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rocksdict import Options, Rdict

from freshet.eventcolumns import decode_event_columns, encode_event_columns
from freshet.events.v1 import events_pb2
from services.joiner import joinkernel as K
from services.joiner.columnjoin import ColumnJoin
from services.joiner.config import JoinerConfig
from services.joiner.eventjoin import ActionEvent, ActionType, EventJoin, ImpressionEvent, JoinConfig, JoinedSample
from services.joiner.joinstate import MemoryJoinState
from services.joiner.service import PartitionJoin
from tests.services.test_joiner_eventjoin import (
    CHUNKS,
    PER_EVENT,
    CompiledTuples,
    Driver,
    reference,
    run_uninterrupted,
    scenarios,
)


def run_columns(config, ops, chunk=PER_EVENT, path=None) -> tuple[list[JoinedSample], CompiledTuples]:
    driver = Driver(CompiledTuples(config, path), chunk=chunk, commit=path is not None)
    return driver.feed(ops) + driver.flush(), driver.join


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), CHUNKS)
def test_column_join_emits_exactly_the_reference_samples_and_counters(scenario, chunk):
    config, ops = scenario
    out, join = run_columns(config, ops, chunk)
    expected, counters = reference(config, ops)
    assert Counter(out) == expected
    assert join.counters == counters
    assert join.live_keys == 0 and join._rids == {}  # every key forgotten after the flush: nothing leaks


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_column_join_on_rocksdb_with_a_clean_restart_emits_exactly_the_reference_samples(scenario, data):
    config, ops = scenario
    cut = data.draw(st.integers(0, len(ops)))
    chunk = data.draw(CHUNKS)
    with tempfile.TemporaryDirectory() as path:
        with CompiledTuples(config, path) as join:
            driver = Driver(join, chunk=chunk, commit=True)
            out = driver.feed(ops[:cut])
            join.commit()
        with CompiledTuples(config, path) as join:
            driver = Driver(join, driver.clock_ms, chunk, commit=True)
            out += driver.feed(ops[cut:]) + driver.flush()
    expected, counters = reference(config, ops)
    assert Counter(out) == expected
    assert driver.join.counters == counters


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_column_join_crash_after_commit_and_replay_gives_the_samples_of_an_uninterrupted_run(scenario, data):
    config, ops = scenario
    committed = data.draw(st.integers(0, len(ops)))
    crashed = data.draw(st.integers(committed, len(ops)))
    handled = [op for op in ops[:committed] if op[0] != "gap"]
    redelivered = data.draw(st.lists(st.sampled_from(handled), max_size=5)) if handled else []
    expected, _ = run_uninterrupted(config, ops)
    chunk = data.draw(CHUNKS)
    with tempfile.TemporaryDirectory() as path:
        with CompiledTuples(config, path) as join:
            driver = Driver(join, chunk=chunk, commit=True)
            before = driver.feed(ops[:committed])
            join.commit()
            driver.commit = False
            lost = driver.feed(ops[committed:crashed])
        with CompiledTuples(config, path) as join:
            driver = Driver(join, driver.clock_ms, chunk)
            assert driver.feed(redelivered) == []
            after = driver.feed(ops[committed:]) + driver.flush()
    assert Counter(before + after) == Counter(expected)
    assert set(lost) <= set(expected)


def test_a_reopened_state_of_many_keys_holds_every_window_buffer_and_outbox_entry(tmp_path):
    config = JoinConfig(window_ms=100, allowed_lateness_ms=0, retention_ms=50)
    path = str(tmp_path / "state")
    with ColumnJoin(config, path) as join:
        join.on_events([ImpressionEvent(f"q{i}", i, i % 7, 1, 0, (("d", str(i % 3)),)) for i in range(3000)])
        join.on_events([ActionEvent(f"q{i}", i % 7, ActionType.CLICK, 1.0, 5) for i in range(0, 3000, 2)])
        join.on_events([ActionEvent("early", 1, ActionType.LIKE, 1.0, 60)])  # buffered: no impression yet
        seq = join.stage_output(b"out")
        join.commit()
        windows = sorted(join.windows())
    with ColumnJoin(config, path) as join:
        assert sorted(join.windows()) == windows and len(windows) == 3000
        assert join.pending_outputs() == [(seq, b"out")]
        late = join.on_events([ImpressionEvent("early", 2, 1, 0, 50)])  # takes the buffered like
        assert [(s.sample_id, s.label_vector) for s in late] == [("early:1:v1", (0.0, 1.0, 0.0, 0.0))]
        out = join.on_events([ImpressionEvent("clock", 0, 0, 0, 1000)])  # watermark 1000: all close
    negatives = [s for s in out if s.sample_id != "early:1:v1"]
    assert sorted(s.sample_id for s in negatives) == sorted(f"q{i}:{i % 7}:v1" for i in range(1, 3000, 2))
    assert {s.impression.context for s in negatives} == {(("d", "0"),), (("d", "1"),), (("d", "2"),)}


def test_the_key_table_finds_every_live_key_through_inserts_and_deletions():
    """Many keys of few requests in a small table: long probe runs, deletions shifting entries back."""
    rng = np.random.default_rng(5)
    size, slots = 64, 40
    ht = np.full(size, K.EMPTY, np.int64)
    s_rid, s_item, state = np.zeros(slots, np.int64), np.zeros(slots, np.int64), np.zeros(slots, np.int64)
    fs, refs, sc = (
        np.arange(slots - 1, -1, -1, dtype=np.int64),
        np.zeros(4, np.int64),
        np.zeros(K.SCALARS, np.int64),
    )
    sc[K.S_FREE] = slots
    live: dict[tuple[int, int], int] = {}
    for _ in range(3000):
        key = (int(rng.integers(0, 3)), int(rng.integers(0, 30)))
        if key in live and rng.random() < 0.5:
            slot = live.pop(key)
            K._remove(ht, s_rid, s_item, slot)
            state[slot] = K.FREE
            fs[sc[K.S_FREE]] = slot
            sc[K.S_FREE] += 1
        elif len(live) < slots:
            slot = K.find_or_add(ht, s_rid, s_item, fs, refs, sc, *key)
            assert live.setdefault(key, slot) == slot
            state[slot] = K.OPEN
        free = sc[K.S_FREE]
        for (rid, item), slot in live.items():  # every live key is found where it is, nothing allocated
            assert K.find_or_add(ht, s_rid, s_item, fs, refs, sc, rid, item) == slot
        assert sc[K.S_FREE] == free and int((ht != K.EMPTY).sum()) == len(live)
    rebuilt = np.full(size, K.EMPTY, np.int64)
    K.rehash(rebuilt, state, s_rid, s_item)
    assert sorted(rebuilt[rebuilt != K.EMPTY].tolist()) == sorted(live.values())


def test_a_long_stream_with_keys_forgotten_and_slots_reused_matches_the_reference():
    """Thousands of keys through a join that starts with 8 slots: slots, table and heap grow, forgotten
    keys free slots and request numbers for reuse, and every call gives the reference's samples."""
    rng = np.random.default_rng(11)
    config = JoinConfig(window_ms=50, allowed_lateness_ms=5, retention_ms=30, late_policy="correct")
    compiled = ColumnJoin(config, initial_keys=8)
    reference_join = EventJoin(config, MemoryJoinState())
    for step in range(60):
        events = []
        for r in range(int(rng.integers(1, 40))):
            request, t = f"s{step}-{r}", step * 20 + int(rng.integers(0, 20))
            for item in range(int(rng.integers(1, 4))):
                if rng.random() < 0.8:
                    events.append(ImpressionEvent(request, r, item, item, t, (("c", str(item % 2)),)))
                if rng.random() < 0.4:
                    kind = ActionType(int(rng.integers(1, 5)))
                    events.append(
                        ActionEvent(request, item, kind, float(rng.integers(1, 9)), t + int(rng.integers(-5, 60)))
                    )
        rng.shuffle(events)
        assert Counter(compiled.on_events(events)) == Counter(reference_join.on_events(events))
        assert compiled.counters == reference_join.counters
    flush = [ImpressionEvent("flush", 0, 0, 0, 10**6)]
    assert Counter(compiled.on_events(flush)) == Counter(reference_join.on_events(flush))
    assert compiled.live_keys == 1 and list(compiled._rids) == ["flush"]


def test_a_state_dir_of_the_joiner_before_the_compiled_join_is_refused_naming_it(tmp_path):
    path = str(tmp_path / "old")
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    old = Rdict(path, opts)
    old[b"s/" + bytes(8)] = b"a segment of the per-window layout"
    old.close()
    with pytest.raises(RuntimeError, match=f"{path} holds join state in an older layout"):
        ColumnJoin(JoinConfig(), path)


class FailingWrites:
    """The real RocksDB, whose next ``write`` fails once, as RocksDB does on a full disk or an I/O error."""

    def __init__(self, db) -> None:
        self.db, self.fail = db, True

    def write(self, batch, opts) -> None:
        if self.fail:
            self.fail = False
            raise OSError("IO error: No space left on device")
        self.db.write(batch, opts)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_a_failed_commit_loses_nothing_the_next_commit_writes(tmp_path):
    config = JoinConfig(window_ms=100, allowed_lateness_ms=0, retention_ms=1000)
    path = str(tmp_path / "state")
    with ColumnJoin(config, path) as join:
        join.on_events([ImpressionEvent("a", 1, 1, 0, 0, (("c", "x"),))])
        join.commit()
        join.on_events([ActionEvent("a", 1, ActionType.CLICK, 1.0, 10)])
        join.on_events([ImpressionEvent("b", 1, 1, 0, 20, (("c", "y"),))])  # a new key with a new context
        seq = join.stage_output(b"out")
        join._db = FailingWrites(join._db)
        with pytest.raises(OSError, match="No space left"):
            join.commit()
        join.commit()
        windows = sorted(join.windows())
    with ColumnJoin(config, path) as join:
        assert sorted(join.windows()) == windows and len(windows) == 2
        assert join.pending_outputs() == [(seq, b"out")]
        assert join.on_events([ActionEvent("a", 1, ActionType.CLICK, 1.0, 10)]) == []  # a duplicate
        assert join.counters["duplicate_actions"] == 1
        out = join.on_events([ImpressionEvent("clock", 0, 0, 0, 1000)])
    assert {s.sample_id: s.impression.context for s in out} == {"b:1:v1": (("c", "y"),)}


def test_warm_loads_the_kernels_the_joiner_runs_on_decoded_columns():
    """Decoded columns are read-only views: joined as they are, numba would compile a second kernel in the
    first join step, which ``warm`` exists to avoid."""
    ColumnJoin.warm()
    before = len(K.join_events.signatures)
    part = PartitionJoin(0, JoinerConfig())
    imp = events_pb2.Impression(request_id="r", user_id=1, item_id=2, position=0, event_time_ms=5)
    part.join_events(decode_event_columns(encode_event_columns([imp])))
    assert len(K.join_events.signatures) == before


def test_segment_numbers_past_int32_commit_and_reopen(tmp_path):
    path = str(tmp_path / "state")
    with ColumnJoin(JoinConfig(window_ms=100, allowed_lateness_ms=0), path) as join:
        join._head = join._next_segment = 2**31 - 1  # as after 2**31 commits (~250 days at 100 a second)
        join.on_events([ImpressionEvent("a", 1, 1, 0, 0)])
        join.commit()
        join.on_events([ImpressionEvent("b", 1, 1, 0, 10)])
        join.commit()
    with ColumnJoin(JoinConfig(window_ms=100, allowed_lateness_ms=0), path) as join:
        assert len(join.windows()) == 2


def test_negatives_of_windows_open_across_a_restart_follow_the_rate_in_force_when_they_close(tmp_path):
    """The reference decides a negative's down-sampling when its window closes, with the settings then."""
    before = JoinConfig(window_ms=100, allowed_lateness_ms=0, negative_rate=0.5)
    impressions = [ImpressionEvent(f"q{i}", 1, 1, 0, 0) for i in range(40)]
    clock = [ImpressionEvent("clock", 1, 1, 0, 1000)]
    for after in (JoinConfig(window_ms=100, allowed_lateness_ms=0), replace(before, negative_rate=0.3, seed=4)):
        state = MemoryJoinState()
        EventJoin(before, state).on_events(impressions)
        expected = EventJoin(after, state).on_events(clock)
        path = str(tmp_path / f"state-{after.negative_rate}")
        with ColumnJoin(before, path) as join:
            join.on_events(impressions)
            join.commit()
        with ColumnJoin(after, path) as join:
            assert Counter(join.on_events(clock)) == Counter(expected) and expected


def test_activity_noted_restarts_the_idle_clock_without_moving_the_watermark():
    join = ColumnJoin(JoinConfig(window_ms=100, allowed_lateness_ms=0, idle_timeout_ms=50))
    join.on_events([ImpressionEvent("r", 1, 1, 0, 0)])
    join.advance(1000)
    join.note_activity(2000)  # e.g. a join step held up by delivery back-pressure since 1000
    assert len(join.advance(2040)) == 0 and join.watermark_ms == 0  # not idle: 40 ms since the activity
    assert [s.sample_id for s in join.advance(2150).samples()] == ["r:1:v1"] and join.watermark_ms == 150


def test_the_joiner_syncs_its_state_log_on_commit_when_configured(tmp_path):
    unsynced = PartitionJoin(0, JoinerConfig(state_dir=str(tmp_path / "a"))).join
    assert not unsynced._write_opts.sync
    unsynced.close()
    synced = PartitionJoin(0, JoinerConfig(state_dir=str(tmp_path / "b"), sync_writes=True)).join
    assert synced._write_opts.sync
    synced.on_events([ImpressionEvent("r", 1, 1, 0, 0)])
    synced.commit()  # a synced write works
    synced.close()
    with ColumnJoin(JoinConfig(), str(tmp_path / "b" / "p0")) as reopened:
        assert len(reopened.windows()) == 1
