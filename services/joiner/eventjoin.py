"""The event-time join of impressions and actions: the reference semantics of freshet's joiner.

``EventJoin`` is a pure, deterministic state machine over a ``JoinState`` store (in memory or RocksDB):
the same sequence of calls gives the same outputs, on either store. It does no I/O of its own.

Keys and windows
    Impressions and actions join on ``key = (request_id, item_id)``. An accepted impression at event time
    ``T`` opens the window ``[T, T + W)`` (``W = window_ms``); it CLOSES once the watermark reaches
    ``close = T + W``. An action joins only if its own event time lies inside the window; any other action
    on the key is counted ``out_of_window_actions`` and otherwise ignored.

Watermark
    ``watermark = max event time seen - allowed_lateness_ms``, never decreasing. Every call first handles
    its event against the watermark as it was BEFORE the event (so an event never makes itself late), then
    raises the watermark with the event's time, then fires every timer now due (see below) and returns the
    event's samples followed by the fired ones. State is therefore always consistent with the watermark.
    Idle partitions: the caller calls ``advance(now_processing_ms)`` regularly. An event counts as having
    arrived at the processing time of the next ``advance`` call. Once no event arrived for
    ``idle_timeout_ms`` of processing time, the watermark advances by the processing time elapsed since the
    last arrival and then keeps pace with processing time until events resume, so windows still close when
    traffic stops. Processing time is not persisted: after a restart the first ``advance`` counts as an
    arrival (a restarted joiner first catches up on its backlog instead of closing windows at once). A caller
    whose input still holds unread events says so (``advance(now, input_drained=False)``), which also counts
    as an arrival: a reader that falls behind does not make its partition idle.

Labels and versions
    The label vector is ``[click, like, share, dwell_seconds]``: 1.0 in the slot of a CLICK, LIKE or SHARE,
    the action's value for DWELL. The first joined action emits version 1 at once (never held until the
    window ends); each later action of a NEW type while the window is open emits version 2, 3, ... with the
    full vector so far. An action of a type already joined is a duplicate (``duplicate_actions``).
    Sample ids are ``"<request_id>:<item_id>:v<version>"``; positives have weight 1.

Actions before their impression
    An action with no known key is buffered if some window could still take it, i.e. if
    ``event_time + W > watermark`` (a window containing it closes no later than that); otherwise it is
    counted ``orphan_actions`` at once. When the impression arrives, its buffered actions are applied in
    arrival order exactly as if they arrived then (out-of-window and duplicate ones counted as such), and
    all the types they join produce ONE version-1 sample. A buffered action still waiting when the
    watermark reaches ``event_time + W`` is counted ``orphan_actions`` and dropped.

Negatives and down-sampling
    A window that closes with no joined action emits a negative: version 1, all-zero vector. It is kept
    with probability ``negative_rate`` decided by ``negative_kept`` (a hash of the key and ``seed``, so a
    replay decides the same), with weight ``1 / negative_rate``; a dropped one counts
    ``downsampled_negatives`` and still takes version 1.

Duplicates, late events, retention
    An impression whose key is known (open or closed) is a duplicate (``duplicate_impressions``); one whose
    window has already closed on arrival (``T + W <= watermark``) while its key is unknown is dropped as
    ``late_impressions``. An in-window action of a new type on a CLOSED window is ``late_actions``; with
    ``late_policy="correct"`` it also emits a correction (next version, full updated vector,
    ``correction=True``) and is remembered, so a replay of it is a duplicate; with ``"drop"`` nothing else.
    A closed key is remembered until the watermark reaches ``close + retention_ms``; then it is forgotten
    (``forgotten_keys``): later actions on it count as orphans, a repeated impression as late. Keys are
    assumed unique per request: a key reused after being forgotten would open a new window.

Crash safety
    Call ``commit()`` after the outputs of the calls since the previous commit are published; it persists
    state and counters atomically. After a crash, reopen the store and replay the inputs not acknowledged
    before the last commit: the samples regenerate with the same ids, and replays of inputs handled before
    the commit produce no new sample (they are duplicates, late or orphans by the rules above).
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from services.joiner.joinstate import (
    ActionEvent,
    ActionType,
    ImpressionEvent,
    JoinMeta,
    JoinState,
    Key,
    Timer,
    TimerKind,
    WindowRecord,
)

__all__ = [
    "COUNTERS",
    "ActionEvent",
    "ActionType",
    "EventJoin",
    "ImpressionEvent",
    "JoinConfig",
    "JoinedSample",
    "negative_kept",
]

COUNTERS = (
    "impressions",
    "actions",
    "positives",  # version-1 samples from actions
    "updates",  # later versions while the window is open
    "corrections",  # later versions after it closed (late_policy="correct")
    "negatives",  # negatives emitted (kept by down-sampling)
    "downsampled_negatives",
    "duplicate_impressions",
    "late_impressions",
    "duplicate_actions",
    "out_of_window_actions",
    "late_actions",
    "buffered_actions",
    "orphan_actions",
    "forgotten_keys",
)
LATE_POLICIES = ("drop", "correct")


@dataclass(frozen=True)
class JoinConfig:
    """Settings of the event-time join (all times in milliseconds).

    Attributes:
        window_ms: length of the window that starts at the impression's event time.
        allowed_lateness_ms: how far behind the latest event time the watermark stays.
        idle_timeout_ms: processing time without events after which the watermark follows processing time.
        late_policy: "drop" late actions, or "correct": emit a correction sample for them.
        negative_rate: probability in (0, 1] of keeping a negative; kept ones weigh 1 / negative_rate.
        seed: seed of the down-sampling hash.
        retention_ms: how long after its close (in watermark time) a closed key is remembered.
    """

    window_ms: int = 5_000
    allowed_lateness_ms: int = 2_000
    idle_timeout_ms: int = 1_000
    late_policy: str = "drop"
    negative_rate: float = 1.0
    seed: int = 0
    retention_ms: int = 15_000

    def __post_init__(self) -> None:
        if self.window_ms <= 0:
            raise ValueError(f"window_ms must be positive, got {self.window_ms}")
        for name in ("allowed_lateness_ms", "retention_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.idle_timeout_ms <= 0:
            raise ValueError(f"idle_timeout_ms must be positive, got {self.idle_timeout_ms}")
        if self.late_policy not in LATE_POLICIES:
            raise ValueError(f"late_policy must be one of {LATE_POLICIES}, got {self.late_policy!r}")
        if not 0.0 < self.negative_rate <= 1.0:
            raise ValueError(f"negative_rate must be in (0, 1], got {self.negative_rate}")


class JoinedSample(NamedTuple):
    """One labelled impression; a later version of the same key supersedes the earlier ones.

    Attributes:
        sample_id: ``"<request_id>:<item_id>:v<version>"``, stable across replays.
        key: (request_id, item_id).
        label_vector: [click, like, share, dwell_seconds].
        version: 1 for the first sample of the key, then 2, 3, ...
        weight: 1 for positives, 1 / negative_rate for negatives.
        correction: emitted for an action that arrived after the window closed.
        impression: the joined impression.
    """

    sample_id: str
    key: Key
    label_vector: tuple[float, float, float, float]
    version: int
    weight: float
    correction: bool
    impression: ImpressionEvent


def negative_kept(key: Key, rate: float, seed: int) -> bool:
    """Whether the negative of key survives down-sampling at rate: the same answer in every process."""
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(f"{seed}\x00{key[0]}\x00{key[1]}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < rate


def _with_action(record: WindowRecord, action: ActionEvent) -> WindowRecord:
    labels = list(record.labels)
    labels[action.type - 1] = float(action.value) if action.type == ActionType.DWELL else 1.0
    return WindowRecord(
        record.impression,
        record.close_ms,
        tuple(labels),
        record.types | {action.type},
        record.version,
        record.closed,
    )


# Builds a named tuple from a tuple of ALL its fields, skipping its Python-level __new__ (a third of the
# cost of creating one): for the records and samples the join creates per event.
_new = tuple.__new__
_NO_LABELS = (0.0, 0.0, 0.0, 0.0)
_NO_TYPES: frozenset[ActionType] = frozenset()

# frozenset of joined types, plus one more type -> the union (saves building a set per joined action)
_WITH_TYPE = {
    (frozenset(types), added): frozenset(types) | {added}
    for n in range(len(ActionType) + 1)
    for types in itertools.combinations(ActionType, n)
    for added in ActionType
}


def _with_version(record: WindowRecord, version: int) -> WindowRecord:
    return WindowRecord(record.impression, record.close_ms, record.labels, record.types, version, record.closed)


def _in_window(record: WindowRecord, action: ActionEvent) -> bool:
    return record.impression.event_time_ms <= action.event_time_ms < record.close_ms


class EventJoin:
    """The join of one partition over state (see the module docstring for the rules).

    Args:
        config: join settings.
        state: the store; its saved watermark and counters are restored.
    """

    def __init__(self, config: JoinConfig, state: JoinState) -> None:
        self.config = config
        self.state = state
        meta = state.load_meta() or JoinMeta(epoch=secrets.token_hex(6))
        self.epoch = meta.epoch or secrets.token_hex(6)
        self._max_event_ms = meta.max_event_ms
        self._watermark_ms = meta.watermark_ms
        self._next_outbox_seq = meta.next_outbox_seq
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0) | meta.counters
        self._arrivals = 0  # events since the last advance()
        self._last_arrival_ms: int | None = None  # processing time
        self._idle_mark_ms = 0  # processing time up to which idleness has moved the watermark
        self._restore_timers()

    def _restore_timers(self) -> None:
        """Schedules the timers the stored windows and buffers imply (states keep timers in memory only)."""
        for key, close_ms, closed in self.state.windows():
            if closed:
                self.state.add_timer(Timer(close_ms + self.config.retention_ms, TimerKind.FORGET, key))
            else:
                self.state.add_timer(Timer(close_ms, TimerKind.CLOSE, key))
        for key, actions in self.state.buffers():
            for deadline in {a.event_time_ms + self.config.window_ms for a in actions}:
                self.state.add_timer(Timer(deadline, TimerKind.ORPHAN, key))

    @property
    def watermark_ms(self) -> int | None:
        """The current watermark (None before the first event)."""
        return self._watermark_ms

    def on_events(self, events: Iterable[ImpressionEvent | ActionEvent]) -> list[JoinedSample]:
        """``on_impression`` / ``on_action`` for each event in order; their samples, concatenated.

        Gives the same samples in the same order, counters and state as the calls one by one, in less
        time: the common cases (an impression of a new key; an action of a new type inside an open window)
        are handled inline, every other event by ``on_impression`` / ``on_action``.
        """
        out: list[JoinedSample] = []
        state = self.state
        get_window, put_window, get_buffer = state.get_window, state.put_window, state.get_buffer
        schedule, next_due = state.schedule, state.next_due_ms
        window_ms, lateness_ms = self.config.window_ms, self.config.allowed_lateness_ms
        impressions = actions = positives = updates = 0
        try:
            for ev in events:
                t = ev.event_time_ms
                wm = self._watermark_ms
                key = (ev.request_id, ev.item_id)
                if type(ev) is ImpressionEvent:
                    close = t + window_ms
                    if get_window(key) is not None or (wm is not None and close <= wm) or get_buffer(key):
                        out += self.on_impression(ev)
                        continue
                    impressions += 1
                    put_window(key, _new(WindowRecord, (ev, close, _NO_LABELS, _NO_TYPES, 0, False)))
                    schedule(close, TimerKind.CLOSE, key)
                else:
                    record = get_window(key)
                    if (
                        record is None
                        or record.closed
                        or not record.impression.event_time_ms <= t < record.close_ms
                        or ev.type in record.types
                    ):
                        out += self.on_action(ev)
                        continue
                    actions += 1
                    vector = list(record.labels)
                    vector[ev.type - 1] = float(ev.value) if ev.type == ActionType.DWELL else 1.0
                    labels = tuple(vector)
                    version = record.version + 1
                    imp = record.impression
                    joined = _new(
                        WindowRecord,
                        (imp, record.close_ms, labels, _WITH_TYPE[record.types, ev.type], version, False),
                    )
                    if version == 1:
                        positives += 1
                    else:
                        updates += 1
                    out.append(
                        _new(
                            JoinedSample, (f"{key[0]}:{key[1]}:v{version}", key, labels, version, 1.0, False, imp)
                        )
                    )
                    put_window(key, joined)
                # _observe, inline
                if self._max_event_ms is None or t > self._max_event_ms:
                    self._max_event_ms = t
                if wm is None or t - lateness_ms > wm:
                    self._watermark_ms = wm = t - lateness_ms
                due = next_due()
                if due is not None and due <= wm:
                    self._fire(out)
        finally:  # also when an event fails: the counts stay true to the state
            counters = self.counters
            counters["impressions"] += impressions
            counters["actions"] += actions
            counters["positives"] += positives
            counters["updates"] += updates
            self._arrivals += impressions + actions
        return out

    def on_impression(self, ev: ImpressionEvent) -> list[JoinedSample]:
        """Handle an impression; returns its samples (positives from buffered actions) and fired windows."""
        out: list[JoinedSample] = []
        self.counters["impressions"] += 1
        key, wm = ev.key, self._watermark_ms
        close = ev.event_time_ms + self.config.window_ms
        if self.state.get_window(key) is not None:
            self.counters["duplicate_impressions"] += 1
        elif wm is not None and close <= wm:
            self.counters["late_impressions"] += 1
        else:
            record = WindowRecord(ev, close)
            buffered = self.state.get_buffer(key)
            if buffered:
                self.state.put_buffer(key, ())
                for deadline in {a.event_time_ms + self.config.window_ms for a in buffered}:
                    self.state.remove_timer(Timer(deadline, TimerKind.ORPHAN, key))
                for action in buffered:
                    record = self._join_open(record, action)
                if record.types:
                    record = _with_version(record, 1)
                    self.counters["positives"] += 1
                    out.append(self._sample(record, 1.0, correction=False))
            self.state.put_window(key, record)
            self.state.add_timer(Timer(close, TimerKind.CLOSE, key))
        return self._observe(ev.event_time_ms, out)

    def on_action(self, ev: ActionEvent) -> list[JoinedSample]:
        """Handle an action; returns its sample (positive, update or correction, if any) and fired windows."""
        out: list[JoinedSample] = []
        self.counters["actions"] += 1
        key, wm = ev.key, self._watermark_ms
        record = self.state.get_window(key)
        if record is None:
            deadline = ev.event_time_ms + self.config.window_ms
            if wm is not None and deadline <= wm:
                self.counters["orphan_actions"] += 1
            else:
                self.counters["buffered_actions"] += 1
                self.state.put_buffer(key, (*self.state.get_buffer(key), ev))
                self.state.add_timer(Timer(deadline, TimerKind.ORPHAN, key))
        elif not record.closed:
            joined = self._join_open(record, ev)
            if joined is not record:
                joined = _with_version(joined, record.version + 1)
                self.counters["positives" if joined.version == 1 else "updates"] += 1
                out.append(self._sample(joined, 1.0, correction=False))
                self.state.put_window(key, joined)
        elif not _in_window(record, ev):
            self.counters["out_of_window_actions"] += 1
        elif ev.type in record.types:
            self.counters["duplicate_actions"] += 1
        else:
            self.counters["late_actions"] += 1
            if self.config.late_policy == "correct":
                corrected = _with_version(_with_action(record, ev), record.version + 1)
                self.counters["corrections"] += 1
                out.append(self._sample(corrected, 1.0, correction=True))
                self.state.put_window(key, corrected)
        return self._observe(ev.event_time_ms, out)

    def advance(self, now_processing_ms: int, input_drained: bool = True) -> list[JoinedSample]:
        """Note processing time, move an idle partition's watermark, and fire due windows in event-time order.

        ``input_drained=False`` (events are waiting to be read, the reader is only slow) counts as an
        arrival: a partition is idle only when nothing is waiting, not when its reader falls behind.
        """
        if self._arrivals or self._last_arrival_ms is None or not input_drained:
            self._arrivals = 0
            self._last_arrival_ms = self._idle_mark_ms = now_processing_ms
        elif self._watermark_ms is not None and (
            now_processing_ms - self._last_arrival_ms >= self.config.idle_timeout_ms
        ):
            step = now_processing_ms - self._idle_mark_ms
            if step > 0:  # a processing clock that stepped back moves nothing
                self._watermark_ms += step
                self._idle_mark_ms = now_processing_ms
        out: list[JoinedSample] = []
        self._fire(out)
        return out

    def stage_output(self, data: bytes) -> int:
        """Puts an encoded output in the state's outbox under the next sequence number and returns it.

        The entry becomes durable with the state by the next ``commit()``: publish it after the commit
        with a message id derived from the sequence, then ``output_delivered(seq)``. After a crash,
        ``pending_outputs()`` holds every committed output not yet known to be delivered, with the
        sequence (hence the message id) it had.
        """
        seq = self._next_outbox_seq
        self._next_outbox_seq += 1
        self.state.put_outbox(seq, data)
        return seq

    def output_delivered(self, seq: int) -> None:
        """Forgets an output JetStream has acknowledged (durable with the next commit)."""
        self.state.delete_outbox(seq)

    def pending_outputs(self) -> list[tuple[int, bytes]]:
        """Outputs staged and not yet delivered, by sequence."""
        return self.state.outbox()

    def commit(self) -> None:
        """Persist state, watermark and counters atomically (after the outputs so far are published)."""
        self._save_meta()
        self.state.commit()

    def _join_open(self, record: WindowRecord, action: ActionEvent) -> WindowRecord:
        """record with action joined, or record itself (counted) if the action does not join."""
        if not _in_window(record, action):
            self.counters["out_of_window_actions"] += 1
            return record
        if action.type in record.types:
            self.counters["duplicate_actions"] += 1
            return record
        return _with_action(record, action)

    def _observe(self, event_time_ms: int, out: list[JoinedSample]) -> list[JoinedSample]:
        self._arrivals += 1
        if self._max_event_ms is None or event_time_ms > self._max_event_ms:
            self._max_event_ms = event_time_ms
        candidate = event_time_ms - self.config.allowed_lateness_ms
        if self._watermark_ms is None or candidate > self._watermark_ms:
            self._watermark_ms = candidate
        self._fire(out)
        return out

    def _fire(self, out: list[JoinedSample]) -> None:
        wm = self._watermark_ms
        if wm is None:
            return
        state, counters = self.state, self.counters
        # Closing a window schedules its FORGET timer, which may already be due: loop until nothing is.
        while due := state.pop_due_timers(wm):
            for kind, item, request in due:
                key = (request, item)
                if kind == TimerKind.CLOSE:
                    self._close(key, wm, out)
                elif kind == TimerKind.FORGET:
                    # Scheduled once, when the window closed; a closed window never reopens, so the
                    # record is still the closed one (no need to read it).
                    state.delete_window(key)
                    counters["forgotten_keys"] += 1
                else:
                    buffered = state.get_buffer(key)
                    waiting = tuple(a for a in buffered if a.event_time_ms + self.config.window_ms > wm)
                    counters["orphan_actions"] += len(buffered) - len(waiting)
                    state.put_buffer(key, waiting)

    def _close(self, key: Key, wm: int, out: list[JoinedSample]) -> None:
        record = self.state.get_window(key)
        if record is None or record.closed or record.close_ms > wm:
            return  # a stale timer
        imp, labels = record.impression, record.labels
        if record.version == 0:
            rate = self.config.negative_rate
            if rate >= 1.0 or negative_kept(key, rate, self.config.seed):
                self.counters["negatives"] += 1
                out.append(_new(JoinedSample, (f"{key[0]}:{key[1]}:v1", key, labels, 1, 1.0 / rate, False, imp)))
            else:
                self.counters["downsampled_negatives"] += 1
        closed = _new(WindowRecord, (imp, record.close_ms, labels, record.types, record.version or 1, True))
        self.state.close_window(key, closed)
        self.state.schedule(record.close_ms + self.config.retention_ms, TimerKind.FORGET, key)

    @staticmethod
    def _sample(record: WindowRecord, weight: float, *, correction: bool) -> JoinedSample:
        imp = record.impression
        return JoinedSample(
            sample_id=f"{imp.request_id}:{imp.item_id}:v{record.version}",
            key=imp.key,
            label_vector=record.labels,
            version=record.version,
            weight=weight,
            correction=correction,
            impression=imp,
        )

    def _save_meta(self) -> None:
        meta = JoinMeta(
            self._max_event_ms, self._watermark_ms, dict(self.counters), self._next_outbox_seq, self.epoch
        )
        self.state.save_meta(meta)
