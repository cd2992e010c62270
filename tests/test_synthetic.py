"""Tests of the synthetic traffic source: determinism, calibration, signal, drift and click shape."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from freshet.events.v1 import events_pb2
from freshet.synthetic import Request, SyntheticConfig, SyntheticSource

_N_REQUESTS = 20_000
# Requests kept whole for the structural checks; keeping all 20k would mostly exercise the GC.
_N_HEAD = 2_000


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank-based (Mann-Whitney) AUC with average ranks for ties."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    # Tied scores share the mean of their ranks so ties count half, as AUC defines.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _fingerprint(req: Request) -> tuple:
    return (
        req.request_id,
        req.user_id,
        [imp.SerializeToString() for imp in req.impressions],
        [(delay, action.SerializeToString()) for delay, action in req.clicks],
        req.truth,
        req.clicked,
    )


@dataclass
class _Traffic:
    """A long run kept compact: full requests only for the head, arrays [requests, positions] for all."""

    source: SyntheticSource
    head: list[Request]
    truth: np.ndarray
    clicked: np.ndarray
    items: np.ndarray
    n_clicks: int


@pytest.fixture(scope="module")
def traffic() -> _Traffic:
    source = SyntheticSource(SyntheticConfig())
    head: list[Request] = []
    truth, clicked, items = [], [], []
    n_clicks = 0
    for i in range(_N_REQUESTS):
        req = source.next_request(1_000 * i)
        if i < _N_HEAD:
            head.append(req)
        truth.append(req.truth)
        clicked.append(req.clicked)
        items.append([imp.item_id for imp in req.impressions])
        n_clicks += len(req.clicks)
    return _Traffic(source, head, np.array(truth), np.array(clicked), np.array(items), n_clicks)


def test_auc_helper_matches_known_values() -> None:
    assert _auc(np.array([0.1, 0.2, 0.3, 0.4]), np.array([False, False, True, True])) == 1.0
    assert _auc(np.array([0.5, 0.5]), np.array([False, True])) == 0.5


def test_same_seed_and_times_give_identical_traffic() -> None:
    first, second = SyntheticSource(SyntheticConfig(seed=3)), SyntheticSource(SyntheticConfig(seed=3))
    for i in range(500):
        assert _fingerprint(first.next_request(10 * i)) == _fingerprint(second.next_request(10 * i))
    assert first.click_probability(0, 0, 0) == second.click_probability(0, 0, 0)


def test_different_seeds_give_different_traffic() -> None:
    first, second = SyntheticSource(SyntheticConfig(seed=3)), SyntheticSource(SyntheticConfig(seed=4))
    a = [_fingerprint(first.next_request(i))[1:] for i in range(50)]
    b = [_fingerprint(second.next_request(i))[1:] for i in range(50)]
    assert a != b


def test_overall_ctr_is_a_few_percent(traffic: _Traffic) -> None:
    source = traffic.source
    assert 0.02 <= source.clicks / source.impressions <= 0.06
    assert source.requests == _N_REQUESTS
    assert source.impressions == traffic.clicked.size
    assert source.clicks == traffic.n_clicks == int(traffic.clicked.sum())


def test_first_position_is_clicked_clearly_more_than_last(traffic: _Traffic) -> None:
    ctr_by_position = traffic.clicked.mean(axis=0)
    assert ctr_by_position[0] > 1.5 * ctr_by_position[-1]


def test_truth_separates_clicks_from_non_clicks(traffic: _Traffic) -> None:
    truth, clicked = traffic.truth.ravel(), traffic.clicked.ravel()
    assert _auc(truth, clicked) > 0.65
    # The truth is calibrated, not just well ranked.
    assert abs(truth.mean() - clicked.mean()) < 0.005


def test_new_items_appear_over_time_with_never_seen_ids(traffic: _Traffic) -> None:
    n_initial, n_new = traffic.source.config.n_items, traffic.source.new_items
    seen: set[int] = set()
    fresh: list[int] = []
    first_request: list[int] = []
    for i, row in enumerate(traffic.items.tolist()):
        for item in row:
            if item >= n_initial and item not in seen:
                fresh.append(item)
                first_request.append(i)
            seen.add(item)
    assert n_new > 0
    assert fresh == list(range(n_initial, n_initial + n_new))
    # New items keep arriving through the run instead of all at the start.
    assert first_request[-1] > _N_REQUESTS * 0.9


def test_impressions_are_distinct_items_at_consecutive_positions(traffic: _Traffic) -> None:
    config = traffic.source.config
    k = config.items_per_request
    for i, req in enumerate(traffic.head):
        assert len({imp.item_id for imp in req.impressions}) == k
        assert [imp.position for imp in req.impressions] == list(range(k))
        assert all(imp.event_time_ms == 1_000 * i and imp.request_id == req.request_id for imp in req.impressions)
        assert all(imp.user_id == req.user_id >= 0 for imp in req.impressions)
        assert all(imp.context["device"] in config.devices for imp in req.impressions)
        assert len(req.truth) == len(req.clicked) == k


def test_clicks_refer_to_impressed_items_within_delay_range(traffic: _Traffic) -> None:
    lo, hi = traffic.source.config.click_delay_ms
    assert sum(len(req.clicks) for req in traffic.head) > 100
    for req in traffic.head:
        shown_at = {imp.item_id: imp.event_time_ms for imp in req.impressions}
        clicked_items = {imp.item_id for imp, c in zip(req.impressions, req.clicked, strict=True) if c}
        assert {action.item_id for _, action in req.clicks} == clicked_items
        for delay, action in req.clicks:
            assert lo <= delay <= hi
            assert action.request_id == req.request_id
            assert action.type == events_pb2.ACTION_TYPE_CLICK
            assert action.value == 1.0
            assert action.event_time_ms == shown_at[action.item_id] + delay


def test_truth_equals_click_probability_right_after_serving() -> None:
    source = SyntheticSource(SyntheticConfig(seed=11))
    req = source.next_request(0)
    device = req.impressions[0].context["device"]
    for imp, p in zip(req.impressions, req.truth, strict=True):
        assert source.click_probability(req.user_id, imp.item_id, imp.position, device) == pytest.approx(p)


def test_user_interests_drift_as_the_user_keeps_coming_back() -> None:
    source = SyntheticSource(SyntheticConfig(seed=5))
    warmup = np.array([source.next_request(i).user_id for i in range(500)])
    user = int(np.bincount(warmup).argmax())
    before = source.click_probability(user, 0, 0)
    visits = sum(source.next_request(i).user_id == user for i in range(500, 3_500))
    after = source.click_probability(user, 0, 0)
    assert visits >= 20
    assert after != pytest.approx(before, rel=0.05)


def test_unknown_ids_and_positions_are_rejected() -> None:
    source = SyntheticSource(SyntheticConfig(n_users=10, n_items=20))
    with pytest.raises(ValueError, match="unknown user"):
        source.click_probability(10, 0, 0)
    with pytest.raises(ValueError, match="unknown user"):
        source.click_probability(0, 20, 0)
    with pytest.raises(ValueError, match="position"):
        source.click_probability(0, 0, 5)
    with pytest.raises(ValueError, match="device"):
        source.click_probability(0, 0, 0, device="tv")


def test_position_bias_shorter_than_the_slate_is_rejected() -> None:
    with pytest.raises(ValueError, match="position_bias"):
        SyntheticConfig(items_per_request=6)
