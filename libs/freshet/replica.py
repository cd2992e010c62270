"""The serving replica: rows and dense parameters of one model at one version (predictor and validator).

The replica scores with the trainer's network (``freshet.models``, built from the same
``FRESHET_MODEL_CONFIG``): rows per store table, dense parameters from the latest snapshot that
rode along a delta. Deltas are applied synchronously on the event loop, between requests, so each
Predict sees exactly one version. Unknown fids read the default embedding (zeros).
"""

from __future__ import annotations

import numpy as np
import torch

from freshet.delta import ENCODINGS, Delta, dequantize, quantize
from freshet.models import CtrModel, ModelConfig, plan, pool


class RowMap:
    """Collisionless fid -> row map of one table, with an append-only slab.

    ``dtype`` is how rows are held: fp32, fp16 (half the memory) or int8 with a float32 scale per
    row (a quarter plus 4 bytes a row); lookups always return float32.
    """

    def __init__(self, width: int, dtype: str = "fp32") -> None:
        if dtype not in ENCODINGS:
            raise ValueError(f"replica dtype must be one of {ENCODINGS}, got {dtype!r}")
        self.width = width
        self.dtype = dtype
        self._index: dict[int, int] = {}
        self._slab = np.zeros((1024, width), {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[dtype])
        self._scales = np.ones(1024, np.float32) if dtype == "int8" else None

    def __len__(self) -> int:
        return len(self._index)

    def put(self, fids: np.ndarray, values: np.ndarray) -> None:
        if len(fids) and values.shape[1] != self.width:
            raise ValueError(f"delta rows have {values.shape[1]} floats, the table's rows have {self.width}")
        rows = np.empty(len(fids), np.int64)
        index = self._index
        for i, fid in enumerate(fids.tolist()):
            row = index.get(fid)
            if row is None:
                row = index[fid] = len(index)
            rows[i] = row
        if len(index) > len(self._slab):
            grown = np.zeros((max(len(index), 2 * len(self._slab)), self.width), self._slab.dtype)
            grown[: len(self._slab)] = self._slab
            self._slab = grown
            if self._scales is not None:
                self._scales = np.concatenate([self._scales, np.ones(len(grown) - len(self._scales), np.float32)])
        stored, scales = quantize(values, self.dtype)
        self._slab[rows] = stored
        if scales is not None:
            self._scales[rows] = scales

    def lookup(self, fids: np.ndarray) -> np.ndarray:
        """Rows of fids int64 [n] -> float32 [n, width]; unknown fids are zeros."""
        index = self._index
        rows = np.fromiter((index.get(f, -1) for f in fids.tolist()), np.int64, len(fids))
        out = np.zeros((len(fids), self.width), np.float32)
        known = rows >= 0
        hit = rows[known]
        out[known] = dequantize(self._slab[hit], None if self._scales is None else self._scales[hit])
        return out

    def nbytes(self) -> int:
        """Approximate bytes held: the slab plus the dict index (about 100 B per entry in CPython)."""
        scales = 0 if self._scales is None else self._scales.nbytes
        return self._slab.nbytes + scales + 100 * len(self._index)


class Replica:
    """Every table of one model plus its dense network."""

    def __init__(self, config: ModelConfig, dtype: str = "fp32") -> None:
        self.config = config
        self.tables = {name: RowMap(width, dtype) for name, width in config.tables().items()}
        self.model = CtrModel(config, seed=0).eval()
        self.dense_step = -1
        # Sum over shards of the last delta sequence applied: monotonic, changes exactly when the
        # served state does, and is the delta sequence itself when the store has one shard.
        self.version = 0
        self.shard_sequences: dict[int, int] = {}
        self.store_versions: dict[int, int] = {}

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
        if delta.dense:
            self._load_dense(delta.dense)
            self.dense_step = delta.dense_step
        if table is not None:
            table.put(delta.fids, delta.values)
        self.advance(delta.shard, delta.sequence)
        self.store_versions[delta.shard] = delta.new_version

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
        """Records that the shard's deltas up to ``sequence`` are applied."""
        previous = self.shard_sequences.get(shard, 0)
        if sequence > previous:
            self.shard_sequences[shard] = sequence
            self.version += sequence - previous

    def nbytes(self) -> int:
        return sum(t.nbytes() for t in self.tables.values())

    def score(self, fids: np.ndarray) -> np.ndarray:
        """Click probabilities float32 [n] of examples with fids int64 [n, F]."""
        n, width = fids.shape
        batch = plan(fids.reshape(-1), np.full(n, width, np.int32), self.config)
        rows = {name: torch.from_numpy(self.tables[name].lookup(t.fids)) for name, t in batch.tables.items()}
        with torch.no_grad():
            logits = self.model(pool(batch, rows))
        return torch.sigmoid(logits[:, 0]).numpy()
