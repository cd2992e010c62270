"""The device cache: the hottest rows' values in a torch tensor on CUDA when present, else on CPU.

It mirrors host rows (it is never the only copy): pushes write through to cached rows, and
``refresh`` replaces its contents with the currently hottest rows. Lookups find slots with a
small open-addressing index kept on the CPU; on CPU the tensor's memory is gathered directly by
the same compiled loop that then falls through to the host tier (one pass, no extra copies);
on CUDA the gather runs on the device and the hits are copied back in one transfer.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from services.store.host import _mix, _probe
from services.store.prefetch import prefetch1, prefetch2

_EMPTY_KEY = np.int64(np.iinfo(np.int64).min)


@numba.njit(cache=True, nogil=True)
def _cache_insert(keys, slots, fids, first_slot):
    mask = np.uint64(keys.shape[0] - 1)
    for i in range(fids.shape[0]):
        h = _mix(fids[i]) & mask
        while keys[h] != _EMPTY_KEY and keys[h] != fids[i]:
            h = (h + np.uint64(1)) & mask
        keys[h] = fids[i]
        slots[h] = first_slot + i


@numba.njit(cache=True, nogil=True, inline="always")
def _cache_probe(ckeys, cslots, c, cmask, k):
    """Cache slot of fid ``k`` probing from index position ``c``, -1 when not cached."""
    while ckeys[c] != _EMPTY_KEY:
        if ckeys[c] == k:
            return cslots[c]
        c = (c + np.uint64(1)) & cmask
    return -1


@numba.njit(cache=True, nogil=True)
def _cache_find(keys, slots, fids, out):
    mask = np.uint64(keys.shape[0] - 1)
    for i in range(fids.shape[0]):
        out[i] = _cache_probe(keys, slots, _mix(fids[i]) & mask, mask, fids[i])


_AHEAD = 8


@numba.njit(cache=True, nogil=True)
def _two_tier_gather(ckeys, cslots, cvalues, chits, index, rows, floats, freqs, col0, fids, out, host_rows):
    """Cache first, then host, in one pipelined pass; counts reads (cache slot hits, host row freqs).

    Key i + 2D: its cache slot is prefetched. Key i + D: its cache slot is probed (now cached);
    on a hit the cached row is prefetched, on a miss the host index slot. Key i: read.
    ``host_rows`` gets -2 for a cache hit, the host row, or -1 for a miss of both.
    Returns (cache hits, misses of both tiers).
    """
    cmask = np.uint64(ckeys.shape[0] - 1)
    hmask = np.uint64(index.shape[0] - 1)
    n = fids.shape[0]
    d = out.shape[1]
    hs = np.empty(n, np.uint64)
    for i in range(n):
        hs[i] = _mix(fids[i])
    for i in range(min(n, 2 * _AHEAD)):
        prefetch1(ckeys, hs[i] & cmask)
    n_cache = 0
    n_miss = 0
    for i in range(n):
        if i + 2 * _AHEAD < n:
            prefetch1(ckeys, hs[i + 2 * _AHEAD] & cmask)
        if i + _AHEAD < n:
            a = i + _AHEAD
            slot = _cache_probe(ckeys, cslots, hs[a] & cmask, cmask, fids[a])
            if slot >= 0:
                prefetch2(cvalues, slot, 0)
            else:
                prefetch1(index, hs[a] & hmask)
        k = fids[i]
        hit = _cache_probe(ckeys, cslots, hs[i] & cmask, cmask, k)
        if hit >= 0:
            for j in range(d):
                out[i, j] = cvalues[hit, j]
            chits[hit] += 1
            host_rows[i] = -2
            n_cache += 1
            continue
        r = _probe(index, rows, hs[i] & hmask, hmask, k)[1]
        host_rows[i] = r
        if r < 0:
            n_miss += 1
            continue
        freqs[r] += 1
        for j in range(d):
            out[i, j] = floats[r, col0 + j]
    return n_cache, n_miss


class DeviceCache:
    """Values of up to ``capacity`` hot rows on ``device`` (CUDA when available, else CPU).

    Args:
        capacity: rows held.
        dim: floats per row value.
        device: torch device; ``None`` picks ``cuda`` when available.
    """

    def __init__(self, capacity: int, dim: int, device: str | torch.device | None = None) -> None:
        self.capacity = capacity
        self.dim = dim
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.values = torch.zeros((capacity, dim), dtype=torch.float32, device=self.device)
        size = 1 << max(4, int(np.ceil(np.log2(capacity * 2 + 1))))
        self._keys = np.full(size, _EMPTY_KEY, np.int64)
        self._slots = np.zeros(size, np.int32)
        self.hits = np.zeros(capacity, np.uint32)  # reads per slot since the last refresh
        self.fids = np.zeros(0, np.int64)
        self.size = 0
        self._np_values = self.values.numpy() if self.device.type == "cpu" else None

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def find(self, fids: np.ndarray) -> np.ndarray:
        """Cache slot of each fid, -1 when not cached: int64 [n]."""
        out = np.empty(len(fids), np.int64)
        _cache_find(self._keys, self._slots, fids, out)
        return out

    def gather(self, slots: np.ndarray) -> np.ndarray:
        """Values float32 [n, dim] of cached slots, gathered on the device and copied back once."""
        index = torch.from_numpy(slots).to(self.device, non_blocking=True)
        return self.values.index_select(0, index).cpu().numpy()

    def write_through(self, fids: np.ndarray, values: np.ndarray) -> int:
        """Overwrites the cached copies of fids that are cached; returns how many were."""
        slots = self.find(fids)
        hit = slots >= 0
        if hit.any():
            index = torch.from_numpy(slots[hit]).to(self.device)
            self.values.index_copy_(0, index, torch.from_numpy(np.ascontiguousarray(values[hit])).to(self.device))
        return int(hit.sum())

    def refresh(self, fids: np.ndarray, values: np.ndarray) -> None:
        """Replaces the cache's contents with these rows (at most ``capacity``, the first ones kept)."""
        fids, values = fids[: self.capacity], values[: self.capacity]
        self._keys.fill(_EMPTY_KEY)
        _cache_insert(self._keys, self._slots, fids, 0)
        self.values[: len(fids)] = torch.from_numpy(np.ascontiguousarray(values)).to(self.device)
        self.hits[:] = 0
        self.fids = fids.copy()
        self.size = len(fids)

    def take_hits(self) -> tuple[np.ndarray, np.ndarray]:
        """(fids, reads) of cached rows since the last call, for the host's frequency counts."""
        hits = self.hits[: self.size].copy()
        self.hits[:] = 0
        return self.fids, hits

    def gather_with_host(self, host, fids: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, int, int]:
        """CPU fast path: cache then host tier in one compiled pass.

        Returns:
            (host rows: -2 cached / row / -1 missed, cache hits, misses of both tiers).
        """
        host_rows = np.empty(len(fids), np.int64)
        n_cache, n_miss = _two_tier_gather(
            self._keys,
            self._slots,
            self._np_values,
            self.hits,
            host._index,
            host._rows,
            host.floats,
            host.freqs,
            2,
            fids,
            out,
            host_rows,
        )
        return host_rows, n_cache, n_miss

    def nbytes(self) -> int:
        return self.values.element_size() * self.values.nelement() + self._keys.nbytes + self._slots.nbytes
