"""The state behind ``EventJoin``, the reference join: join records, buffered actions, a timer index and the
join's metadata, behind one small interface, ``JoinState``, held in memory by ``MemoryJoinState``.

The joiner runs ``ColumnJoin`` (``services/joiner/columnjoin.py``), which keeps the same data in arrays and
RocksDB; the reference and its state are the rules' executable statement, which tests hold it to.

The data model lives here too: ``ImpressionEvent``, ``ActionEvent`` (plain named tuples, converted from the
``freshet.events.v1`` protobufs at the edge), ``WindowRecord`` (one impression's join, open or closed),
``Timer`` and ``JoinMeta``.

Timers follow from the windows and buffers (a CLOSE timer per open window, a FORGET timer per closed one,
an ORPHAN timer per buffered action's deadline); they are kept grouped by due time, and ``EventJoin``
rebuilds them when it opens a state. They fire ordered by their encoded bytes, i.e. by (due time, kind,
key), which keeps the order in which windows fire the same in every run.
"""

from __future__ import annotations

import heapq
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from types import TracebackType
from typing import NamedTuple

from freshet.eventcolumns import context_pairs
from freshet.events.v1 import events_pb2

Key = tuple[str, int]  # (request_id, item_id)
_OFFSET = 1 << 63  # shifts int64 into uint64 so big-endian bytes sort like the signed numbers


class ActionType(IntEnum):
    """Action types, numbered as ``freshet.events.v1.ActionType``; ``type - 1`` is the label slot."""

    CLICK = 1
    LIKE = 2
    SHARE = 3
    DWELL = 4


ACTION_TYPES = {int(t): t for t in ActionType}  # protobuf enum value -> type


class ImpressionEvent(NamedTuple):
    """One item shown for one request. ``context`` is sorted (slot, value) pairs, so events are hashable.

    Events, window records and timers are named tuples: the join creates several per event.
    """

    request_id: str
    user_id: int
    item_id: int
    position: int
    event_time_ms: int
    context: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> Key:
        return (self.request_id, self.item_id)

    @classmethod
    def from_proto(cls, msg: events_pb2.Impression) -> ImpressionEvent:
        return cls(
            request_id=msg.request_id,
            user_id=msg.user_id,
            item_id=msg.item_id,
            position=msg.position,
            event_time_ms=msg.event_time_ms,
            context=context_pairs(msg.context),
        )


class ActionEvent(NamedTuple):
    """One user action on an impressed item; ``value`` is dwell seconds for DWELL, ignored otherwise."""

    request_id: str
    item_id: int
    type: ActionType
    value: float
    event_time_ms: int

    @property
    def key(self) -> Key:
        return (self.request_id, self.item_id)

    @classmethod
    def from_proto(cls, msg: events_pb2.Action) -> ActionEvent:
        """Raises ValueError for ``ACTION_TYPE_UNSPECIFIED`` or a type this code does not know."""
        kind = ACTION_TYPES.get(msg.type)
        if kind is None:
            raise ValueError(f"action type {msg.type} is not one of {[t.name for t in ActionType]}")
        return cls(msg.request_id, msg.item_id, kind, float(msg.value), msg.event_time_ms)


class WindowRecord(NamedTuple):
    """The join of one impression: open until the watermark reaches ``close_ms``, then a tombstone.


    Attributes:
        impression: the accepted impression.
        close_ms: ``impression.event_time_ms + window_ms`` (kept, so a config change spares old windows).
        labels: [click, like, share, dwell_seconds] so far.
        types: action types joined so far (a second action of one of them is a duplicate).
        version: label versions emitted so far (0: no sample yet).
        closed: the watermark has passed ``close_ms``.
    """

    impression: ImpressionEvent
    close_ms: int
    labels: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    types: frozenset[ActionType] = frozenset()
    version: int = 0
    closed: bool = False


class TimerKind:
    """Timer kinds; one byte each, in the order they fire when due at the same time."""

    CLOSE = "c"  # close an open window
    FORGET = "f"  # drop a closed window's tombstone
    ORPHAN = "o"  # drop buffered actions no open window can take any more


