"""Streaming evaluation metrics: AUC and log loss over everything and over a sliding window."""

from __future__ import annotations

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

    ``update`` costs O(batch): the window is a ring of arrays, and batches' bins are counted into the
    histogram only when it is read or ``FOLD`` samples are waiting (a 2**16-bin count per batch would
    cost the trainer a tenth of its step).
    """

    BINS = 1 << 16
    FOLD = 1 << 18  # samples whose bins wait before they are counted

    def __init__(self, window: int = 10_000, record: bool = False) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self._ring = np.zeros((2, window), np.float64)  # scores, labels of the last ``window`` samples
        self._ring_next = 0  # where the next sample goes
        self._ring_size = 0
        self._counts = np.zeros(2 * self.BINS, np.int64)  # [bin * 2 + positive]
        self._waiting: list[np.ndarray] = []  # bin * 2 + positive, per batch not yet counted
        self._waiting_n = 0
        self.count = 0
        self._loss_sum = 0.0
        self.recorded: list[tuple[np.ndarray, np.ndarray]] | None = [] if record else None

    def update(self, probs: np.ndarray, labels: np.ndarray) -> None:
        if not len(labels):
            return
        probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
        self._remember(probs, labels)
        self.count += len(labels)
        self._loss_sum += log_loss(probs, labels) * len(labels)
        bins = np.clip((probs * self.BINS).astype(np.int64), 0, self.BINS - 1)
        self._waiting.append(bins * 2 + (labels > 0.5))
        self._waiting_n += len(bins)
        if self._waiting_n >= self.FOLD:
            self._fold()
        if self.recorded is not None:
            self.recorded.append((probs.copy(), labels.copy()))

    def _remember(self, probs: np.ndarray, labels: np.ndarray) -> None:
        """The batch into the window ring (its last ``window`` samples when it is longer)."""
        window = self._ring.shape[1]
        n = min(len(labels), window)
        probs, labels = probs[-n:], labels[-n:]
        first = min(n, window - self._ring_next)  # up to the ring's end, then from its start
        for column, values in enumerate((probs, labels)):
            self._ring[column, self._ring_next : self._ring_next + first] = values[:first]
            self._ring[column, : n - first] = values[first:]
        self._ring_next = (self._ring_next + n) % window
        self._ring_size = min(window, self._ring_size + n)

    def _fold(self) -> None:
        if self._waiting:
            self._counts += np.bincount(np.concatenate(self._waiting), minlength=2 * self.BINS)
            self._waiting, self._waiting_n = [], 0

    def auc(self) -> float | None:
        """AUC over every sample so far (binned)."""
        self._fold()
        neg, pos = self._counts[0::2], self._counts[1::2]
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            return None
        below = np.cumsum(neg) - neg  # negatives in lower bins
        return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))

    def _window(self) -> tuple[np.ndarray, np.ndarray]:
        """Scores and labels of the window (in ring order: neither metric depends on the order)."""
        return self._ring[0, : self._ring_size], self._ring[1, : self._ring_size]

    def window_auc(self) -> float | None:
        return auc(*self._window())

    def mean_log_loss(self) -> float | None:
        return self._loss_sum / self.count if self.count else None

    def window_log_loss(self) -> float | None:
        return log_loss(*self._window()) if self._ring_size else None

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
