"""Streaming evaluation metrics: AUC and log loss over everything and over a sliding window."""

from __future__ import annotations

from collections import deque

import numpy as np


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Rank-based ROC AUC (ties get the average rank); ``None`` when only one class is present."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels) > 0.5
    pos = int(labels.sum())
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()) if len(y) else float("nan")


class ProgressiveMetrics:
    """Predict-then-train evaluation: every batch is scored before the model learns from it.

    Keeps AUC and log loss over everything (AUC from counts of positives and negatives in 2**16
    probability bins: constant memory, exact up to ties within a bin) and over a sliding window of the
    last ``window`` samples. ``record=True`` also keeps every (score, label) pair, for offline analysis
    such as the AUC of a stream's tail.
    """

    BINS = 1 << 16

    def __init__(self, window: int = 10_000, record: bool = False) -> None:
        self._scores: deque[float] = deque(maxlen=window)
        self._labels: deque[float] = deque(maxlen=window)
        self._pos = np.zeros(self.BINS, np.int64)
        self._neg = np.zeros(self.BINS, np.int64)
        self.count = 0
        self._loss_sum = 0.0
        self.recorded: list[tuple[np.ndarray, np.ndarray]] | None = [] if record else None

    def update(self, probs: np.ndarray, labels: np.ndarray) -> None:
        if not len(labels):
            return
        probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
        self._scores.extend(probs.tolist())
        self._labels.extend(labels.tolist())
        self.count += len(labels)
        self._loss_sum += log_loss(probs, labels) * len(labels)
        bins = np.clip((probs * self.BINS).astype(np.int64), 0, self.BINS - 1)
        positive = labels > 0.5
        self._pos += np.bincount(bins[positive], minlength=self.BINS)
        self._neg += np.bincount(bins[~positive], minlength=self.BINS)
        if self.recorded is not None:
            self.recorded.append((probs.copy(), labels.copy()))

    def auc(self) -> float | None:
        """AUC over every sample so far (binned)."""
        pos, neg = self._pos.sum(), self._neg.sum()
        if pos == 0 or neg == 0:
            return None
        below = np.cumsum(self._neg) - self._neg  # negatives in lower bins
        return float((self._pos * (below + 0.5 * self._neg)).sum() / (pos * neg))

    def window_auc(self) -> float | None:
        return auc(np.array(self._scores), np.array(self._labels))

    def mean_log_loss(self) -> float | None:
        return self._loss_sum / self.count if self.count else None

    def window_log_loss(self) -> float | None:
        return log_loss(np.array(self._scores), np.array(self._labels)) if self._labels else None

    def tail_auc(self, fraction: float) -> float | None:
        """AUC over the last ``fraction`` of the recorded samples (needs ``record=True``)."""
        if self.recorded is None:
            raise ValueError("tail_auc needs ProgressiveMetrics(record=True)")
        if not self.recorded:
            return None
        scores = np.concatenate([s for s, _ in self.recorded])
        labels = np.concatenate([y for _, y in self.recorded])
        skip = int(round(len(scores) * (1.0 - fraction)))
        return auc(scores[skip:], labels[skip:])