def _i64(value: int) -> bytes:
    return (value + _OFFSET).to_bytes(8, "big")


def encode_key(key: Key) -> bytes:
    return (key[1] + _OFFSET).to_bytes(8, "big") + key[0].encode()


def decode_key(raw: bytes) -> Key:
    return (raw[8:].decode(), int.from_bytes(raw[:8], "big") - _OFFSET)


class Timer(NamedTuple):
    """Something to do for ``key`` once the watermark reaches ``at_ms``."""

    at_ms: int
    kind: str
    key: Key

    def encode(self) -> bytes:
        """Bytes that sort as (at_ms, kind, key) do."""
        return _TIMER_HEAD.pack(self.at_ms + _OFFSET, self.kind.encode()) + encode_key(self.key)

    @classmethod
    def decode(cls, raw: bytes) -> Timer:
        at, kind, item = _TIMER_KEY.unpack_from(raw)
        return cls(at - _OFFSET, kind.decode(), (raw[17:].decode(), item - _OFFSET))


_TIMER_HEAD = struct.Struct(">Qc")
_TIMER_KEY = struct.Struct(">QcQ")


@dataclass(frozen=True)
class JoinMeta:
    """The join's scalar state. ``None`` times: no event seen yet."""

    max_event_ms: int | None = None
    watermark_ms: int | None = None
    counters: dict[str, int] = field(default_factory=dict)
    next_outbox_seq: int = 1
    epoch: str = ""  # chosen when the state is created; part of output message ids


