"""Tests of the streaming metrics: rank AUC, log loss and the progressive (windowed) evaluator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from freshet.metrics import ProgressiveMetrics, auc, log_loss


def _pairwise_auc(scores, labels) -> float:
    """P(score of a positive > score of a negative), ties counting one half, over every pair."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y > 0.5]
    neg = [s for s, y in zip(scores, labels, strict=True) if y <= 0.5]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_brute_force_pairwise_auc_on_random_data_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    scores = rng.integers(0, 6, size=n) / 5.0  # few distinct values: many ties
    labels = (rng.random(n) < 0.2 + 0.6 * scores).astype(np.float32)

    assert auc(scores, labels) == pytest.approx(_pairwise_auc(scores.tolist(), labels.tolist()), abs=1e-12)


def test_auc_of_continuous_scores_equals_brute_force():
    rng = np.random.default_rng(10)
    scores = rng.normal(size=200)
    labels = rng.random(200) < 0.3
    assert auc(scores, labels) == pytest.approx(_pairwise_auc(scores.tolist(), labels.tolist()), abs=1e-12)


def test_auc_is_one_for_perfect_ranking_zero_for_reversed_and_half_for_all_ties():
    labels = np.array([0, 0, 1, 1])
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert auc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert auc(np.full(4, 0.3), labels) == 0.5


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0], []])
def test_auc_is_none_when_only_one_class_is_present(labels):
    assert auc(np.linspace(0, 1, len(labels)), np.array(labels, np.float32)) is None


def test_log_loss_matches_the_formula_and_clips_certain_mistakes():
    assert log_loss(np.array([0.8, 0.3]), np.array([1, 0])) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    assert math.isfinite(log_loss(np.array([0.0, 1.0]), np.array([1, 0])))
    assert math.isnan(log_loss(np.array([]), np.array([])))


def test_progressive_window_auc_covers_only_the_last_window_of_samples():
    metrics = ProgressiveMetrics(window=4)
    # First batch ranked perfectly wrong, second perfectly right: only the second is in the window.
    metrics.update(np.array([0.9, 0.1]), np.array([0.0, 1.0]))
    assert metrics.window_auc() == 0.0
    metrics.update(np.array([0.2, 0.3, 0.6, 0.7]), np.array([0.0, 0.0, 1.0, 1.0]))

    assert metrics.window_auc() == 1.0
    assert metrics.count == 6


def test_progressive_window_auc_is_none_when_the_window_holds_one_class():
    metrics = ProgressiveMetrics(window=3)
    assert metrics.window_auc() is None
    metrics.update(np.array([0.4, 0.6]), np.array([0.0, 1.0]))
    metrics.update(np.array([0.1, 0.2, 0.3]), np.array([0.0, 0.0, 0.0]))
    assert metrics.window_auc() is None


def test_progressive_mean_log_loss_averages_over_all_samples_not_just_the_window():
    metrics = ProgressiveMetrics(window=2)
    assert metrics.mean_log_loss() is None
    probs = [np.array([0.9, 0.2, 0.6]), np.array([0.3]), np.array([0.7, 0.5])]
    labels = [np.array([1.0, 0.0, 1.0]), np.array([1.0]), np.array([0.0, 1.0])]
    for p, y in zip(probs, labels, strict=True):
        metrics.update(p, y)

    assert metrics.mean_log_loss() == pytest.approx(log_loss(np.concatenate(probs), np.concatenate(labels)))
    assert metrics.count == 6


def test_an_empty_update_leaves_mean_log_loss_unchanged():
    metrics = ProgressiveMetrics()
    metrics.update(np.array([0.8]), np.array([1.0]))
    metrics.update(np.array([]), np.array([]))
    assert metrics.mean_log_loss() == pytest.approx(-math.log(0.8))


def test_binned_overall_auc_matches_exact_auc_and_tail_auc_uses_the_end():
    rng = np.random.default_rng(5)
    labels = (rng.random(5000) < 0.3).astype(float)
    scores = np.clip(0.3 * labels + rng.random(5000) * 0.7, 0, 1)
    m = ProgressiveMetrics(window=1000, record=True)
    for i in range(0, 5000, 500):
        m.update(scores[i : i + 500], labels[i : i + 500])
    assert m.auc() == pytest.approx(auc(scores, labels), abs=1e-4)
    assert m.window_auc() == pytest.approx(auc(scores[-1000:], labels[-1000:]))
    assert m.tail_auc(0.8) == pytest.approx(auc(scores[1000:], labels[1000:]))
    assert m.window_log_loss() == pytest.approx(log_loss(scores[-1000:], labels[-1000:]))


def test_tail_auc_needs_recording():
    with pytest.raises(ValueError, match="record=True"):
        ProgressiveMetrics().tail_auc(0.8)


@pytest.mark.parametrize("seed", range(4))
def test_window_and_overall_metrics_match_brute_force_over_uneven_batches(seed, monkeypatch):
    """Batches of random sizes (some longer than the window, some wrapping the ring), with the histogram
    folded every few batches and read in between: the window holds exactly the last ``window`` samples."""
    monkeypatch.setattr(ProgressiveMetrics, "FOLD", 300)
    rng = np.random.default_rng(seed)
    m = ProgressiveMetrics(window=257)
    seen_scores, seen_labels = [], []
    for _ in range(40):
        n = int(rng.integers(1, 600))
        labels = (rng.random(n) < 0.3).astype(float)
        scores = np.clip(0.2 * labels + rng.random(n) * 0.8, 0, 1)
        m.update(scores, labels)
        seen_scores.append(scores)
        seen_labels.append(labels)
        all_scores, all_labels = np.concatenate(seen_scores), np.concatenate(seen_labels)
        assert m.window_auc() == pytest.approx(auc(all_scores[-257:], all_labels[-257:]))
        assert m.window_log_loss() == pytest.approx(log_loss(all_scores[-257:], all_labels[-257:]))
        if rng.random() < 0.3:
            assert m.auc() == pytest.approx(auc(all_scores, all_labels), abs=1e-3)
    assert m.count == len(all_labels)
    assert m.auc() == pytest.approx(auc(all_scores, all_labels), abs=1e-3)


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="window must be positive"):
        ProgressiveMetrics(window=0)
