"""The state behind ``EventJoin``: join records, buffered actions, a timer index and the join's metadata.

One small interface, ``JoinState``, and two implementations that behave identically:

- ``MemoryJoinState``: plain dicts and a heap; for tests and for joiners that may lose their state.
- ``RocksJoinState``: the same data in one RocksDB (rocksdict, raw mode), written only by ``commit()``.

The data model lives here too, because the RocksDB layout must be able to rebuild it: ``ImpressionEvent``,
``ActionEvent`` (plain dataclasses, converted from the ``freshet.events.v1`` protobufs at the edge),
``WindowRecord`` (one impression's join, open or closed), ``Timer`` and ``JoinMeta``.

RocksDB layout (keys are bytes; ``K`` = item id as order-preserving 8-byte big-endian + request id UTF-8):

- ``w/K`` -> window record (open window, or the tombstone of a closed one), packed binary (``_WINDOW``
  header, then the context as length-prefixed UTF-8 pairs). A window that closes is not written again:
  a stored window whose close time is at or before the committed watermark reads as closed (``EventJoin``
  closes every window its watermark reaches before it commits). Only a change of labels rewrites it;
- ``b/K`` -> buffered actions of a key whose impression has not arrived, packed (``_ACTION`` each);
- ``m/meta`` -> JSON watermark, maximum event time, next outbox sequence and counters;
- ``o/<seq>`` -> an outbox entry: encoded output (a ``SampleBatch``) committed with the state that
  produced it and deleted once JetStream acknowledged it (``seq`` order-preserving 8-byte big-endian).

Every mutation between two ``commit()`` calls is held in an in-memory overlay that reads see at once
(read-your-writes); ``commit()`` writes the overlay as ONE ``WriteBatch``, so after a crash the store is
exactly as of the last commit. In memory, besides the overlay: a bounded cache of recently written
windows, and the set of keys that have a window or buffered actions, so the key of a new impression (most
reads) is known to be absent without a RocksDB read. ``close()`` does not commit: what was not committed is lost, as in a crash.
Timers are not stored: they follow from the windows and buffers (a CLOSE timer per open window, a FORGET
timer per closed one, an ORPHAN timer per buffered action's deadline), so both implementations keep them
in a heap in process memory and ``EventJoin`` rebuilds them when it opens a state. They are ordered by
their encoded bytes, i.e. by (due time, kind, key), which keeps the order in which windows fire the same
in every run.
"""

from __future__ import annotations

import heapq
import json
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, is_dataclass
from dataclasses import fields as dataclass_fields
from enum import IntEnum
from functools import lru_cache
from types import TracebackType
from typing import NamedTuple

from rocksdict import BlockBasedOptions, Options, Rdict, WriteBatch, WriteOptions

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


@lru_cache(maxsize=1 << 18)  # a key is encoded about six times over its window's life
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


_W, _B, _O, _META = b"w/", b"b/", b"o/", b"m/meta"


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
        table = BlockBasedOptions()
        table.set_bloom_filter(10, False)  # reads of keys that do not exist are cheap on disk
        opts.set_block_based_table_factory(table)
        self.path = path
        self._db: Rdict | None = Rdict(path, opts)
        self._write_opts = WriteOptions()
        self._write_opts.sync = sync_writes
        super().__init__()
        # The overlay: window records by key (None: deleted), and the other entries by their RocksDB key.
        self._pending_windows: dict[Key, WindowRecord | None] = {}
        self._pending: dict[bytes, object] = {}
        # Decoded window records as of recent commits (most windows are read again when they close):
        # saves a RocksDB read and a decode; bounded, oldest written first out.
        self._recent: dict[Key, WindowRecord] = {}
        self._cached_windows = cached_windows
        # Every key with a stored window: a new impression's key (the common case) needs no RocksDB read,
        # which would search the memtable. Keys with buffered actions (few, short-lived) likewise.
        self._keys: set[Key] = {decode_key(raw) for raw in self._stored_keys(_W)}
        self._buffered: set[Key] = {decode_key(raw) for raw in self._stored_keys(_B)}
        meta = self.load_meta()
        # Windows are stored open and not written again when they close: a stored window whose close is
        # at or before the committed watermark is closed (see ``close_window``).
        self._closed_through: int | None = meta.watermark_ms if meta else None

    def _stored_keys(self, prefix: bytes) -> list[bytes]:
        it = self._open_db().iter()
        it.seek(prefix)
        keys = []
        while it.valid() and (key := it.key()).startswith(prefix):
            keys.append(key[len(prefix) :])
            it.next()
        del it  # an open iterator pins the DB
        return keys

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
        if (record := self._recent.get(key)) is not None:
            return record
        if key not in self._keys:
            return None
        value = self._open_db().get(_W + encode_key(key))
        return None if value is None else _decode_window(value, key, self._closed_through)

    def put_window(self, key: Key, record: WindowRecord) -> None:
        self._pending_windows[key] = record
        self._keys.add(key)

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
        self._keys.discard(key)

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
        entries: dict[Key, object] = {decode_key(k[len(_W) :]): v for k, v in self._scan(_W, overlay=False)}
        entries.update(self._pending_windows)
        through = self._closed_through
        for key in sorted(entries, key=encode_key):
            value = entries[key]
            if isinstance(value, bytes) and (cached := self._recent.get(key)) is not None:
                value = cached  # closed since the last commit, or the decoded stored record
            if isinstance(value, bytes):  # only the header: close time and the closed flag
                fields = _WINDOW.unpack_from(value)
                yield key, fields[3], bool(fields[10]) or (through is not None and fields[3] <= through)
            elif value is not None:
                yield key, value.close_ms, value.closed

    def buffers(self) -> Iterator[tuple[Key, tuple[ActionEvent, ...]]]:
        for db_key, value in self._scan(_B):
            key = decode_key(db_key[len(_B) :])
            actions = _decode_actions(value, key) if isinstance(value, bytes) else value
            if actions:
                yield key, actions

    def _scan(self, prefix: bytes, *, overlay: bool = True) -> list[tuple[bytes, object]]:
        """(key, value) of every stored key with prefix, the uncommitted overlay applied, in key order."""
        entries = {key: value for key, value in self._pending.items() if key.startswith(prefix)} if overlay else {}
        it = self._open_db().iter()
        it.seek(prefix)
        while it.valid() and it.key().startswith(prefix):
            entries.setdefault(it.key(), it.value())
            it.next()
        del it  # an open iterator pins the DB
        return sorted(entries.items())

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
        recent = self._recent
        put, delete = batch.put, batch.delete
        for key, record in self._pending_windows.items():
            db_key = _W + encode_key(key)
            recent.pop(key, None)
            if record is None:
                delete(db_key)
            else:
                put(db_key, _encode_window(record))
                recent[key] = record
        for key, value in self._pending.items():
            if value is None:
                delete(key)
                if key.startswith(_B):
                    self._buffered.discard(decode_key(key[len(_B) :]))
            else:
                put(key, _encode(key, value))
        if len(batch):
            db.write(batch, self._write_opts)
        meta = self._pending.get(_META)
        if meta is not None:
            self._closed_through = meta.watermark_ms
        for _ in range(len(recent) - self._cached_windows):
            del recent[next(iter(recent))]
        self._pending_windows.clear()
        self._pending.clear()

    def close(self) -> None:
        if self._db is None:
            return
        self._pending_windows.clear()
        self._pending.clear()
        self._recent.clear()
        self._db.close()
        self._db = None

    def _open_db(self) -> Rdict:
        if self._db is None:
            raise RuntimeError(f"RocksJoinState {self.path} is closed")
        return self._db


