"""The ranking model shared by training (torch) and serving (numpy): a factorization machine.

Every fid owns one row of ``1 + k`` floats in the embedding store: a linear weight followed by
a k-dim factor (k = 0 gives logistic regression). Samples use the lengths + values layout:
sample ``i`` owns the fids ``fids[offsets[i]:offsets[i] + lengths[i]]``.

    logit_i = bias + sum_f w_f + 0.5 * sum_k ((sum_f v_fk)^2 - sum_f v_fk^2)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FMConfig:
    """Shape of the factorization machine.

    Attributes:
        factors: k, the factor dimension; 0 makes the model logistic regression.
    """

    factors: int = 8

    @property
    def row_dim(self) -> int:
        """Floats per fid row in the store: 1 linear weight + k factors."""
        return 1 + self.factors


def segment_ids(lengths: np.ndarray) -> np.ndarray:
    """For lengths int [B] returns the sample index of every fid, int64 [sum(lengths)]."""
    return np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)


class FactorizationMachine(torch.nn.Module):
    """FM over rows pulled from the store; only the global bias is a dense parameter here."""

    def __init__(self, config: FMConfig) -> None:
        super().__init__()
        self.config = config
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def forward(
        self, rows: torch.Tensor, inverse: torch.Tensor, segments: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """Logits of a batch.

        Args:
            rows: float32 [U, 1 + k], one row per distinct fid in the batch.
            inverse: int64 [T], the row of each fid occurrence.
            segments: int64 [T], the sample of each fid occurrence.
            batch: B, the number of samples.

        Returns:
            float32 [B] logits.
        """
        per_fid = rows[inverse]
        out = torch.zeros(batch, self.config.row_dim, dtype=rows.dtype).index_add(0, segments, per_fid)
        logits = self.bias + out[:, 0]
        if self.config.factors:
            sq = torch.zeros(batch, self.config.factors, dtype=rows.dtype).index_add(
                0, segments, per_fid[:, 1:] ** 2
            )
            logits = logits + 0.5 * (out[:, 1:] ** 2 - sq).sum(dim=1)
        return logits


def fm_logits(rows: np.ndarray, bias: float) -> np.ndarray:
    """Serving-side FM for fixed-width examples.

    Args:
        rows: float32 [n, F, 1 + k], the rows of each example's F fids.
        bias: the global bias.

    Returns:
        float32 [n] logits.
    """
    linear = rows[:, :, 0].sum(axis=1)
    factors = rows[:, :, 1:]
    inter = 0.5 * (factors.sum(axis=1) ** 2 - (factors**2).sum(axis=1)).sum(axis=1)
    return (bias + linear + inter).astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))).astype(np.float32)
