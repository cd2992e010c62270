"""The serving replica: rows and dense parameters of one model at one version.

Deltas are applied synchronously on the event loop, between requests, so each Predict sees
exactly one version. Unknown fids read the default embedding (zeros).
"""

from __future__ import annotations

import numpy as np

from freshet.delta import Delta
from freshet.fm import fm_logits, sigmoid


class Replica:
    """Collisionless fid -> row map with an append-only slab."""

    def __init__(self, row_dim: int) -> None:
        self.row_dim = row_dim
        self._index: dict[int, int] = {}
        self._slab = np.zeros((1024, row_dim), np.float32)
        self.bias = 0.0
        # Sum over shards of the last delta sequence applied: monotonic, changes exactly when the
        # served state does, and is the delta sequence itself when the store has one shard.
        self.version = 0
        self.shard_sequences: dict[int, int] = {}
        self.store_versions: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._index)

    def apply(self, delta: Delta) -> None:
        """Overwrites the delta's rows (idempotent) and takes its dense parameters."""
        if len(delta.fids) and delta.values.shape[1] != self.row_dim:
            raise ValueError(f"delta rows have dim {delta.values.shape[1]}, replica expects {self.row_dim}")
        rows = np.empty(len(delta.fids), np.int64)
        index = self._index
        for i, fid in enumerate(delta.fids.tolist()):
            row = index.get(fid)
            if row is None:
                row = index[fid] = len(index)
            rows[i] = row
        if len(index) > len(self._slab):
            grown = np.zeros((max(len(index), 2 * len(self._slab)), self.row_dim), np.float32)
            grown[: len(self._slab)] = self._slab
            self._slab = grown
        self._slab[rows] = delta.values
        if "bias" in delta.dense:
            self.bias = float(delta.dense["bias"].reshape(-1)[0])
        self.advance(delta.shard, delta.sequence)
        self.store_versions[delta.shard] = delta.new_version

    def advance(self, shard: int, sequence: int) -> None:
        """Records that the shard's deltas up to ``sequence`` are applied."""
        previous = self.shard_sequences.get(shard, 0)
        if sequence > previous:
            self.shard_sequences[shard] = sequence
            self.version += sequence - previous

    def nbytes(self) -> int:
        """Approximate bytes held: the slab plus the dict index (about 100 B per entry in CPython)."""
        return self._slab.nbytes + 100 * len(self._index)

    def lookup(self, fids: np.ndarray) -> np.ndarray:
        """Rows of fids (any shape) -> float32 [..., row_dim]; unknown fids are zeros."""
        flat = fids.reshape(-1)
        index = self._index
        rows = np.fromiter((index.get(f, -1) for f in flat.tolist()), np.int64, len(flat))
        out = np.zeros((len(flat), self.row_dim), np.float32)
        known = rows >= 0
        out[known] = self._slab[rows[known]]
        return out.reshape(*fids.shape, self.row_dim)

    def score(self, fids: np.ndarray) -> np.ndarray:
        """Click probabilities float32 [n] of examples with fids int64 [n, F]."""
        return sigmoid(fm_logits(self.lookup(fids), self.bias))