_ABSENT = object()


_WINDOW = struct.Struct("<qiqq4dBIBH")  # user, position, event time, close, labels, types, version, closed, n ctx
_ACTION = struct.Struct("<Bdq")  # type, value, event time
_LEN = struct.Struct("<H")
_TYPES_OF_MASK = [frozenset(t for t in ActionType if mask >> t & 1) for mask in range(1 << (max(ActionType) + 1))]


def _encode(key: bytes, value: object) -> bytes:
    """Bytes of an outbox entry, buffered actions or the meta (``commit`` encodes windows itself)."""
    if key.startswith(_O):
        return value
    if key.startswith(_B):
        return b"".join(_ACTION.pack(a.type, a.value, a.event_time_ms) for a in value)
    return json.dumps(_shallow_fields(value)).encode()  # JoinMeta, once per commit


def _encode_window(record: WindowRecord) -> bytes:
    imp = record.impression
    mask = 0
    for t in record.types:
        mask |= 1 << t
    head = _WINDOW.pack(
        imp.user_id,
        imp.position,
        imp.event_time_ms,
        record.close_ms,
        *record.labels,
        mask,
        record.version,
        record.closed,
        len(imp.context),
    )
    return head + _encode_context(imp.context) if imp.context else head


@lru_cache(maxsize=1 << 14)
def _encode_context(context: tuple[tuple[str, str], ...]) -> bytes:
    """Length-prefixed UTF-8 (name, value) pairs (memoised: contexts repeat)."""
    parts = []
    for name, value in context:
        for text in (name.encode(), value.encode()):
            parts.append(_LEN.pack(len(text)))
            parts.append(text)
    return b"".join(parts)


def _decode_window(raw: bytes, key: Key, closed_through: int | None) -> WindowRecord:
    """The record stored for key; closed if it was stored closed or closes at or before ``closed_through``."""
    user, position, event_ms, close_ms, l0, l1, l2, l3, mask, version, closed, n_ctx = _WINDOW.unpack_from(raw)
    if not closed and closed_through is not None and close_ms <= closed_through:
        closed, version = True, version or 1  # what closing it did (see ``RocksJoinState.close_window``)
    offset, context = _WINDOW.size, []
    for _ in range(n_ctx):
        pair = []
        for _ in range(2):
            (size,) = _LEN.unpack_from(raw, offset)
            offset += _LEN.size
            pair.append(raw[offset : offset + size].decode())
            offset += size
        context.append(tuple(pair))
    return WindowRecord(
        ImpressionEvent(key[0], user, key[1], position, event_ms, tuple(context)),
        close_ms,
        (l0, l1, l2, l3),
        _TYPES_OF_MASK[mask],
        version,
        bool(closed),
    )


def _decode_actions(raw: bytes, key: Key) -> tuple[ActionEvent, ...]:
    return tuple(
        ActionEvent(key[0], key[1], ActionType(kind), value, at) for kind, value, at in _ACTION.iter_unpack(raw)
    )


def _shallow_fields(value: object) -> dict:
    """Like ``dataclasses.asdict`` but without its deep copies."""
    out = {}
    for f in dataclass_fields(value):
        item = getattr(value, f.name)
        out[f.name] = _shallow_fields(item) if is_dataclass(item) else item
    return out
