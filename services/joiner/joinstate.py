"""The state behind ``EventJoin``: join records, buffered actions, a timer index and the join's metadata.

One small interface, ``JoinState``, and two implementations that behave identically:

- ``MemoryJoinState``: plain dicts and a heap; for tests and for joiners that may lose their state.
- ``RocksJoinState``: the same data in one RocksDB (rocksdict, raw mode), written only by ``commit()``.

The data model lives here too, because the RocksDB layout must be able to rebuild it: ``ImpressionEvent``,
``ActionEvent`` (plain dataclasses, converted from the ``freshet.events.v1`` protobufs at the edge),
``WindowRecord`` (one impression's join, open or closed), ``Timer`` and ``JoinMeta``.

RocksDB layout (keys are bytes; ``K`` = item id as order-preserving 8-byte big-endian + request id UTF-8):

- ``w/K`` -> window record (open window, or the tombstone of a closed one), packed binary (``_WINDOW``
  header, then the context as length-prefixed UTF-8 pairs);
- ``b/K`` -> buffered actions of a key whose impression has not arrived, packed (``_ACTION`` each);
- ``m/meta`` -> JSON watermark, maximum event time, next outbox sequence and counters;
- ``o/<seq>`` -> an outbox entry: encoded output (a ``SampleBatch``) committed with the state that
  produced it and deleted once JetStream acknowledged it (``seq`` order-preserving 8-byte big-endian).

Every mutation between two ``commit()`` calls is held in an in-memory overlay that reads see at once
(read-your-writes); ``commit()`` writes the overlay as ONE ``WriteBatch``, so after a crash the store is
exactly as of the last commit. ``close()`` does not commit: what was not committed is lost, as in a crash.
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


_ACTION_TYPES = {int(t): t for t in ActionType}


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
            context=_context(msg.context),
        )


def _context(context) -> tuple[tuple[str, str], ...]:
    """A protobuf context map as sorted (name, value) pairs (most events have none or one)."""
    n = len(context)
    if n == 0:
        return ()
    return tuple(context.items()) if n == 1 else tuple(sorted(context.items()))


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
        kind = _ACTION_TYPES.get(msg.type)
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
        self._live: set[tuple[int, str, int, str]] = set()
        self._heap: list[tuple[int, str, int, str]] = []  # may hold removed timers; only those in _live count

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
    def windows(self) -> Iterator[tuple[Key, int, bool]]:
        """(key, close_ms, closed) of every stored window record, for rebuilding timers."""

    @abstractmethod
    def buffers(self) -> Iterator[tuple[Key, tuple[ActionEvent, ...]]]:
        """Every key's buffered actions, for rebuilding timers."""

    # Timers live in process memory, in both implementations: they follow from the stored windows and
    # buffers, so ``EventJoin`` rebuilds them when it opens a state. The heap holds plain tuples
    # (at, kind, item id, request id), which order exactly as the encoded timers do (UTF-8 keeps the
    # code point order) and compare and hash faster.

    def add_timer(self, timer: Timer) -> None:
        """Schedule timer (adding one that exists is a no-op)."""
        entry = (timer.at_ms, timer.kind, timer.key[1], timer.key[0])
        if entry not in self._live:
            self._live.add(entry)
            heapq.heappush(self._heap, entry)

    def remove_timer(self, timer: Timer) -> None:
        """Unschedule timer (missing ones are ignored)."""
        self._live.discard((timer.at_ms, timer.kind, timer.key[1], timer.key[0]))

    def pop_due(self, up_to_ms: int) -> list[Timer]:
        """Remove and return every timer with ``at_ms <= up_to_ms``, ordered by (at_ms, kind, key)."""
        heap = self._heap
        if not heap or heap[0][0] > up_to_ms:
            return []
        out, live = [], self._live
        while heap and heap[0][0] <= up_to_ms:
            entry = heapq.heappop(heap)
            if entry in live:
                live.remove(entry)
                out.append(Timer(entry[0], entry[1], (entry[3], entry[2])))
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
    """

    def __init__(self, path: str, *, sync_writes: bool = False, cached_windows: int = 1 << 18) -> None:
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        table = BlockBasedOptions()
        table.set_bloom_filter(10, False)  # most reads look up keys that do not exist (new impressions)
        opts.set_block_based_table_factory(table)
        self.path = path
        self._db: Rdict | None = Rdict(path, opts)
        self._write_opts = WriteOptions()
        self._write_opts.sync = sync_writes
        super().__init__()
        self._pending: dict[bytes, object] = {}
        # Decoded window records as of recent commits (most windows are read again when they close):
        # saves a RocksDB read and a decode; bounded, oldest written first out.
        self._recent: dict[bytes, WindowRecord] = {}
        self._cached_windows = cached_windows
        # Keys that have buffered actions (few, short-lived): an impression of any other key needs no read.
        self._buffered: set[bytes] = set()
        it = self._db.iter()
        it.seek(_B)
        while it.valid() and it.key().startswith(_B):
            self._buffered.add(it.key()[len(_B) :])
            it.next()
        del it

    def _read(self, key: bytes) -> bytes | object | None:
        if key in self._pending:
            return self._pending[key]
        return self._open_db().get(key)

    def get_window(self, key: Key) -> WindowRecord | None:
        db_key = _W + encode_key(key)
        if db_key in self._pending:
            return self._pending[db_key]
        if (record := self._recent.get(db_key)) is not None:
            return record
        value = self._open_db().get(db_key)
        return None if value is None else _decode_window(value, key)

    def put_window(self, key: Key, record: WindowRecord) -> None:
        self._pending[_W + encode_key(key)] = record

    def delete_window(self, key: Key) -> None:
        self._pending[_W + encode_key(key)] = None

    def get_buffer(self, key: Key) -> tuple[ActionEvent, ...]:
        raw_key = encode_key(key)
        if raw_key not in self._buffered:
            return ()
        value = self._read(_B + raw_key)
        return _decode_actions(value, key) if isinstance(value, bytes) else value or ()

    def put_buffer(self, key: Key, actions: tuple[ActionEvent, ...]) -> None:
        raw_key = encode_key(key)
        if actions:
            self._buffered.add(raw_key)
        elif raw_key not in self._buffered:
            return  # nothing stored to delete
        self._pending[_B + raw_key] = tuple(actions) or None

    def windows(self) -> Iterator[tuple[Key, int, bool]]:
        for db_key, value in self._scan(_W):
            if isinstance(value, bytes):  # only the header: close time and the closed flag
                fields = _WINDOW.unpack_from(value)
                yield decode_key(db_key[len(_W) :]), fields[3], bool(fields[10])
            elif value is not None:
                yield value.impression.key, value.close_ms, value.closed

    def buffers(self) -> Iterator[tuple[Key, tuple[ActionEvent, ...]]]:
        for db_key, value in self._scan(_B):
            key = decode_key(db_key[len(_B) :])
            actions = _decode_actions(value, key) if isinstance(value, bytes) else value
            if actions:
                yield key, actions

    def _scan(self, prefix: bytes) -> list[tuple[bytes, object]]:
        """(key, value) of every stored key with prefix, the uncommitted overlay applied, in key order."""
        entries = {key: value for key, value in self._pending.items() if key.startswith(prefix)}
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
        for key, value in self._pending.items():
            if type(value) is WindowRecord:  # the common case first
                batch.put(key, _encode_window(value))
                recent.pop(key, None)
                recent[key] = value
            elif value is None:
                batch.delete(key)
                if key.startswith(_W):
                    recent.pop(key, None)
                elif key.startswith(_B):
                    self._buffered.discard(key[len(_B) :])
            else:
                batch.put(key, _encode(key, value))
        if len(batch):
            db.write(batch, self._write_opts)
        for _ in range(len(recent) - self._cached_windows):
            del recent[next(iter(recent))]
        self._pending.clear()

    def close(self) -> None:
        if self._db is None:
            return
        self._pending.clear()
        self._recent.clear()
        self._db.close()
        self._db = None

    def _open_db(self) -> Rdict:
        if self._db is None:
            raise RuntimeError(f"RocksJoinState {self.path} is closed")
        return self._db


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


def _decode_window(raw: bytes, key: Key) -> WindowRecord:
    user, position, event_ms, close_ms, l0, l1, l2, l3, mask, version, closed, n_ctx = _WINDOW.unpack_from(raw)
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
