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
    """Predict-then-train evaluation: every batch is scored before the model learns from it."""

    def __init__(self, window: int = 10_000) -> None:
        self._scores: deque[float] = deque(maxlen=window)
        self._labels: deque[float] = deque(maxlen=window)
        self.count = 0
        self._loss_sum = 0.0

    def update(self, probs: np.ndarray, labels: np.ndarray) -> None:
        if not len(labels):
            return
        self._scores.extend(np.asarray(probs, np.float64).tolist())
        self._labels.extend(np.asarray(labels, np.float64).tolist())
        self.count += len(labels)
        self._loss_sum += log_loss(probs, labels) * len(labels)

    def window_auc(self) -> float | None:
        return auc(np.array(self._scores), np.array(self._labels))

    def mean_log_loss(self) -> float | None:
        return self._loss_sum / self.count if self.count else None
