"""The state behind ``EventJoin``: join records, buffered actions, a timer index and the join's metadata.

One small interface, ``JoinState``, and two implementations that behave identically:

- ``MemoryJoinState``: plain dicts and a heap; for tests and for joiners that may lose their state.
- ``RocksJoinState``: the same data in one RocksDB (rocksdict, raw mode), written only by ``commit()``.

The data model lives here too, because the RocksDB layout must be able to rebuild it: ``ImpressionEvent``,
``ActionEvent`` (plain dataclasses, converted from the ``freshet.events.v1`` protobufs at the edge),
``WindowRecord`` (one impression's join, open or closed), ``Timer`` and ``JoinMeta``.

RocksDB layout (keys are bytes; ``K`` = item id as order-preserving 8-byte big-endian + request id UTF-8):

- ``w/K`` -> JSON window record (open window, or the tombstone of a closed one);
- ``b/K`` -> JSON list of buffered actions of a key whose impression has not arrived;
- ``t/<at><kind>K`` -> empty; ``at`` is the due time as order-preserving 8-byte big-endian, so the
  timers due by a watermark are one forward range scan from the start of ``t/``;
- ``m/meta`` -> JSON watermark, maximum event time and counters.

Every mutation between two ``commit()`` calls is held in an in-memory overlay that reads see at once
(read-your-writes); ``commit()`` writes the overlay as ONE ``WriteBatch``, so after a crash the store is
exactly as of the last commit. ``close()`` does not commit: what was not committed is lost, as in a crash.
Timers are ordered by their encoded bytes in both implementations, i.e. by (due time, kind, key), which
keeps the order in which windows fire identical in memory and on disk.
"""

from __future__ import annotations

import bisect
import heapq
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, is_dataclass
from dataclasses import fields as dataclass_fields
from enum import IntEnum
from types import TracebackType

from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from freshet.events.v1 import events_pb2

Key = tuple[str, int]  # (request_id, item_id)
_OFFSET = 1 << 63  # shifts int64 into uint64 so big-endian bytes sort like the signed numbers


class ActionType(IntEnum):
    """Action types, numbered as ``freshet.events.v1.ActionType``; ``type - 1`` is the label slot."""

    CLICK = 1
    LIKE = 2
    SHARE = 3
    DWELL = 4


@dataclass(frozen=True)
class ImpressionEvent:
    """One item shown for one request. ``context`` is sorted (slot, value) pairs, so events are hashable."""

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
            context=tuple(sorted(msg.context.items())),
        )


@dataclass(frozen=True)
class ActionEvent:
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
        try:
            kind = ActionType(msg.type)
        except ValueError:
            raise ValueError(f"action type {msg.type} is not one of {[t.name for t in ActionType]}") from None
        return cls(msg.request_id, msg.item_id, kind, float(msg.value), msg.event_time_ms)


@dataclass(frozen=True)
class WindowRecord:
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
    return _i64(key[1]) + key[0].encode()


def decode_key(raw: bytes) -> Key:
    return (raw[8:].decode(), int.from_bytes(raw[:8], "big") - _OFFSET)


@dataclass(frozen=True)
class Timer:
    """Something to do for ``key`` once the watermark reaches ``at_ms``."""

    at_ms: int
    kind: str
    key: Key

    def encode(self) -> bytes:
        """Bytes that sort as (at_ms, kind, key) do."""
        return _i64(self.at_ms) + self.kind.encode() + encode_key(self.key)

    @classmethod
    def decode(cls, raw: bytes) -> Timer:
        return cls(int.from_bytes(raw[:8], "big") - _OFFSET, raw[8:9].decode(), decode_key(raw[9:]))


@dataclass(frozen=True)
class JoinMeta:
    """The join's scalar state. ``None`` times: no event seen yet."""

    max_event_ms: int | None = None
    watermark_ms: int | None = None
    counters: dict[str, int] = field(default_factory=dict)


class JoinState(ABC):
    """Storage of one join partition. Getters return immutable values; change them only through puts."""

    @abstractmethod
    def get_window(self, key: Key) -> WindowRecord | None: ...

    @abstractmethod
    def put_window(self, key: Key, record: WindowRecord) -> None: ...

    @abstractmethod
    def delete_window(self, key: Key) -> None: ...

    @abstractmethod
    def get_buffer(self, key: Key) -> tuple[ActionEvent, ...]:
        """Buffered actions of key in arrival order (empty when none)."""

    @abstractmethod
    def put_buffer(self, key: Key, actions: tuple[ActionEvent, ...]) -> None:
        """Replace key's buffered actions; an empty tuple deletes them."""

    @abstractmethod
    def add_timer(self, timer: Timer) -> None:
        """Schedule timer (adding one that exists is a no-op)."""

    @abstractmethod
    def remove_timer(self, timer: Timer) -> None:
        """Unschedule timer (missing ones are ignored)."""

    @abstractmethod
    def pop_due(self, up_to_ms: int) -> list[Timer]:
        """Remove and return every timer with ``at_ms <= up_to_ms``, ordered by (at_ms, kind, key)."""

    @abstractmethod
    def load_meta(self) -> JoinMeta | None: ...

    @abstractmethod
    def save_meta(self, meta: JoinMeta) -> None: ...

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
        self._windows: dict[Key, WindowRecord] = {}
        self._buffers: dict[Key, tuple[ActionEvent, ...]] = {}
        self._live: set[bytes] = set()
        self._heap: list[bytes] = []  # may hold removed timers; only those in _live count
        self._meta: JoinMeta | None = None

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

    def add_timer(self, timer: Timer) -> None:
        raw = timer.encode()
        if raw not in self._live:
            self._live.add(raw)
            heapq.heappush(self._heap, raw)

    def remove_timer(self, timer: Timer) -> None:
        self._live.discard(timer.encode())

    def pop_due(self, up_to_ms: int) -> list[Timer]:
        upper, out = _i64(up_to_ms + 1), []
        while self._heap and self._heap[0] < upper:
            raw = heapq.heappop(self._heap)
            if raw in self._live:
                self._live.remove(raw)
                out.append(Timer.decode(raw))
        return out

    def load_meta(self) -> JoinMeta | None:
        return self._meta

    def save_meta(self, meta: JoinMeta) -> None:
        self._meta = meta

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass


_W, _B, _T, _META = b"w/", b"b/", b"t/", b"m/meta"
_TIMER_SET = b""  # overlay value of a scheduled timer; None in the overlay means deleted


class RocksJoinState(JoinState):
    """The join state in RocksDB at path, with an uncommitted overlay (see the module docstring).

    Args:
        path: the RocksDB directory (created if missing); reopening it restores the last commit.
        sync_writes: fsync the WAL on commit, so a commit also survives an OS crash or power loss.
    """

    def __init__(self, path: str, *, sync_writes: bool = False) -> None:
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        self.path = path
        self._db: Rdict | None = Rdict(path, opts)
        self._write_opts = WriteOptions()
        self._write_opts.sync = sync_writes
        self._pending: dict[bytes, object] = {}
        self._pending_timers: list[bytes] = []  # sorted encoded timers scheduled since the last commit
        # Every timer stored in the DB below _floor is already deleted in the overlay (or the DB): scans
        # start there instead of walking RocksDB tombstones of timers fired long ago.
        self._floor = b""

    def _read(self, key: bytes) -> bytes | object | None:
        if key in self._pending:
            return self._pending[key]
        return self._open_db().get(key)

    def get_window(self, key: Key) -> WindowRecord | None:
        value = self._read(_W + encode_key(key))
        return _decode_window(value) if isinstance(value, bytes) else value

    def put_window(self, key: Key, record: WindowRecord) -> None:
        self._pending[_W + encode_key(key)] = record

    def delete_window(self, key: Key) -> None:
        self._pending[_W + encode_key(key)] = None

    def get_buffer(self, key: Key) -> tuple[ActionEvent, ...]:
        value = self._read(_B + encode_key(key))
        if isinstance(value, bytes):
            return tuple(ActionEvent(key[0], key[1], ActionType(k), v, t) for k, v, t in json.loads(value))
        return value or ()

    def put_buffer(self, key: Key, actions: tuple[ActionEvent, ...]) -> None:
        self._pending[_B + encode_key(key)] = tuple(actions) or None

    def add_timer(self, timer: Timer) -> None:
        raw = timer.encode()
        if self._pending.get(_T + raw) == _TIMER_SET:
            return
        self._pending[_T + raw] = _TIMER_SET
        bisect.insort(self._pending_timers, raw)
        self._floor = min(self._floor, raw)

    def remove_timer(self, timer: Timer) -> None:
        raw = timer.encode()
        self._pending[_T + raw] = None
        i = bisect.bisect_left(self._pending_timers, raw)
        if i < len(self._pending_timers) and self._pending_timers[i] == raw:
            del self._pending_timers[i]

    def pop_due(self, up_to_ms: int) -> list[Timer]:
        upper, due = _i64(up_to_ms + 1), set()
        if self._floor < upper:
            it = self._open_db().iter()
            it.seek(_T + self._floor)
            while it.valid():
                key = it.key()
                if not key.startswith(_T) or key[2:] >= upper:
                    break
                if self._pending.get(key, _TIMER_SET) is not None:
                    due.add(key[2:])
                it.next()
            del it  # an open iterator pins the DB
            self._floor = upper
        n = bisect.bisect_left(self._pending_timers, upper)
        due.update(self._pending_timers[:n])
        del self._pending_timers[:n]
        for raw in due:
            self._pending[_T + raw] = None
        return [Timer.decode(raw) for raw in sorted(due)]

    def load_meta(self) -> JoinMeta | None:
        value = self._read(_META)
        return JoinMeta(**json.loads(value)) if isinstance(value, bytes) else value

    def save_meta(self, meta: JoinMeta) -> None:
        self._pending[_META] = meta

    def commit(self) -> None:
        db = self._open_db()
        batch = WriteBatch(raw_mode=True)
        for key, value in self._pending.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, _encode(key, value))
        if len(batch):
            db.write(batch, self._write_opts)
        self._pending.clear()
        self._pending_timers.clear()

    def close(self) -> None:
        if self._db is None:
            return
        self._pending.clear()
        self._pending_timers.clear()
        self._db.close()
        self._db = None

    def _open_db(self) -> Rdict:
        if self._db is None:
            raise RuntimeError(f"RocksJoinState {self.path} is closed")
        return self._db


def _encode(key: bytes, value: object) -> bytes:
    if key.startswith(_T):
        return b""
    if key.startswith(_B):
        return json.dumps([[int(a.type), a.value, a.event_time_ms] for a in value]).encode()
    fields = _shallow_fields(value)  # a WindowRecord or JoinMeta
    if isinstance(value, WindowRecord):
        fields["types"] = sorted(int(t) for t in value.types)
    return json.dumps(fields).encode()


def _shallow_fields(value: object) -> dict:
    """Like ``dataclasses.asdict`` but without its deep copies (it dominated commit time)."""
    out = {}
    for f in dataclass_fields(value):
        item = getattr(value, f.name)
        out[f.name] = _shallow_fields(item) if is_dataclass(item) else item
    return out


def _decode_window(raw: bytes) -> WindowRecord:
    fields = json.loads(raw)
    imp = fields.pop("impression")
    imp["context"] = tuple(tuple(pair) for pair in imp["context"])
    fields["labels"] = tuple(fields["labels"])
    fields["types"] = frozenset(ActionType(t) for t in fields["types"])
    return WindowRecord(ImpressionEvent(**imp), **fields)
