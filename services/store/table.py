"""The embedding table interface and what its implementations share.

Every write stamps the row with its own version, so ``export`` pages through changes in version
order without a side set of dirty ids. ``services.store.tiered.TieredTable`` implements it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from services.store.tables import TableSpec


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

    spec: TableSpec

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
