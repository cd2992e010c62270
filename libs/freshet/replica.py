"""The serving replica: rows and dense parameters of one model at one version (predictor and validator).

The replica scores with the trainer's network (``freshet.models``, built from the same
``FRESHET_MODEL_CONFIG``): rows per store table, dense parameters from the latest delta (or snapshot
chunk) that carried them. Unknown fids read the default embedding (zeros).

Consistency: a ``Replica`` is mutated only synchronously on the event loop (``apply`` has no
awaits), and ``score`` has no awaits either, so a reader that takes ``replica.version`` and scores
in the same synchronous step sees exactly one version. Whole rebuilds (snapshot loads, rollbacks)
never touch the served object: ``freshet.follower`` builds a new ``Replica`` and swaps the
reference in one assignment. We chose this over copy-on-write because applying a delta in place
costs O(rows in the delta), while copying would cost O(rows in the table) per delta.
"""

from __future__ import annotations

import numpy as np
import torch

from freshet.delta import ENCODINGS, Delta, dequantize, quantize
from freshet.models import CtrModel, ModelConfig, plan, pool

_SLAB_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}


class SortedIndex:
    """fid -> slab row, vectorised: a sorted int64 key array searched with ``np.searchsorted``.

    New keys go to a small sorted ``pending`` array that is merged into the main one once it
    holds more than an eighth of it (at least ``min_pending``), so inserting n keys costs
    O(n log n + pending) and the merge's O(N) is amortised over N / 8 inserts.
    """

    def __init__(self, min_pending: int = 4096) -> None:
        self.min_pending = min_pending
        self._keys = np.zeros(0, np.int64)
        self._rows = np.zeros(0, np.int64)
        self._pkeys = np.zeros(0, np.int64)
        self._prows = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._keys) + len(self._pkeys)

    @staticmethod
    def _search(keys: np.ndarray, rows: np.ndarray, fids: np.ndarray, out: np.ndarray) -> None:
        if not len(keys):
            return
        pos = np.searchsorted(keys, fids)
        np.minimum(pos, len(keys) - 1, out=pos)
        hit = keys[pos] == fids
        out[hit] = rows[pos[hit]]

    def find(self, fids: np.ndarray) -> np.ndarray:
        """Slab rows int64 [n] of fids int64 [n]; -1 where a fid is absent."""
        out = np.full(len(fids), -1, np.int64)
        self._search(self._keys, self._rows, fids, out)
        if len(self._pkeys):
            self._search(self._pkeys, self._prows, fids, out)
        return out

    def insert(self, fids: np.ndarray, rows: np.ndarray) -> None:
        """Adds distinct, absent fids int64 [n] pointing at slab rows int64 [n]."""
        order = np.argsort(fids, kind="stable")
        fids, rows = fids[order], rows[order]
        at = np.searchsorted(self._pkeys, fids)
        self._pkeys = np.insert(self._pkeys, at, fids)
        self._prows = np.insert(self._prows, at, rows)
        if len(self._pkeys) > max(self.min_pending, len(self._keys) // 8):
            at = np.searchsorted(self._keys, self._pkeys)
            self._keys = np.insert(self._keys, at, self._pkeys)
            self._rows = np.insert(self._rows, at, self._prows)
            self._pkeys, self._prows = self._pkeys[:0], self._prows[:0]

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(fids int64 [n] ascending, their slab rows int64 [n])."""
        keys = np.concatenate([self._keys, self._pkeys])
        rows = np.concatenate([self._rows, self._prows])
        order = np.argsort(keys, kind="stable")
        return keys[order], rows[order]

    def nbytes(self) -> int:
        return 16 * len(self)


def _last_of_each(fids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fids made distinct, keeping each one's last row (what applying the rows in order leaves)."""
    if len(fids) < 2 or bool(np.all(fids[1:] > fids[:-1])):
        return fids, values
    unique, first_from_end = np.unique(fids[::-1], return_index=True)
    return unique, values[len(fids) - 1 - first_from_end]


class RowMap:
    """Collisionless fid -> row map of one table: a ``SortedIndex`` over an append-only slab.

    ``dtype`` is how rows are held: fp32, fp16 (half the memory) or int8 with a float32 scale per
    row (a quarter plus 4 bytes a row); lookups always return float32.
    """

    def __init__(self, width: int, dtype: str = "fp32") -> None:
        if dtype not in ENCODINGS:
            raise ValueError(f"replica dtype must be one of {ENCODINGS}, got {dtype!r}")
        self.width = width
        self.dtype = dtype
        self._index = SortedIndex()
        self._slab = np.zeros((1024, width), _SLAB_DTYPES[dtype])
        self._scales = np.ones(1024, np.float32) if dtype == "int8" else None

    def __len__(self) -> int:
        return len(self._index)

    def _grow(self, needed: int) -> None:
        if needed <= len(self._slab):
            return
        grown = np.zeros((max(needed, 2 * len(self._slab)), self.width), self._slab.dtype)
        grown[: len(self._slab)] = self._slab
        self._slab = grown
        if self._scales is not None:
            self._scales = np.concatenate([self._scales, np.ones(len(grown) - len(self._scales), np.float32)])

    def put(self, fids: np.ndarray, values: np.ndarray) -> None:
        """Overwrites (or adds) rows: fids int64 [n], values float32 [n, width]; a repeated fid keeps its last row."""
        if len(fids) and values.shape[1] != self.width:
            raise ValueError(f"delta rows have {values.shape[1]} floats, the table's rows have {self.width}")
        fids, values = _last_of_each(np.asarray(fids, np.int64), values)
        rows = self._index.find(fids)
        new = rows < 0
        if new.any():
            start = len(self._index)
            rows[new] = np.arange(start, start + int(new.sum()), dtype=np.int64)
            self._grow(start + int(new.sum()))
            self._index.insert(fids[new], rows[new])
        stored, scales = quantize(values, self.dtype)
        self._slab[rows] = stored
        if scales is not None:
            self._scales[rows] = scales

    def lookup(self, fids: np.ndarray) -> np.ndarray:
        """Rows of fids int64 [n] -> float32 [n, width]; unknown fids are zeros."""
        rows = self._index.find(np.asarray(fids, np.int64))
        out = np.zeros((len(rows), self.width), np.float32)
        known = rows >= 0
        hit = rows[known]
        out[known] = dequantize(self._slab[hit], None if self._scales is None else self._scales[hit])
        return out

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row held: (fids int64 [n] ascending, values float32 [n, width])."""
        fids, rows = self._index.items()
        return fids, dequantize(self._slab[rows], None if self._scales is None else self._scales[rows])

    def nbytes(self) -> int:
        """Bytes held: the slab (and int8 scales) plus 16 B per fid in the index."""
        scales = 0 if self._scales is None else self._scales.nbytes
        return self._slab.nbytes + scales + self._index.nbytes()


class Replica:
    """Every table of one model plus its dense network, at one version.

    Attributes:
        version: the MODEL stream sequence of the latest approval this content reflects (set by
            ``freshet.follower.Follower``; 0 = nothing applied).
        table_versions: (shard, table) -> store version the table's rows of that shard are at.
        shard_sequences: shard -> last delta sequence decided (applied, rejected, or covered by a
            loaded snapshot); the dense parameters are shard -1.
        snapshot: id of the snapshot this replica was built from ("" = from the start of the stream).
    """

    def __init__(self, config: ModelConfig, dtype: str = "fp32") -> None:
        self.config = config
        self.dtype = dtype
        self.tables = {name: RowMap(width, dtype) for name, width in config.tables().items()}
        self.model = CtrModel(config, seed=0).eval()
        self.dense_step = -1
        self.version = 0
        self.table_versions: dict[tuple[int, str], int] = {}
        self.shard_sequences: dict[int, int] = {}
        self.snapshot = ""

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def apply(self, delta: Delta) -> None:
        """Overwrites the delta's rows (idempotent) and takes its dense parameters.

        Raises:
            ValueError: an unknown table, rows of the wrong width, or dense parameters that do not fit
                the model; nothing is applied then.
        """
        table = self.tables.get(delta.table)
        if table is None and len(delta.fids):
            raise ValueError(f"delta for table {delta.table!r}; this model's tables are {sorted(self.tables)}")
        if table is not None and len(delta.fids) and delta.values.shape[1] != table.width:
            raise ValueError(
                f"delta rows have {delta.values.shape[1]} floats, the table's rows have {table.width}"
            )
        if delta.dense:
            self._load_dense(delta.dense)
            self.dense_step = delta.dense_step
        if table is not None:
            table.put(delta.fids, delta.values)
            self.table_versions[(delta.shard, delta.table)] = delta.new_version
        self.advance(delta.shard, delta.sequence)

    def _load_dense(self, dense: dict[str, np.ndarray]) -> None:
        own = self.model.state_dict()
        unknown = sorted(set(dense) - set(own))
        wrong = sorted(k for k in dense if k in own and tuple(own[k].shape) != tuple(np.shape(dense[k])))
        if unknown or wrong:
            raise ValueError(
                f"dense parameters do not fit the model ({self.config.kind}): unknown {unknown}, wrong shape {wrong}"
            )
        self.model.load_state_dict(
            {k: torch.from_numpy(np.array(v, np.float32)) for k, v in dense.items()}, strict=False
        )

    def advance(self, shard: int, sequence: int) -> None:
        """Records that the shard's deltas up to ``sequence`` are decided (never moves backwards)."""
        if sequence > self.shard_sequences.get(shard, 0):
            self.shard_sequences[shard] = sequence

    def nbytes(self) -> int:
        return sum(t.nbytes() for t in self.tables.values())

    def rows(self, table: str) -> tuple[np.ndarray, np.ndarray]:
        """Every row of ``table``: (fids int64 [n] ascending, values float32 [n, width])."""
        return self.tables[table].export()

    def equal_rows(self, table: str, fids: np.ndarray, values: np.ndarray) -> bool:
        """Whether ``table`` holds exactly these rows and no others, bit for bit.

        ``values`` float32 [n, width] are compared after the replica's own storage rounding (none
        for fp32; fp16 or int8 with a per-row scale otherwise), so an fp32 replica must equal them exactly.
        """
        fids, values = _last_of_each(np.asarray(fids, np.int64), np.asarray(values, np.float32))
        order = np.argsort(fids, kind="stable")
        fids, values = fids[order], values[order]
        held_fids, held = self.rows(table)
        expected = dequantize(*quantize(values, self.dtype))
        return bool(np.array_equal(held_fids, fids) and held.tobytes() == expected.tobytes())

    def score(self, fids: np.ndarray) -> np.ndarray:
        """Click probabilities float32 [n] of examples with fids int64 [n, F]."""
        n, width = fids.shape
        batch = plan(fids.reshape(-1), np.full(n, width, np.int32), self.config)
        rows = {name: torch.from_numpy(self.tables[name].lookup(t.fids)) for name, t in batch.tables.items()}
        with torch.no_grad():
            logits = self.model(pool(batch, rows))
        return torch.sigmoid(logits[:, 0]).numpy()
