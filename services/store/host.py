"""The host tier: a collisionless open-addressing index over a row slab, compiled with numba.

Layout, chosen for memory and for lookup locality:

- ``index``: int32 [2^k] slots holding a row number, ``EMPTY`` or ``TOMB`` (erased). No key is
  stored in the index: a probe compares the fid kept at the start of the row itself, so a hit
  costs one index read and one row read, and the index costs 4 B / load factor per fid.
- ``rows``: int32 [capacity, 2 + width] records: fid (two int32 words) then ``width`` float32
  words (the value followed by the optimizer state), viewed as float32 for arithmetic.
- headers in parallel arrays: version int64 (-1 marks a free row), freq uint32, last_seen uint32
  (seconds).

The slab grows by 1/8 at a time, so at most about 12 % of it is ever unused.

Two fids never share a row: the fid is compared exactly on every probe (the hash only picks
where the probe starts). Erased slots become tombstones, reused by later inserts and dropped
when the index is rebuilt.
"""

from __future__ import annotations

import numba
import numpy as np

from services.store.prefetch import prefetch1, prefetch2

EMPTY = np.int32(-1)
TOMB = np.int32(-2)
FID_WORDS = 2


@numba.njit(cache=True, inline="always")
def _mix(fid: np.int64) -> np.uint64:
    x = np.uint64(fid)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


@numba.njit(cache=True, inline="always")
def _fid_at(rows: np.ndarray, r: np.int64) -> np.int64:
    return (np.int64(rows[r, 1]) << np.int64(32)) | (np.int64(rows[r, 0]) & np.int64(0xFFFFFFFF))


@numba.njit(cache=True, inline="always")
def _probe(index, rows, h, mask, k):
    """Linear probe for fid ``k`` from slot ``h``: (slot, row), row -1 when absent. Skips tombstones."""
    while True:
        r = index[h]
        if r == EMPTY:
            return h, np.int64(-1)
        if r != TOMB and _fid_at(rows, r) == k:
            return h, np.int64(r)
        h = (h + np.uint64(1)) & mask


_AHEAD = 8  # keys between prefetching a row and reading it (index slots: twice that)


@numba.njit(cache=True, nogil=True)
def _find_gather(index, rows, floats, fids, col0, out_rows, out):
    """Rows of fids and their float columns [col0, col0 + out.shape[1]); misses leave ``out`` as is.

    Pipelined: the index slot of key i + 2D and the row of key i + D are prefetched before key i
    is probed, so its reads hit the cache (see ``services.store.prefetch``).
    """
    mask = np.uint64(index.shape[0] - 1)
    n = fids.shape[0]
    d = out.shape[1]
    hs = np.empty(n, np.uint64)
    for i in range(n):
        hs[i] = _mix(fids[i]) & mask
    for i in range(min(n, 2 * _AHEAD)):
        prefetch1(index, hs[i])
    for i in range(n):
        if i + 2 * _AHEAD < n:
            prefetch1(index, hs[i + 2 * _AHEAD])
        if i + _AHEAD < n:
            ahead = index[hs[i + _AHEAD]]
            if ahead >= 0:
                prefetch2(rows, ahead, 0)
                prefetch2(floats, ahead, col0 + d - 1)
        r = _probe(index, rows, hs[i], mask, fids[i])[1]
        out_rows[i] = r
        if r >= 0:
            for j in range(d):
                out[i, j] = floats[r, col0 + j]


@numba.njit(cache=True, nogil=True)
def _insert(index, rows, fids, free, free_top, next_row, out):
    """Inserts fids (distinct, not present); rows come from the free stack first. Returns (free_top, next_row)."""
    mask = np.uint64(index.shape[0] - 1)
    for i in range(fids.shape[0]):
        k = fids[i]
        h = _mix(k) & mask
        first_tomb = np.int64(-1)
        while True:
            r = index[h]
            if r == EMPTY:
                break
            if r == TOMB:
                if first_tomb < 0:
                    first_tomb = np.int64(h)
            elif _fid_at(rows, r) == k:
                first_tomb = -2  # already present: keep its row
                out[i] = r
                break
            h = (h + np.uint64(1)) & mask
        if first_tomb == -2:
            continue
        if free_top > 0:
            free_top -= 1
            row = free[free_top]
        else:
            row = next_row
            next_row += 1
        slot = first_tomb if first_tomb >= 0 else np.int64(h)
        index[slot] = row
        rows[row, 0] = np.int32(k & np.int64(0xFFFFFFFF))
        rows[row, 1] = np.int32(k >> np.int64(32))
        out[i] = row
    return free_top, next_row


@numba.njit(cache=True, nogil=True)
def _erase(index, rows, fids, out):
    """Tombstones fids' slots; ``out`` gets each freed row or -1 for fids not present."""
    mask = np.uint64(index.shape[0] - 1)
    for i in range(fids.shape[0]):
        slot, r = _probe(index, rows, _mix(fids[i]) & mask, mask, fids[i])
        if r >= 0:
            index[slot] = TOMB
        out[i] = r


@numba.njit(cache=True, nogil=True)
def _rebuild(index, rows, live_rows):
    mask = np.uint64(index.shape[0] - 1)
    for i in range(live_rows.shape[0]):
        r = live_rows[i]
        h = _mix(_fid_at(rows, r)) & mask
        while index[h] != EMPTY:
            h = (h + np.uint64(1)) & mask
        index[h] = r


@numba.njit(cache=True, nogil=True)
def _live_rows(index, out):
    n = 0
    for h in range(index.shape[0]):
        if index[h] >= 0:
            out[n] = index[h]
            n += 1
    return n