class JoinState(ABC):
    """Storage of one join partition. Getters return immutable values; change them only through puts."""

    def __init__(self) -> None:
        # Timers due at one time, as (kind, item id, request id), and a heap of those times (a time stays
        # in the heap after its timers are removed; popping it finds none).
        self._due_at: dict[int, set[tuple[str, int, str]]] = {}
        self._times: list[int] = []

    @abstractmethod
    def get_window(self, key: Key) -> WindowRecord | None: ...

    @abstractmethod
    def put_window(self, key: Key, record: WindowRecord) -> None: ...

    def close_window(self, key: Key, record: WindowRecord) -> None:
        """Replace key's open window by its closed form ``record`` (same labels and types, ``closed``, version
        at least 1). Only for a window the watermark has reached: ``record.close_ms`` is at most the
        watermark of the meta saved with the next commit, which lets a store derive the closed form."""
        self.put_window(key, record)

    @abstractmethod
    def delete_window(self, key: Key) -> None: ...

    @abstractmethod
    def get_buffer(self, key: Key) -> tuple[ActionEvent, ...]:
        """Buffered actions of key in arrival order (empty when none)."""

    @abstractmethod
    def put_buffer(self, key: Key, actions: tuple[ActionEvent, ...]) -> None:
        """Replace key's buffered actions; an empty tuple deletes them."""

    @abstractmethod
    def windows(self) -> Iterator[tuple[Key, int, bool]]:
        """(key, close_ms, closed) of every stored window record, for rebuilding timers."""

    @abstractmethod
    def buffers(self) -> Iterator[tuple[Key, tuple[ActionEvent, ...]]]:
        """Every key's buffered actions, for rebuilding timers."""

    # Timers live in process memory, in both implementations: they follow from the stored windows and
    # buffers, so ``EventJoin`` rebuilds them when it opens a state. They are grouped by due time (many
    # events share a millisecond), and each group sorts its (kind, item id, request id) tuples when it
    # fires, which orders timers exactly as their encodings (UTF-8 keeps the code point order).

    def add_timer(self, timer: Timer) -> None:
        """Schedule timer (adding one that exists is a no-op)."""
        self.schedule(timer.at_ms, timer.kind, timer.key)

    def schedule(self, at_ms: int, kind: str, key: Key) -> None:
        """``add_timer(Timer(at_ms, kind, key))`` without building the Timer (the join schedules two per key)."""
        timers = self._due_at.get(at_ms)
        if timers is None:
            self._due_at[at_ms] = {(kind, key[1], key[0])}
            heapq.heappush(self._times, at_ms)
        else:
            timers.add((kind, key[1], key[0]))

    def next_due_ms(self) -> int | None:
        """A lower bound of the earliest timer's due time (None: no timer); removed timers may still count."""
        return self._times[0] if self._times else None

    def remove_timer(self, timer: Timer) -> None:
        """Unschedule timer (missing ones are ignored)."""
        timers = self._due_at.get(timer.at_ms)
        if timers is not None:
            timers.discard((timer.kind, timer.key[1], timer.key[0]))

    def pop_due_timers(self, up_to_ms: int) -> list[tuple[str, int, str]]:
        """``pop_due`` as plain (kind, item id, request id) tuples, in the same order."""
        times = self._times
        if not times or times[0] > up_to_ms:
            return []
        out: list[tuple[str, int, str]] = []
        while times and times[0] <= up_to_ms:
            timers = self._due_at.pop(heapq.heappop(times))
            out += sorted(timers) if len(timers) > 1 else timers
        return out

    def pop_due(self, up_to_ms: int) -> list[Timer]:
        """Remove and return every timer with ``at_ms <= up_to_ms``, ordered by (at_ms, kind, key)."""
        times, out = self._times, []
        while times and times[0] <= up_to_ms:
            at = heapq.heappop(times)
            out += [Timer(at, kind, (request, item)) for kind, item, request in sorted(self._due_at.pop(at))]
        return out

    @abstractmethod
    def load_meta(self) -> JoinMeta | None: ...

    @abstractmethod
    def save_meta(self, meta: JoinMeta) -> None: ...

    @abstractmethod
    def put_outbox(self, seq: int, data: bytes) -> None:
        """Store an output to publish; it becomes durable with the state by the next ``commit()``."""

    @abstractmethod
    def delete_outbox(self, seq: int) -> None:
        """Forget an output JetStream has acknowledged."""

    @abstractmethod
    def outbox(self) -> list[tuple[int, bytes]]:
        """Outputs stored and not deleted, ordered by ``seq``."""

    @abstractmethod
    def commit(self) -> None:
        """Make every change so far durable, atomically. Call it after publishing the outputs they caused."""

    @abstractmethod
    def close(self) -> None:
        """Release resources WITHOUT committing. Safe to call twice."""

    def __enter__(self) -> JoinState:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class MemoryJoinState(JoinState):
    """Dicts and a heap of encoded timers; ``commit`` is a no-op, nothing survives the process."""

    def __init__(self) -> None:
        super().__init__()
        self._windows: dict[Key, WindowRecord] = {}
        self._buffers: dict[Key, tuple[ActionEvent, ...]] = {}
        self._meta: JoinMeta | None = None
        self._outbox: dict[int, bytes] = {}

    def get_window(self, key: Key) -> WindowRecord | None:
        return self._windows.get(key)

    def put_window(self, key: Key, record: WindowRecord) -> None:
        self._windows[key] = record

    def delete_window(self, key: Key) -> None:
        self._windows.pop(key, None)

    def get_buffer(self, key: Key) -> tuple[ActionEvent, ...]:
        return self._buffers.get(key, ())

    def put_buffer(self, key: Key, actions: tuple[ActionEvent, ...]) -> None:
        if actions:
            self._buffers[key] = tuple(actions)
        else:
            self._buffers.pop(key, None)

    def windows(self) -> Iterator[tuple[Key, int, bool]]:
        return ((key, r.close_ms, r.closed) for key, r in list(self._windows.items()))

    def buffers(self) -> Iterator[tuple[Key, tuple[ActionEvent, ...]]]:
        return iter(list(self._buffers.items()))

    def load_meta(self) -> JoinMeta | None:
        return self._meta

    def save_meta(self, meta: JoinMeta) -> None:
        self._meta = meta

    def put_outbox(self, seq: int, data: bytes) -> None:
        self._outbox[seq] = data

    def delete_outbox(self, seq: int) -> None:
        self._outbox.pop(seq, None)

    def outbox(self) -> list[tuple[int, bytes]]:
        return sorted(self._outbox.items())

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass
