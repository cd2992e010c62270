"""The state behind ``EventJoin``: join records, buffered actions, a timer index and the join's metadata.

One small interface, ``JoinState``, and two implementations that behave identically:

- ``MemoryJoinState``: plain dicts; for tests and for joiners that may lose their state.
- ``RocksJoinState``: the same data in one RocksDB (rocksdict, raw mode), written only by ``commit()``.

The data model lives here too, because the RocksDB layout must be able to rebuild it: ``ImpressionEvent``,
``ActionEvent`` (plain dataclasses, converted from the ``freshet.events.v1`` protobufs at the edge),
``WindowRecord`` (one impression's join, open or closed), ``Timer`` and ``JoinMeta``.

RocksDB layout (keys are bytes; ``K`` = item id as order-preserving 8-byte big-endian + request id UTF-8):

- ``s/<n>`` -> segment ``n``: the window records written by one commit, and the windows it deleted, as
  entries (tag, ``K``, then for a record: the ``_WINDOW`` header and the context as length-prefixed UTF-8
  pairs). One RocksDB write per commit instead of one per window: the joiner writes a window when its
  impression arrives and again only if its labels change. A window's latest record is the one in the
  newest segment; a segment is dropped once none of its records is the latest of a stored window and no
  older segment is left (its deletions then shadow nothing), so segments go as their windows are forgotten.
  A window that closes is not written again: a stored window whose close time is at or before the
  committed watermark reads as closed (``EventJoin`` closes every window its watermark reaches before it
  commits);
- ``b/K`` -> buffered actions of a key whose impression has not arrived, packed (``_ACTION`` each);
- ``m/meta`` -> JSON watermark, maximum event time, next outbox sequence and counters;
- ``o/<seq>`` -> an outbox entry: encoded output (a ``SampleBatch``) committed with the state that
  produced it and deleted once JetStream acknowledged it (``seq`` and ``n`` order-preserving 8-byte
  big-endian).

Every mutation between two ``commit()`` calls is held in an in-memory overlay that reads see at once
(read-your-writes); ``commit()`` writes the overlay as ONE ``WriteBatch``, so after a crash the store is
exactly as of the last commit. ``close()`` does not commit: what was not committed is lost, as in a crash.
In memory, besides the overlay: where each stored window is (its segment), so the key of a new impression
(most reads) is known to be absent without a read; a bounded cache of recently written windows; a few
decoded segments; and the keys with buffered actions.

Timers are not stored: they follow from the windows and buffers (a CLOSE timer per open window, a FORGET
timer per closed one, an ORPHAN timer per buffered action's deadline), so both implementations keep them
in process memory, grouped by due time, and ``EventJoin`` rebuilds them when it opens a state. They fire
ordered by their encoded bytes, i.e. by (due time, kind, key), which keeps the order in which windows fire
the same in every run.
"""

from __future__ import annotations

import heapq
import itertools
import json
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from functools import lru_cache
from types import TracebackType
from typing import NamedTuple

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


def context_pairs(context) -> tuple[tuple[str, str], ...]:
    """A protobuf context map as sorted (name, value) pairs (most events have none or one)."""
    n = len(context)
    if n == 0:
        return ()
    if n == 1:
        for name in context:
            return ((name, context[name]),)
    return tuple(sorted(context.items()))


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


_S, _B, _O, _META = b"s/", b"b/", b"o/", b"m/meta"
_LEGACY_W = b"w/"


class RocksJoinState(JoinState):
    """The join state in RocksDB at path, with an uncommitted overlay (see the module docstring).

    Args:
        path: the RocksDB directory (created if missing); reopening it restores the last commit.
        sync_writes: fsync the WAL on commit, so a commit also survives an OS crash or power loss.
        cached_windows: decoded window records kept in memory (recently written first out).
    """

    def __init__(self, path: str, *, sync_writes: bool = False, cached_windows: int = 1 << 18) -> None:
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        self.path = path
        self._db: Rdict | None = Rdict(path, opts)
        self._write_opts = WriteOptions()
        self._write_opts.sync = sync_writes
        super().__init__()
        # The overlay: window records by key (None: deleted), and the other entries by their RocksDB key.
        self._pending_windows: dict[Key, WindowRecord | None] = {}
        self._pending: dict[bytes, object] = {}
        # Decoded window records as of recent commits (most windows are read again when they close):
        # saves reading and decoding a segment; bounded, oldest written first out.
        self._recent: dict[Key, WindowRecord] = {}
        self._cached_windows = cached_windows
        self._evict_chunk = max(1, cached_windows // 64)
        self._segments: dict[int, dict[Key, WindowRecord]] = {}  # a few decoded segments, oldest first out
        # Where each stored window is (the segment holding its latest record), how many windows each
        # segment still holds, and the segment numbers in use: [head, next).
        self._where: dict[Key, int] = {}
        stored = []
        for seq, entries in self._scan_segments():
            stored.append(seq)
            for key, close_ms, _ in entries:
                if close_ms is None:
                    self._where.pop(key, None)
                else:
                    self._where[key] = seq
        self._live: dict[int, int] = {}
        for seq in self._where.values():
            self._live[seq] = self._live.get(seq, 0) + 1
        self._head = stored[0] if stored else 1
        self._next_segment = stored[-1] + 1 if stored else 1
        if next(self._scan(_LEGACY_W, overlay=False), None) is not None:
            raise RuntimeError(f"{path} holds join state in an older layout (one key per window); start afresh")
        # Keys with buffered actions (few, short-lived): an impression of any other key needs no read.
        self._buffered: set[Key] = {decode_key(raw[len(_B) :]) for raw, _ in self._scan(_B, overlay=False)}
        meta = self.load_meta()
        # Windows are stored open and not written again when they close: a stored window whose close is
        # at or before the committed watermark is closed (see ``close_window``).
        self._closed_through: int | None = meta.watermark_ms if meta else None

    def _read(self, key: bytes) -> bytes | object | None:
        if key in self._pending:
            return self._pending[key]
        return self._open_db().get(key)

    def get_window(self, key: Key) -> WindowRecord | None:
        if self._db is None:
            self._open_db()  # raises: a closed state answers nothing, even from memory
        record = self._pending_windows.get(key, _ABSENT)
        if record is not _ABSENT:
            return record
        seq = self._where.get(key)
        if seq is None:
            return None  # not stored (the cache holds stored windows only): most impressions' keys
        if (record := self._recent.get(key)) is not None:
            return record
        record = self._segment(seq)[key]
        through = self._closed_through
        if not record.closed and through is not None and record.close_ms <= through:
            # What closing it did (see ``close_window``).
            record = WindowRecord(
                record.impression, record.close_ms, record.labels, record.types, record.version or 1, True
            )
        return record

    def _segment(self, seq: int) -> dict[Key, WindowRecord]:
        """The windows of segment ``seq`` as stored (the latest record of each key in it)."""
        windows = self._segments.get(seq)
        if windows is None:
            windows = {}
            for key, record in _decode_segment(self._open_db()[_S + _i64(seq)]):
                if record is None:
                    windows.pop(key, None)
                else:
                    windows[key] = record
            if len(self._segments) >= _CACHED_SEGMENTS:
                del self._segments[next(iter(self._segments))]
            self._segments[seq] = windows
        return windows

    def put_window(self, key: Key, record: WindowRecord) -> None:
        self._pending_windows[key] = record

    def close_window(self, key: Key, record: WindowRecord) -> None:
        if key in self._pending_windows:
            self._pending_windows[key] = record  # not written yet: written once, closed
        else:
            # Stored open: the next commit's watermark closes it on every read from RocksDB. Until that
            # commit, and after it while cached, the cache answers.
            self._recent.pop(key, None)
            self._recent[key] = record

    def delete_window(self, key: Key) -> None:
        self._pending_windows[key] = None

    def get_buffer(self, key: Key) -> tuple[ActionEvent, ...]:
        if key not in self._buffered:
            return ()
        value = self._read(_B + encode_key(key))
        return _decode_actions(value, key) if isinstance(value, bytes) else value or ()

    def put_buffer(self, key: Key, actions: tuple[ActionEvent, ...]) -> None:
        if actions:
            self._buffered.add(key)
        elif key not in self._buffered:
            return  # nothing stored to delete
        self._pending[_B + encode_key(key)] = tuple(actions) or None

    def windows(self) -> Iterator[tuple[Key, int, bool]]:
        through = self._closed_through
        for seq, entries in self._scan_segments():
            for key, close_ms, closed in entries:
                if close_ms is None or self._where.get(key) != seq or key in self._pending_windows:
                    continue  # deleted or written again later, or changed since the last commit
                if (cached := self._recent.get(key)) is not None:
                    closed = cached.closed  # maybe closed since the last commit
                yield key, close_ms, closed or (through is not None and close_ms <= through)
        for key, record in list(self._pending_windows.items()):
            if record is not None:
                yield key, record.close_ms, record.closed

    def buffers(self) -> Iterator[tuple[Key, tuple[ActionEvent, ...]]]:
        for db_key, value in self._scan(_B):
            key = decode_key(db_key[len(_B) :])
            actions = _decode_actions(value, key) if isinstance(value, bytes) else value
            if actions:
                yield key, actions

    def _scan(self, prefix: bytes, *, overlay: bool = True) -> Iterator[tuple[bytes, object]]:
        """(key, value) of every stored key with prefix, the uncommitted overlay applied, in key order."""
        entries = {key: value for key, value in self._pending.items() if key.startswith(prefix)} if overlay else {}
        it = self._open_db().iter()
        it.seek(prefix)
        while it.valid() and it.key().startswith(prefix):
            entries.setdefault(it.key(), it.value())
            it.next()
        del it  # an open iterator pins the DB
        return iter(sorted(entries.items()))

    def _scan_segments(self) -> Iterator[tuple[int, list[tuple[Key, int | None, bool]]]]:
        """(seq, [(key, close_ms, closed as stored)]) of every stored segment, oldest first; a deletion has
        close_ms None. Reads the record headers only."""
        for db_key, value in self._scan(_S, overlay=False):
            yield int.from_bytes(db_key[len(_S) :], "big") - _OFFSET, list(_segment_headers(value))

    def load_meta(self) -> JoinMeta | None:
        value = self._read(_META)
        return JoinMeta(**json.loads(value)) if isinstance(value, bytes) else value

    def save_meta(self, meta: JoinMeta) -> None:
        self._pending[_META] = meta

    def put_outbox(self, seq: int, data: bytes) -> None:
        self._pending[_O + _i64(seq)] = bytes(data)

    def delete_outbox(self, seq: int) -> None:
        self._pending[_O + _i64(seq)] = None

    def outbox(self) -> list[tuple[int, bytes]]:
        return [(int.from_bytes(key[2:], "big") - _OFFSET, value) for key, value in self._scan(_O) if value]

    def commit(self) -> None:
        db = self._open_db()
        batch = WriteBatch(raw_mode=True)
        recent, where, live = self._recent, self._where, self._live
        seq = self._next_segment
        parts: list[bytes] = []
        written = 0
        for key, record in self._pending_windows.items():
            old = where.get(key)
            if old is not None:
                live[old] -= 1
            recent.pop(key, None)
            if record is None:
                if old is not None:  # else never stored
                    del where[key]
                    parts.append(_deletion(key))
            else:
                where[key] = seq
                parts.append(_entry(key, record))
                recent[key] = record
                written += 1
        if parts:
            batch.put(_S + _i64(seq), b"".join(parts))
            live[seq] = written
            self._next_segment += 1
        # A segment is dropped once no window lives in it and every older one is gone (its deletions
        # then shadow nothing). Windows live from their impression to close + retention, so the head
        # follows the watermark.
        while self._head < self._next_segment and not live.get(self._head):
            batch.delete(_S + _i64(self._head))
            live.pop(self._head, None)
            self._segments.pop(self._head, None)
            self._head += 1
        for key, value in self._pending.items():
            if value is None:
                batch.delete(key)
                if key.startswith(_B):
                    self._buffered.discard(decode_key(key[len(_B) :]))
            else:
                batch.put(key, _encode(key, value))
        if len(batch):
            db.write(batch, self._write_opts)
        meta = self._pending.get(_META)
        if meta is not None:
            self._closed_through = meta.watermark_ms
        if (excess := len(recent) - self._cached_windows) >= self._evict_chunk:
            # Oldest written first out, a chunk at a time: a dict deletes from its front in O(1), but each
            # new iteration skips every slot deleted before (one scan per chunk, not per window), and
            # rebuilding the whole cache at once would stall the join for tens of milliseconds.
            for key in list(itertools.islice(recent, excess)):
                del recent[key]
        self._pending_windows.clear()
        self._pending.clear()

    def close(self) -> None:
        if self._db is None:
            return
        self._pending_windows.clear()
        self._pending.clear()
        self._recent.clear()
        self._segments.clear()
        self._db.close()
        self._db = None

    def _open_db(self) -> Rdict:
        if self._db is None:
            raise RuntimeError(f"RocksJoinState {self.path} is closed")
        return self._db


_ABSENT = object()
_CACHED_SEGMENTS = 16


_WINDOW = struct.Struct("<qiqq4dBIBH")  # user, position, event time, close, labels, types, version, closed, n ctx
_ACTION = struct.Struct("<Bdq")  # type, value, event time
_LEN = struct.Struct("<H")
_TYPES_OF_MASK = [frozenset(t for t in ActionType if mask >> t & 1) for mask in range(1 << (max(ActionType) + 1))]
_MASK_OF_TYPES = {types: mask for mask, types in enumerate(_TYPES_OF_MASK) if not mask & 1}


def _encode(key: bytes, value: object) -> bytes:
    """Bytes of an outbox entry, buffered actions or the meta (windows go into segments: ``_entry``)."""
    if key.startswith(_O):
        return value
    if key.startswith(_B):
        return b"".join(_ACTION.pack(a.type, a.value, a.event_time_ms) for a in value)
    return json.dumps(vars(value), separators=(",", ":")).encode()  # JoinMeta (flat), once per commit


@lru_cache(maxsize=1 << 14)
def _encode_context(context: tuple[tuple[str, str], ...]) -> bytes:
    """Length-prefixed UTF-8 (name, value) pairs (memoised: contexts repeat)."""
    parts = []
    for name, value in context:
        for text in (name.encode(), value.encode()):
            parts.append(_LEN.pack(len(text)))
            parts.append(text)
    return b"".join(parts)


def _decode_window(raw: bytes, key: Key, offset: int = 0) -> tuple[WindowRecord, int]:
    """The record stored for key at ``raw[offset:]`` (closed as stored), and the offset after it."""
    user, position, event_ms, close_ms, l0, l1, l2, l3, mask, version, closed, n_ctx = _WINDOW.unpack_from(
        raw, offset
    )
    offset += _WINDOW.size
    context = []
    for _ in range(n_ctx):
        pair = []
        for _ in range(2):
            (size,) = _LEN.unpack_from(raw, offset)
            offset += _LEN.size
            pair.append(raw[offset : offset + size].decode())
            offset += size
        context.append(tuple(pair))
    record = WindowRecord(
        ImpressionEvent(key[0], user, key[1], position, event_ms, tuple(context)),
        close_ms,
        (l0, l1, l2, l3),
        _TYPES_OF_MASK[mask],
        version,
        bool(closed),
    )
    return record, offset


_PUT, _DELETE = 1, 0
_ENTRY = struct.Struct("<BH")  # tag, key length


def _entry(key: Key, record: WindowRecord) -> bytes:
    """A segment entry storing key's window: tag, key length, key, then the record (``_WINDOW`` header and
    the context as length-prefixed UTF-8 pairs)."""
    raw_key = encode_key(key)
    imp = record.impression
    context = imp.context
    l0, l1, l2, l3 = record.labels
    head = _WINDOW.pack(
        imp.user_id,
        imp.position,
        imp.event_time_ms,
        record.close_ms,
        l0,
        l1,
        l2,
        l3,
        _MASK_OF_TYPES[record.types],
        record.version,
        record.closed,
        len(context),
    )
    return b"".join((_ENTRY.pack(_PUT, len(raw_key)), raw_key, head, _encode_context(context) if context else b""))


def _deletion(key: Key) -> bytes:
    raw_key = encode_key(key)
    return _ENTRY.pack(_DELETE, len(raw_key)) + raw_key


def _segment_headers(raw: bytes) -> Iterator[tuple[Key, int | None, bool]]:
    """(key, close_ms, closed as stored) of each entry of a segment, in order; close_ms None: a deletion."""
    offset, end = 0, len(raw)
    while offset < end:
        tag, size = _ENTRY.unpack_from(raw, offset)
        offset += _ENTRY.size
        key = decode_key(raw[offset : offset + size])
        offset += size
        if tag == _DELETE:
            yield key, None, False
            continue
        fields = _WINDOW.unpack_from(raw, offset)
        offset += _WINDOW.size
        for _ in range(2 * fields[11]):  # skip the context's length-prefixed strings
            offset += _LEN.size + _LEN.unpack_from(raw, offset)[0]
        yield key, fields[3], bool(fields[10])


def _decode_segment(raw: bytes) -> Iterator[tuple[Key, WindowRecord | None]]:
    """The entries of a segment in order: (key, record), or (key, None) for a deletion."""
    offset, end = 0, len(raw)
    while offset < end:
        tag, size = _ENTRY.unpack_from(raw, offset)
        offset += _ENTRY.size
        key = decode_key(raw[offset : offset + size])
        offset += size
        if tag == _DELETE:
            yield key, None
        else:
            record, offset = _decode_window(raw, key, offset)
            yield key, record


def _decode_actions(raw: bytes, key: Key) -> tuple[ActionEvent, ...]:
    return tuple(
        ActionEvent(key[0], key[1], ActionType(kind), value, at) for kind, value, at in _ACTION.iter_unpack(raw)
    )
