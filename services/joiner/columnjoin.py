"""``ColumnJoin``: the joiner's event-time join over columns of events, compiled (``joinkernel``), with its
state in arrays and, optionally, in RocksDB.

The rules are ``EventJoin``'s (``services/joiner/eventjoin.py``, the reference; its docstring states them)
and so is the interface the joiner needs (``advance``, ``stage_output``, ``output_delivered``,
``pending_outputs``, ``commit``, ``counters``, ``epoch``), but events come in as columns
(``on_columns``) and samples go out as columns (``JoinedColumns``), so no Python object is made per event:
request ids are numbered once per message (a dict lookup per distinct request), and the kernel finds each
key (request number, item) in its own hash table. ``on_events`` /
``on_impression`` / ``on_action`` take and give the reference's tuples, for tests and tools.

Memory: every key with a window or buffered actions holds a slot from its impression until ``close +
retention`` (65 s with the joiner's defaults): ~110 B of slot arrays, 16-64 B of hash table and a share of
its request's entry (a dict entry and the request id string, ~100 B per request), ~170 B in all, e.g.
~550 MB for 50 k impressions/s. Contexts are interned (an id per distinct context, kept for
the life of the state): fine for categorical contexts, not for a context value unique per request.

RocksDB layout (``path``; written only by ``commit()``, as one ``WriteBatch``, so a crash restores the last
commit exactly):

- ``v/<n>`` -> segment ``n``: the slots written by one commit (``_REC`` records with their item, their
  buffered actions) and the keys deleted since the previous one, naming request ids by their index in
  the segment's table of them (a request's keys share one entry). A key's latest record is the one in the newest
  segment; a segment is dropped once none of its records is the latest of a live key and no older segment
  is left. A window that closes is not written again: a stored open window whose close is at or before the
  committed watermark is closed (every window the watermark reaches closes before a commit);
- ``c/<id>`` -> a context: JSON [[name, value], ...];
- ``m/meta`` -> JSON watermark, maximum event time, next outbox sequence, counters, epoch;
- ``o/<seq>`` -> an outbox entry: an encoded output (a ``SampleBatch``) committed with the state that produced
  it, deleted once JetStream acknowledged it.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

import numpy as np
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from services.joiner import joinkernel as K
from services.joiner.eventjoin import COUNTERS, JoinConfig, JoinedSample, negative_kept
from services.joiner.joinstate import ActionEvent, ActionType, ImpressionEvent, Key

_OFFSET = 1 << 63
_V, _C, _O, _META = b"v/", b"c/", b"o/", b"m/meta"
_OTHER_LAYOUTS = (b"s/", b"w/", b"b/")  # the layouts of the joiner before the compiled join
_REC = np.dtype(
    [
        ("item", "<i8"), ("user", "<i8"), ("time", "<i8"), ("close", "<i8"), ("labels", "<f8", (4,)),
        ("pos", "<i4"), ("ctx", "<i4"), ("types", "<i4"), ("version", "<i4"), ("state", "i1"), ("keep", "i1"),
        ("actions", "<i4"), ("request", "<i4"),
    ]
)  # fmt: skip
_ACT = np.dtype([("type", "i1"), ("value", "<f8"), ("time", "<i8")])
_DEL = np.dtype([("item", "<i8"), ("request", "<i4")])
_SEGMENT_HEAD = struct.Struct("<5q")  # records, actions, deletions, request ids, bytes of request ids


def _i64(value: int) -> bytes:
    return (value + _OFFSET).to_bytes(8, "big")


@dataclass(frozen=True)
class JoinedColumns:
    """Samples as columns: sample ``i`` is key ``(request_ids[i], item_ids[i])`` at ``versions[i]``."""

    request_ids: list[str]
    item_ids: np.ndarray  # int64
    user_ids: np.ndarray  # int64
    positions: np.ndarray  # int64
    event_time_ms: np.ndarray  # int64
    contexts: list[tuple[tuple[str, str], ...]]
    label_vectors: np.ndarray  # float64 [n, 4]
    versions: np.ndarray  # int32
    weights: np.ndarray  # float64
    corrections: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def sample_ids(self) -> list[str]:
        return [
            f"{r}:{i}:v{v}"
            for r, i, v in zip(self.request_ids, self.item_ids.tolist(), self.versions.tolist(), strict=True)
        ]

    def samples(self) -> list[JoinedSample]:
        """As the reference's tuples."""
        out = []
        for j, (sample_id, rid, item, version) in enumerate(
            zip(self.sample_ids, self.request_ids, self.item_ids.tolist(), self.versions.tolist(), strict=True)
        ):
            imp = ImpressionEvent(
                rid,
                int(self.user_ids[j]),
                item,
                int(self.positions[j]),
                int(self.event_time_ms[j]),
                self.contexts[j],
            )
            labels = tuple(self.label_vectors[j].tolist())
            out.append(
                JoinedSample(
                    sample_id, (rid, item), labels, version, float(self.weights[j]),
                    bool(self.corrections[j]), imp,
                )
            )  # fmt: skip
        return out

    _ARRAYS = (
        "item_ids",
        "user_ids",
        "positions",
        "event_time_ms",
        "label_vectors",
        "versions",
        "weights",
        "corrections",
    )

    def take(self, lo: int, hi: int) -> JoinedColumns:
        """Samples ``lo`` to ``hi``."""
        return dataclasses.replace(
            self,
            request_ids=self.request_ids[lo:hi],
            contexts=self.contexts[lo:hi],
            **{name: getattr(self, name)[lo:hi] for name in self._ARRAYS},
        )

    @staticmethod
    def concat(parts: list[JoinedColumns]) -> JoinedColumns:
        """The samples of parts (at least one), in order."""
        full = [p for p in parts if len(p)]
        if len(full) <= 1:
            return full[0] if full else parts[0]
        return JoinedColumns(
            request_ids=[r for p in full for r in p.request_ids],
            contexts=[c for p in full for c in p.contexts],
            **{name: np.concatenate([getattr(p, name) for p in full]) for name in JoinedColumns._ARRAYS},
        )


