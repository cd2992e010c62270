"""Embedding tables: the interface, and the plain in-memory implementation.

``HostTable`` is collisionless (a dict maps every fid to its own slab row), applies Adagrad
on the server, and stamps every written row with its own version so ``export`` can page
through changes in version order without a side set of dirty ids.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TableConfig:
    """One embedding table.

    Attributes:
        name: table name used on the wire.
        dim: floats per row.
        learning_rate: Adagrad step size.
        initial_accumulator: Adagrad's starting squared-gradient sum (keeps the first steps bounded).
        init_scale: new rows start uniform in [-init_scale, init_scale], derived from the fid,
            so every replica computes the same initial value without storing it.
        seed: mixes into the initial values.
    """

    name: str
    dim: int
    learning_rate: float = 0.05
    initial_accumulator: float = 0.1
    init_scale: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class ExportPage:
    """Rows changed since a version, in ascending version order."""

    fids: np.ndarray  # int64 [n]
    values: np.ndarray  # float32 [n, dim]
    versions: np.ndarray  # int64 [n]
    next_version: int
    has_more: bool


def initial_values(fids: np.ndarray, dim: int, scale: float, seed: int = 0) -> np.ndarray:
    """Deterministic initial rows for fids: float32 [n, dim] uniform in [-scale, scale]."""
    x = (fids.astype(np.uint64)[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)[None, :]) ^ np.uint64(
        seed
    )
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    unit = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return ((unit * 2.0 - 1.0) * scale).astype(np.float32)


class EmbeddingTable(abc.ABC):
    """What the store service needs from a table."""

    config: TableConfig

    @property
    @abc.abstractmethod
    def version(self) -> int:
        """The version of the latest write (0 before any)."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Rows stored."""

    @abc.abstractmethod
    def pull(self, fids: np.ndarray) -> np.ndarray:
        """Rows of fids int64 [n] as float32 [n, dim]; unknown fids read their initial value."""

    @abc.abstractmethod
    def push(self, fids: np.ndarray, grads: np.ndarray) -> int:
        """Sums duplicate fids' grads float32 [n, dim], applies the optimizer; returns rows updated."""

    @abc.abstractmethod
    def export(self, since_version: int, limit: int) -> ExportPage:
        """Up to ``limit`` rows with version > ``since_version``, ascending."""


class HostTable(EmbeddingTable):
    """In-memory collisionless table with Adagrad: dict index + growable numpy slabs."""

    def __init__(self, config: TableConfig, capacity: int = 1024) -> None:
        self.config = config
        self._index: dict[int, int] = {}
        self._fids = np.zeros(capacity, np.int64)
        self._values = np.zeros((capacity, config.dim), np.float32)
        self._accum = np.zeros((capacity, config.dim), np.float32)
        self._versions = np.zeros(capacity, np.int64)
        self._version = 0

    @property
    def version(self) -> int:
        return self._version

    def __len__(self) -> int:
        return len(self._index)

    def _grow(self, need: int) -> None:
        cap = len(self._fids)
        if need <= cap:
            return
        new_cap = max(need, cap * 2)
        self._fids = np.resize(self._fids, new_cap)
        self._versions = np.resize(self._versions, new_cap)
        for name in ("_values", "_accum"):
            old = getattr(self, name)
            grown = np.zeros((new_cap, self.config.dim), np.float32)
            grown[:cap] = old
            setattr(self, name, grown)

    def _rows(self, fids: np.ndarray, insert: bool) -> np.ndarray:
        """Row index of each fid, -1 for unknown ones unless ``insert``."""
        index = self._index
        rows = np.fromiter((index.get(f, -1) for f in fids.tolist()), np.int64, len(fids))
        if insert:
            missing = np.flatnonzero(rows < 0)
            if len(missing):
                start = len(index)
                self._grow(start + len(missing))
                new_rows = np.arange(start, start + len(missing))
                new_fids = fids[missing]
                for fid, row in zip(new_fids.tolist(), new_rows.tolist(), strict=True):
                    index[fid] = row
                self._fids[new_rows] = new_fids
                self._values[new_rows] = initial_values(
                    new_fids, self.config.dim, self.config.init_scale, self.config.seed
                )
                self._accum[new_rows] = self.config.initial_accumulator
                rows[missing] = new_rows
        return rows

    def pull(self, fids: np.ndarray) -> np.ndarray:
        rows = self._rows(fids, insert=False)
        out = np.empty((len(fids), self.config.dim), np.float32)
        known = rows >= 0
        out[known] = self._values[rows[known]]
        if not known.all():
            cfg = self.config
            out[~known] = initial_values(fids[~known], cfg.dim, cfg.init_scale, cfg.seed)
        return out

    def push(self, fids: np.ndarray, grads: np.ndarray) -> int:
        unique, inverse = np.unique(fids, return_inverse=True)
        summed = np.zeros((len(unique), self.config.dim), np.float32)
        np.add.at(summed, inverse, grads)
        rows = self._rows(unique, insert=True)
        accum = self._accum[rows] + summed * summed
        self._accum[rows] = accum
        self._values[rows] -= self.config.learning_rate * summed / np.sqrt(accum)
        # One version per row keeps export pages exact: a page never splits a version.
        self._versions[rows] = self._version + 1 + np.arange(len(rows))
        self._version += len(rows)
        return len(rows)

    def export(self, since_version: int, limit: int) -> ExportPage:
        n = len(self._index)
        changed = np.flatnonzero(self._versions[:n] > since_version)
        order = changed[np.argsort(self._versions[changed], kind="stable")]
        page = order[:limit]
        has_more = len(order) > limit
        # Without more pages the reader is caught up with the table, even when the table is
        # behind ``since_version`` (a restarted store): the caller sees the version go back.
        if not len(page):
            next_version = since_version if has_more else self._version
        else:
            next_version = int(self._versions[page[-1]]) if has_more else self._version
        return ExportPage(
            fids=self._fids[page].copy(),
            values=self._values[page].copy(),
            versions=self._versions[page].copy(),
            next_version=next_version,
            has_more=has_more,
        )