@numba.njit(cache=True, nogil=True)
def _changed_rows(versions, since, out):
    n = 0
    for r in range(versions.shape[0]):
        if versions[r] > since:
            out[n] = r
            n += 1
    return n


class HostTier:
    """In-memory rows of one table: fid -> (value, optimizer state, header).

    Args:
        width: float32 columns per row (value dim + optimizer state width).
        capacity: rows to allocate up front; the slab grows by 1/8 when full.
        max_load: index load (rows + tombstones) that triggers a rebuild at twice the size.
    """

    def __init__(self, width: int, capacity: int = 1024, max_load: float = 0.75) -> None:
        self.width = width
        self.max_load = max_load
        capacity = max(int(capacity), 16)
        self._rows = np.zeros((capacity, FID_WORDS + width), np.int32)
        self.versions = np.full(capacity, -1, np.int64)
        self.freqs = np.zeros(capacity, np.uint32)
        self.last_seen = np.zeros(capacity, np.uint32)
        self._index = np.full(_pow2(capacity / max_load), EMPTY, np.int32)
        self._free = np.zeros(16, np.int32)
        self._free_top = 0
        self._next_row = 0
        self._size = 0
        self._tombs = 0

    @property
    def floats(self) -> np.ndarray:
        """float32 view [capacity, 2 + width] of the slab; columns 2: are value then state."""
        return self._rows.view(np.float32)

    def __len__(self) -> int:
        return self._size

    def nbytes(self) -> int:
        """Bytes held by the index, the slab and the headers."""
        parts = (self._rows, self.versions, self.freqs, self.last_seen, self._index, self._free)
        return sum(a.nbytes for a in parts)

    def find(self, fids: np.ndarray) -> np.ndarray:
        """Row of each fid, -1 when absent: int64 [n] for int64 [n]."""
        return self.find_gather(fids, np.empty((len(fids), 0), np.float32))

    def find_gather(self, fids: np.ndarray, out: np.ndarray, col: int = 0) -> np.ndarray:
        """Copies ``out.shape[1]`` float columns from ``col`` of present fids into ``out``; returns rows (-1 absent)."""
        rows = np.empty(len(fids), np.int64)
        _find_gather(self._index, self._rows, self.floats, fids, FID_WORDS + col, rows, out)
        return rows

    def insert(self, fids: np.ndarray) -> np.ndarray:
        """Rows for distinct fids, creating absent ones (their floats are stale: the caller initialises)."""
        n = len(fids)
        self._reserve(n)
        out = np.empty(n, np.int64)
        before_free, before_next = self._free_top, self._next_row
        self._free_top, self._next_row = _insert(
            self._index, self._rows, fids, self._free, self._free_top, self._next_row, out
        )
        created = (before_free - self._free_top) + (self._next_row - before_next)
        self._size += created
        fresh = out[self.versions[out] < 0]
        self.versions[fresh] = 0
        return out

    def erase(self, fids: np.ndarray) -> np.ndarray:
        """Removes fids; returns the rows they had (-1 for absent fids)."""
        out = np.empty(len(fids), np.int64)
        _erase(self._index, self._rows, fids, out)
        freed = out[out >= 0]
        if len(freed):
            self.versions[freed] = -1
            if self._free_top + len(freed) > len(self._free):
                self._free = np.resize(self._free, max(2 * len(self._free), self._free_top + len(freed)))
            self._free[self._free_top : self._free_top + len(freed)] = freed
            self._free_top += len(freed)
            self._size -= len(freed)
            self._tombs += len(freed)
        return out

    def fids_of(self, rows: np.ndarray) -> np.ndarray:
        """The fid stored in each row: int64 [n]."""
        words = self._rows[rows, :FID_WORDS]
        return (words[:, 1].astype(np.int64) << 32) | (words[:, 0].astype(np.int64) & 0xFFFFFFFF)

    def live_rows(self) -> np.ndarray:
        """Every occupied row, int64 [len(self)]."""
        return np.flatnonzero(self.versions[: self._next_row] >= 0)

    def changed_rows(self, since_version: int) -> np.ndarray:
        """Rows whose version is above ``since_version`` (unordered)."""
        out = np.empty(self._size, np.int64)
        n = _changed_rows(self.versions[: self._next_row], max(since_version, -1), out)
        return out[:n]

    def _reserve(self, extra: int) -> None:
        need = self._next_row + max(0, extra - self._free_top)
        cap = len(self._rows)
        if need > cap:
            new_cap = max(need, cap + cap // 8 + 16)
            self._rows = _grow(self._rows, new_cap)
            self.versions = _grow(self.versions, new_cap, fill=-1)
            self.freqs = _grow(self.freqs, new_cap)
            self.last_seen = _grow(self.last_seen, new_cap)
        if self._size + self._tombs + extra > self.max_load * len(self._index):
            # Rebuild (dropping tombstones) at a size that leaves room to grow before the next one.
            live = np.empty(self._size, np.int64)
            n = _live_rows(self._index, live)
            self._index = np.full(_pow2((self._size + extra) / (0.6 * self.max_load)), EMPTY, np.int32)
            _rebuild(self._index, self._rows, live[:n])
            self._tombs = 0


def _pow2(x: float) -> int:
    return 1 << max(4, int(np.ceil(np.log2(max(x, 16)))))


def _grow(array: np.ndarray, rows: int, fill: int = 0) -> np.ndarray:
    grown = np.full((rows, *array.shape[1:]), fill, array.dtype)
    grown[: len(array)] = array
    return grown