class ColumnJoin:
    """The join of one partition (see the module docstring). ``path`` None: state in memory only.

    Args:
        config: join settings.
        path: RocksDB directory of the state (created if missing); reopening it restores the last commit.
        sync_writes: fsync the WAL on commit.
        initial_keys: slots to start with (they grow as needed).
    """

    def __init__(
        self,
        config: JoinConfig,
        path: str | None = None,
        *,
        sync_writes: bool = False,
        initial_keys: int = 1 << 16,
    ) -> None:
        self.config = config
        self.path = path
        self._db: Rdict | None = None
        self._write_opts = WriteOptions()
        self._write_opts.sync = sync_writes
        # Request ids are numbered (rid) while a slot holds a key of theirs (``_r_refs`` counts them).
        self._rids: dict[str, int] = {}
        self._rid_str: list[str | None] = []
        self._free_rids: list[int] = []
        self._r_refs = np.zeros(1024, np.int64)
        self._sc = np.zeros(K.SCALARS, np.int64)
        self._cap = 0
        self._ht = np.full(2 * (1 << max(0, initial_keys - 1).bit_length()), K.EMPTY, np.int64)
        self._grow_slots(max(1, initial_keys))
        self._h = [np.empty(1024, np.int64), np.empty(1024, np.int64), np.empty(1024, np.int64)]
        self._q = [np.empty(1024, np.int64), np.empty(1024, np.int64)]  # the FORGET ring (see joinkernel)
        self._pool = [
            np.empty(256, np.int64),
            np.empty(256, np.float64),
            np.empty(256, np.int64),
            np.empty(256, np.int64),
        ]
        self._out_cap = 0
        self._grow_out(1024)
        self._released = np.empty(1024, np.int64)
        self._sc[K.S_POOL_FREE] = -1
        self._counters = np.zeros(len(COUNTERS), np.int64)
        self.contexts: list[tuple[tuple[str, str], ...]] = [()]
        self._context_ids: dict[tuple[tuple[str, str], ...], int] = {(): 0}
        self._stored_contexts = 1  # contexts[:n] are in RocksDB (the empty one never is)
        # RocksDB bookkeeping (besides each slot's ``where``: the segment holding its latest record, -1: none):
        # live records per segment, segments in use [head, next), keys deleted since the last commit, outbox
        # changes.
        self._live: dict[int, int] = {}
        self._head = self._next_segment = 1
        # Keys deleted since the last commit, in chunks: (request ids, index into them per key, item per key).
        self._deleted: list[tuple[list[str], np.ndarray, np.ndarray]] = []
        self._outbox: dict[int, bytes | None] = {}
        self._arrivals = 0
        self._last_arrival_ms: int | None = None
        self._idle_mark_ms = 0
        meta = {}
        if path is not None:
            opts = Options(raw_mode=True)
            opts.create_if_missing(True)
            self._db = Rdict(path, opts)
            if any(next(self._scan(prefix), None) is not None for prefix in _OTHER_LAYOUTS):
                self.close()
                raise RuntimeError(f"{path} holds join state in an older layout; start afresh")
            raw = self._db.get(_META)
            meta = json.loads(raw) if raw is not None else {}
        self.epoch: str = meta.get("epoch") or secrets.token_hex(6)
        self._next_outbox_seq: int = meta.get("next_outbox_seq", 1)
        for i, name in enumerate(COUNTERS):
            self._counters[i] = meta.get("counters", {}).get(name, 0)
        if meta.get("watermark_ms") is not None:
            self._sc[K.S_HAS_WM], self._sc[K.S_WM] = 1, meta["watermark_ms"]
        if meta.get("max_event_ms") is not None:
            self._sc[K.S_HAS_MAX], self._sc[K.S_MAX] = 1, meta["max_event_ms"]
        if self._db is not None:
            self._restore()

    # -- the join ------------------------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        return dict(zip(COUNTERS, self._counters.tolist(), strict=True))

    @property
    def watermark_ms(self) -> int | None:
        return int(self._sc[K.S_WM]) if self._sc[K.S_HAS_WM] else None

    @property
    def live_keys(self) -> int:
        """Keys with a window or buffered actions (each holds a slot)."""
        return int(self._sc[K.S_LIVE])

    def on_columns(
        self,
        kinds: np.ndarray,
        requests: list[str],
        request_index: np.ndarray,
        item_ids: np.ndarray,
        user_ids: np.ndarray,
        positions: np.ndarray,
        event_time_ms: np.ndarray,
        action_types: np.ndarray,
        values: np.ndarray,
        context_ids: np.ndarray,
    ) -> JoinedColumns:
        """Joins events given as columns (all valid: kind 1 or 2, a known action type), in order.

        Event ``i``'s request id is ``requests[request_index[i]]``; ``context_ids`` are ids of
        ``intern_context``.
        """
        n = len(kinds)
        numbers, fresh = self._number_requests(requests)
        rids = numbers[np.asarray(request_index, np.int64)]
        rate = self.config.negative_rate
        if rate >= 1.0:
            keep = np.ones(n, np.bool_)
        else:
            seed, table = self.config.seed, requests
            keep = np.fromiter(
                (
                    k == K.K_IMPRESSION and negative_kept((table[r], item), rate, seed)
                    for k, r, item in zip(kinds.tolist(), request_index.tolist(), item_ids.tolist(), strict=True)
                ),
                np.bool_,
                n,
            )
        self._reserve(n)
        self._join(
            # Copies: decoded columns are read-only views, which numba would compile a second kernel for.
            np.array(kinds, np.int64), rids, np.array(item_ids, np.int64), np.array(event_time_ms, np.int64),
            np.array(user_ids, np.int64), np.array(positions, np.int64), np.array(context_ids, np.int64),
            np.array(action_types, np.int64), np.array(values, np.float64), keep,
        )  # fmt: skip
        self._arrivals += n
        out = self._take_output()
        self._release(fresh)
        return out

    def _number_requests(self, requests: list[str]) -> tuple[np.ndarray, list[int]]:
        """The rid of each of requests (int64), numbering new ones, and the new rids."""
        get = self._rids.get
        rids = [get(r, -1) for r in requests]
        fresh = []
        if -1 in rids:
            for j, rid in enumerate(rids):
                if rid < 0:
                    request = requests[j]
                    rid = get(request, -1)  # listed twice in requests
                    if rid < 0:
                        rid = self._new_rid(request)
                        fresh.append(rid)
                    rids[j] = rid
        return np.array(rids, np.int64), fresh

    def _new_rid(self, request: str) -> int:
        if self._free_rids:
            rid = self._free_rids.pop()
            self._rid_str[rid] = request
        else:
            rid = len(self._rid_str)
            self._rid_str.append(request)
            if rid >= len(self._r_refs):
                self._r_refs = np.concatenate([self._r_refs, np.zeros(len(self._r_refs), np.int64)])
        self._rids[request] = rid
        return rid

    def advance(self, now_processing_ms: int, input_drained: bool = True) -> JoinedColumns:
        """As ``EventJoin.advance``: note processing time, move an idle watermark, fire what is due."""
        if self._arrivals or self._last_arrival_ms is None or not input_drained:
            self._arrivals = 0
            self._last_arrival_ms = self._idle_mark_ms = now_processing_ms
        elif self._sc[K.S_HAS_WM] and now_processing_ms - self._last_arrival_ms >= self.config.idle_timeout_ms:
            step = now_processing_ms - self._idle_mark_ms
            if step > 0:
                self._sc[K.S_WM] += step
                self._idle_mark_ms = now_processing_ms
        self._reserve(0)
        c = self.config
        self._run(K.fire, c.window_ms, c.retention_ms, c.negative_rate)
        out = self._take_output()
        self._release([])
        return out

    def note_activity(self, now_processing_ms: int) -> None:
        """Counts as an arrival for idleness (see ``advance``) without moving anything: for a caller that was
        held up with events in hand (e.g. by back-pressure), so the wait does not make the partition idle."""
        self._arrivals = 0
        self._last_arrival_ms = self._idle_mark_ms = now_processing_ms

    def intern_context(self, context: tuple[tuple[str, str], ...]) -> int:
        """The id of a context (sorted (name, value) pairs), new ones numbered from the next free id."""
        cid = self._context_ids.get(context)
        if cid is None:
            cid = self._context_ids[context] = len(self.contexts)
            self.contexts.append(context)
        return cid

    @staticmethod
    def warm() -> None:
        """Loads (or compiles) the compiled kernels now, on a throwaway join with no events, rather than in
        the first join step: a few hundred milliseconds once per process."""
        join = ColumnJoin(JoinConfig(), initial_keys=1)
        empty = np.zeros(0, np.int64)
        join._reserve(0)
        join._join(*[empty] * 8, np.zeros(0, np.float64), np.zeros(0, np.bool_))
        join.advance(0)
        s = join._s  # and those growing and restoring a state use
        K.rehash(join._ht, s["state"], s["rid"], s["item"])
        K.add_keys(join._ht, s["rid"], s["item"], s["free"], join._r_refs, join._sc, empty, empty, empty)
        join._timer(0, K.T_CLOSE, 0)
        K.ring_push(*join._q, join._sc, 0, 0)

    # -- the reference's interface (tests, tools) ------------------------------------------------------

    def on_events(self, events: Iterable[ImpressionEvent | ActionEvent]) -> list[JoinedSample]:
        events = list(events)
        if not events:
            return []
        imp = [type(e) is ImpressionEvent for e in events]
        requests = list(dict.fromkeys(e.request_id for e in events))
        number = {r: i for i, r in enumerate(requests)}
        cols = self.on_columns(
            np.array([K.K_IMPRESSION if i else K.K_ACTION for i in imp], np.int64),
            requests,
            np.array([number[e.request_id] for e in events], np.int64),
            np.array([e.item_id for e in events], np.int64),
            np.array([e.user_id if i else 0 for e, i in zip(events, imp, strict=True)], np.int64),
            np.array([e.position if i else 0 for e, i in zip(events, imp, strict=True)], np.int64),
            np.array([e.event_time_ms for e in events], np.int64),
            np.array([0 if i else int(e.type) for e, i in zip(events, imp, strict=True)], np.int64),
            np.array([0.0 if i else float(e.value) for e, i in zip(events, imp, strict=True)], np.float64),
            np.array(
                [self.intern_context(e.context) if i else 0 for e, i in zip(events, imp, strict=True)], np.int64
            ),
        )
        return cols.samples()

    def on_impression(self, ev: ImpressionEvent) -> list[JoinedSample]:
        return self.on_events([ev])

    def on_action(self, ev: ActionEvent) -> list[JoinedSample]:
        return self.on_events([ev])

    def windows(self) -> list[tuple[Key, int, bool]]:
        """(key, close_ms, closed) of every window."""
        s = self._s
        state = s["state"]
        return [
            ((self._rid_str[s["rid"][x]], int(s["item"][x])), int(s["close"][x]), bool(state[x] == K.CLOSED))
            for x in np.flatnonzero((state == K.OPEN) | (state == K.CLOSED)).tolist()
        ]

    # -- outbox and commit -----------------------------------------------------------------------------

    def stage_output(self, data: bytes) -> int:
        seq = self._next_outbox_seq
        self._next_outbox_seq += 1
        self._outbox[seq] = bytes(data)
        return seq

    def output_delivered(self, seq: int) -> None:
        self._outbox[seq] = None

    def pending_outputs(self) -> list[tuple[int, bytes]]:
        stored = {}
        if self._db is not None:
            stored = {int.from_bytes(k[len(_O) :], "big") - _OFFSET: v for k, v in self._scan(_O)}
        stored.update(self._outbox)
        return sorted((seq, data) for seq, data in stored.items() if data is not None)

    def commit(self) -> None:
        """Writes every change since the last commit, and the meta, as one RocksDB write (no-op in memory).

        Failure-atomic: the bookkeeping of what RocksDB holds changes only once the write succeeded, so
        after a failed commit the next one writes everything since the last successful one.
        """
        s = self._s
        dirty_all = s["dirty_list"][: int(self._sc[K.S_DIRTY])].copy()
        if self._db is None:
            self._outbox = {k: v for k, v in self._outbox.items() if v is not None}
            self._committed(dirty_all)
            return
        batch = WriteBatch(raw_mode=True)
        dirty = dirty_all[s["state"][dirty_all] != K.FREE]
        seq, head, live = self._next_segment, self._head, {}
        if len(dirty) or self._deleted:
            batch.put(_V + _i64(seq), self._segment(dirty))
            previous = s["where"][dirty]
            live = dict(zip(*np.unique(previous[previous >= 0], return_counts=True), strict=True))
            live = {int(old): self._live[int(old)] - int(count) for old, count in live.items()}
            live[seq] = len(dirty)
            seq += 1
        while head < seq and not live.get(head, self._live.get(head)):  # live records per segment, after it
            batch.delete(_V + _i64(head))
            head += 1
        for cid in range(self._stored_contexts, len(self.contexts)):
            batch.put(_C + _i64(cid), json.dumps(self.contexts[cid]).encode())
        for out_seq, data in self._outbox.items():
            if data is None:
                batch.delete(_O + _i64(out_seq))
            else:
                batch.put(_O + _i64(out_seq), data)
        meta = {
            "max_event_ms": int(self._sc[K.S_MAX]) if self._sc[K.S_HAS_MAX] else None,
            "watermark_ms": self.watermark_ms,
            "counters": self.counters,
            "next_outbox_seq": self._next_outbox_seq,
            "epoch": self.epoch,
        }
        batch.put(_META, json.dumps(meta, separators=(",", ":")).encode())
        self._db.write(batch, self._write_opts)
        s["where"][dirty] = self._next_segment
        self._live.update(live)
        for dropped in range(self._head, head):
            self._live.pop(dropped, None)
        self._head, self._next_segment = head, seq
        self._stored_contexts = len(self.contexts)
        self._outbox.clear()
        self._committed(dirty_all)

    def _committed(self, dirty: np.ndarray) -> None:
        """After a successful commit: the slots it wrote are clean, the deletions it wrote done."""
        self._s["dirty"][dirty] = 0
        self._sc[K.S_DIRTY] = 0
        self._deleted.clear()

    def close(self) -> None:
        """Releases RocksDB WITHOUT committing (what was not committed is lost, as in a crash)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> ColumnJoin:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- slots -------------------------------------------------------------------------------------------

    # Per slot, as small as the values allow: the kernel touches a dozen of them per new key.
    _SLOT_FIELDS = (
        ("state", np.int8), ("user", np.int64), ("pos", np.int32), ("time", np.int64), ("close", np.int64),
        ("ctx", np.int32), ("types", np.int8), ("version", np.int32), ("keep", np.bool_), ("bhead", np.int32),
        ("btail", np.int32), ("dirty", np.int8), ("dirty_list", np.int32), ("where", np.int64), ("rid", np.int64),
        ("item", np.int64), ("free", np.int32),
    )  # fmt: skip

    def _grow_slots(self, cap: int) -> None:
        """Grows the slot arrays to cap slots; the new ones go on the free stack (lowest on top)."""
        old, n = getattr(self, "_s", None), self._cap
        s = {name: np.zeros(cap, dtype) for name, dtype in self._SLOT_FIELDS}
        s["labels"] = np.zeros((cap, 4), np.float64)
        s["bhead"][:] = s["btail"][:] = s["where"][:] = -1
        free = int(self._sc[K.S_FREE])
        if old is not None:
            for name, array in old.items():
                s[name][:n] = array[:n]
        s["free"][free : free + cap - n] = np.arange(cap - 1, n - 1, -1)
        self._sc[K.S_FREE] = free + cap - n
        self._s = s
        self._cap = cap

    def _release(self, fresh_rids: list[int]) -> None:
        """After a call: the slots it released go back on the free stack (a stored one's key is deleted with
        the next commit), and the rids no slot holds any more are forgotten (new ones the call left unused
        too)."""
        count = int(self._sc[K.S_RELEASED])
        self._sc[K.S_RELEASED] = 0
        if count:
            s = self._s
            released = self._released[:count].copy()
            stored = released[s["where"][released] >= 0]
            if len(stored):
                where = s["where"][stored]
                for seq, n in zip(*np.unique(where, return_counts=True), strict=True):
                    self._live[int(seq)] -= int(n)
                s["where"][stored] = -1
                rids, index = np.unique(s["rid"][stored], return_inverse=True)
                self._deleted.append(([self._rid_str[r] for r in rids.tolist()], index, s["item"][stored]))
            s["labels"][released] = 0.0
            free = int(self._sc[K.S_FREE])
            s["free"][free : free + count] = released
            self._sc[K.S_FREE] = free + count
            fresh_rids = [*fresh_rids, *np.unique(s["rid"][released]).tolist()]
        refs = self._r_refs
        for rid in fresh_rids:
            request = self._rid_str[rid]
            if refs[rid] == 0 and request is not None:
                del self._rids[request]
                self._rid_str[rid] = None
                self._free_rids.append(rid)

    def _reserve(self, n: int) -> None:
        """Grows the slots, hash table, heap, action pool and output arrays so that a call with n events
        cannot overflow them."""
        live = self.live_keys
        if self._sc[K.S_FREE] < n:
            self._grow_slots(max(4 * self._cap, self._cap + n))  # 4x: fewer, cheaper copies while a backlog grows
        if 2 * (live + n) > len(self._ht):
            size = len(self._ht)
            while 2 * (live + n) > size:
                size *= 4
            self._ht = np.full(size, K.EMPTY, np.int64)
            K.rehash(self._ht, self._s["state"], self._s["rid"], self._s["item"])
        need = int(self._sc[K.S_HEAP]) + n + 1  # a CLOSE or an ORPHAN timer per event at most
        if need > len(self._h[0]):
            size = max(need, 2 * len(self._h[0]))
            self._h = [np.concatenate([h, np.empty(size - len(h), np.int64)]) for h in self._h]
        queued, head = int(self._sc[K.S_QLEN]), int(self._sc[K.S_QHEAD])
        if queued + live + n + 1 > len(self._q[0]):  # a call closes at most every window it sees
            size = max(queued + live + n + 1, 2 * len(self._q[0]))
            order = (head + np.arange(queued)) % len(self._q[0])
            self._q = [np.concatenate([q[order], np.empty(size - queued, np.int64)]) for q in self._q]
            self._sc[K.S_QHEAD] = 0
        need = int(self._sc[K.S_POOL_NEXT]) + n + 1
        if need > len(self._pool[0]):
            size = max(need, 2 * len(self._pool[0]))
            self._pool = [np.concatenate([p, np.empty(size - len(p), p.dtype)]) for p in self._pool]
        if 2 * n + live + 1 > self._out_cap:
            self._grow_out(max(2 * n + live + 1, 2 * self._out_cap))
        if n + live + 1 > len(self._released):
            self._released = np.empty(max(n + live + 1, 2 * len(self._released)), np.int64)

    def _grow_out(self, cap: int) -> None:
        self._out_cap = cap
        self._o = {
            "rid": np.empty(cap, np.int64), "item": np.empty(cap, np.int64), "version": np.empty(cap, np.int64), "weight": np.empty(cap, np.float64),
            "correction": np.empty(cap, np.bool_), "user": np.empty(cap, np.int64), "pos": np.empty(cap, np.int64),
            "time": np.empty(cap, np.int64), "ctx": np.empty(cap, np.int64), "labels": np.empty((cap, 4), np.float64),
        }  # fmt: skip

    def _run(self, kernel, *head) -> None:
        s, o = self._s, self._o
        kernel(
            *head,
            s["state"], s["user"], s["pos"], s["time"], s["close"], s["ctx"], s["labels"], s["types"], s["version"],
            s["keep"], s["bhead"], s["btail"], s["rid"], s["item"], self._ht, s["free"], self._r_refs,
            *self._pool, *self._h, *self._q, self._counters, self._sc, s["dirty"], s["dirty_list"], self._released,
            o["rid"], o["item"], o["version"], o["weight"], o["correction"], o["user"], o["pos"], o["time"], o["ctx"],
            o["labels"],
        )  # fmt: skip

    def _join(self, *events: np.ndarray) -> None:
        """The kernel over events (kinds, rids, items, times, users, positions, contexts, types, values, keep)."""
        c = self.config
        self._run(
            K.join_events, c.window_ms, c.allowed_lateness_ms, c.retention_ms, c.negative_rate,
            c.late_policy == "correct", *events,
        )  # fmt: skip

    def _take_output(self) -> JoinedColumns:
        n = int(self._sc[K.S_OUT])
        self._sc[K.S_OUT] = 0
        o, rid_str, contexts = self._o, self._rid_str, self.contexts
        return JoinedColumns(
            request_ids=[rid_str[r] for r in o["rid"][:n].tolist()],
            item_ids=o["item"][:n].copy(),
            user_ids=o["user"][:n].copy(),
            positions=o["pos"][:n].copy(),
            event_time_ms=o["time"][:n].copy(),
            contexts=[contexts[c] for c in o["ctx"][:n].tolist()],
            label_vectors=o["labels"][:n].copy(),
            versions=o["version"][:n].astype(np.int32),
            weights=o["weight"][:n].copy(),
            corrections=o["correction"][:n].copy(),
        )

    # -- RocksDB -----------------------------------------------------------------------------------------

    def _scan(self, prefix: bytes):
        it = self._db.iter()
        it.seek(prefix)
        while it.valid() and it.key().startswith(prefix):
            yield it.key(), it.value()
            it.next()
        del it

    def _segment(self, slots: np.ndarray) -> bytes:
        """A segment: the records of ``slots`` and the keys deleted since the last commit."""
        s, rid_str = self._s, self._rid_str
        recs = np.zeros(len(slots), _REC)
        rids, recs["request"] = np.unique(s["rid"][slots], return_inverse=True)  # one string per request
        requests = [rid_str[r] for r in rids.tolist()]
        recs["item"] = s["item"][slots]
        for field, name in (("user", "user"), ("time", "time"), ("close", "close"), ("pos", "pos"), ("ctx", "ctx"),
                            ("types", "types"), ("version", "version"), ("state", "state"), ("keep", "keep")):  # fmt: skip
            recs[field] = s[name][slots]
        recs["labels"] = s["labels"][slots]
        actions = []
        for j in np.flatnonzero(s["state"][slots] == K.BUFFER).tolist():  # few: actions before their impression
            a = int(s["bhead"][slots[j]])
            while a >= 0:
                actions.append((self._pool[0][a], self._pool[1][a], self._pool[2][a]))
                recs["actions"][j] += 1
                a = int(self._pool[3][a])
        deleted = np.zeros(sum(len(items) for _, _, items in self._deleted), _DEL)
        at = 0
        for names, index, items in self._deleted:
            deleted["item"][at : at + len(items)] = items
            deleted["request"][at : at + len(items)] = index + len(requests)
            requests += names
            at += len(items)
        raw = [r.encode() for r in requests]
        blob = b"".join(raw)
        return b"".join(
            (
                _SEGMENT_HEAD.pack(len(recs), len(actions), len(deleted), len(raw), len(blob)),
                np.array([len(r) for r in raw], "<i4").tobytes(), blob, recs.tobytes(), np.array(actions, _ACT).tobytes(),
                deleted.tobytes(),
            )
        )  # fmt: skip

    def _restore(self) -> None:
        """Rebuilds the slots, timers and bookkeeping from the committed segments and contexts."""
        for raw_id, raw in self._scan(_C):
            cid = int.from_bytes(raw_id[len(_C) :], "big") - _OFFSET
            while len(self.contexts) <= cid:
                self.contexts.append(())
            self.contexts[cid] = tuple(tuple(pair) for pair in json.loads(raw))
        self._context_ids = {c: i for i, c in enumerate(self.contexts)}
        self._stored_contexts = len(self.contexts)
        latest: dict[Key, tuple[int, np.void, list]] = {}
        segments = []
        for raw_seq, raw in self._scan(_V):
            seq = int.from_bytes(raw_seq[len(_V) :], "big") - _OFFSET
            segments.append(seq)
            n_rec, n_act, n_del, n_req, blob_bytes = _SEGMENT_HEAD.unpack_from(raw)
            at = _SEGMENT_HEAD.size
            sizes = np.frombuffer(raw, "<i4", n_req, at).tolist()
            at += 4 * n_req
            ends = np.cumsum(sizes).tolist()
            requests = [raw[at + end - size : at + end].decode() for size, end in zip(sizes, ends, strict=True)]
            at += blob_bytes
            recs = np.frombuffer(raw, _REC, n_rec, at)
            at += recs.nbytes
            acts = np.frombuffer(raw, _ACT, n_act, at)
            at += acts.nbytes
            dels = np.frombuffer(raw, _DEL, n_del, at)
            for item, request in zip(dels["item"].tolist(), dels["request"].tolist(), strict=True):
                latest.pop((requests[request], item), None)
            a = 0
            for j, (item, request, n_actions) in enumerate(
                zip(recs["item"].tolist(), recs["request"].tolist(), recs["actions"].tolist(), strict=True)
            ):
                latest[(requests[request], item)] = (seq, recs[j], acts[a : a + n_actions].tolist())
                a += n_actions
        if segments:
            self._head, self._next_segment = segments[0], segments[-1] + 1
        wm = self.watermark_ms
        c = self.config
        keys = list(latest)
        self._reserve(len(keys) + sum(len(actions) for _, _, actions in latest.values()))
        numbers, _ = self._number_requests([request for request, _ in keys])
        slots = np.empty(len(keys), np.int64)
        s = self._s  # grown enough above: nothing below grows it
        K.add_keys(
            self._ht, s["rid"], s["item"], s["free"], self._r_refs, self._sc, numbers,
            np.array([item for _, item in keys], np.int64), slots,
        )  # fmt: skip
        forget = []  # (due, slot) of closed windows: into the FORGET ring in due order
        for key, slot, (seq, rec, actions) in zip(keys, slots.tolist(), latest.values(), strict=True):
            for name in ("user", "time", "close", "pos", "ctx", "types", "version", "state"):
                s[name][slot] = rec[name]
            s["labels"][slot] = rec["labels"]
            s["where"][slot] = seq
            self._live[seq] = self._live.get(seq, 0) + 1
            state = int(rec["state"])
            if state == K.OPEN and wm is not None and rec["close"] <= wm:
                state = s["state"][slot] = K.CLOSED  # closed before the commit (see the module docstring)
                s["version"][slot] = max(1, int(rec["version"]))
            if state == K.OPEN:
                self._timer(int(rec["close"]), K.T_CLOSE, slot)
                # Down-sampling as the reference decides it, at the close, with the settings then in force.
                s["keep"][slot] = negative_kept(key, c.negative_rate, c.seed)
            elif state == K.CLOSED:
                forget.append((int(rec["close"]) + c.retention_ms, slot))
            else:
                for kind, value, at in actions:
                    self._push_action(slot, kind, value, at)
                for deadline in sorted({at + c.window_ms for _, _, at in actions}):
                    self._timer(deadline, K.T_ORPHAN, slot)
        for at, slot in sorted(forget):
            K.ring_push(*self._q, self._sc, at, slot)

    def _timer(self, at: int, kind: int, slot: int) -> None:
        """Schedules a timer (room reserved by the caller)."""
        K.heap_push(*self._h, self._sc, at, kind, slot)

    def _push_action(self, slot: int, kind: int, value: float, at: int) -> None:
        """Appends a buffered action to slot's (room reserved by the caller)."""
        a = int(self._sc[K.S_POOL_NEXT])
        self._sc[K.S_POOL_NEXT] += 1
        b_type, b_value, b_time, b_next = self._pool
        b_type[a], b_value[a], b_time[a], b_next[a] = kind, value, at, -1
        s = self._s
        if s["bhead"][slot] < 0:
            s["bhead"][slot] = a
        else:
            b_next[s["btail"][slot]] = a
        s["btail"][slot] = a


__all__ = ["ActionType", "ColumnJoin", "JoinedColumns"]
