"""The join state machine: positives at once, negatives on expiry, early clicks, duplicates."""

from __future__ import annotations

from freshet.events.v1 import events_pb2
from services.joiner.join import JoinState


def imp(request_id: str, item: int) -> events_pb2.Impression:
    return events_pb2.Impression(request_id=request_id, user_id=1, item_id=item)


def click(request_id: str, item: int) -> events_pb2.Action:
    return events_pb2.Action(request_id=request_id, item_id=item, type=events_pb2.ACTION_TYPE_CLICK)


def test_click_on_a_held_impression_yields_a_positive_at_once_with_both_handles():
    state = JoinState(window_s=10)
    assert state.on_impression(imp("r", 1), "h-imp", now=0.0) is None
    res = state.on_click(click("r", 1), "h-click", now=1.0)
    assert res.label == 1.0 and res.handles == ("h-imp", "h-click") and res.impression.item_id == 1
    negatives, orphans = state.expire(now=100.0)
    assert negatives == [] and orphans == []


def test_impression_without_click_becomes_a_negative_only_after_the_window():
    state = JoinState(window_s=10)
    state.on_impression(imp("r", 1), "h", now=0.0)
    assert state.expire(now=9.9) == ([], [])
    negatives, _ = state.expire(now=10.0)
    assert [(n.label, n.handles) for n in negatives] == [(0.0, ("h",))]


def test_click_arriving_before_its_impression_waits_and_joins():
    state = JoinState(window_s=10)
    assert state.on_click(click("r", 1), "h-click", now=0.0) is None
    res = state.on_impression(imp("r", 1), "h-imp", now=2.0)
    assert res.label == 1.0 and set(res.handles) == {"h-imp", "h-click"}


def test_click_whose_impression_never_comes_is_an_orphan_after_the_window():
    state = JoinState(window_s=10)
    state.on_click(click("r", 1), "h-click", now=0.0)
    negatives, orphans = state.expire(now=11.0)
    assert negatives == [] and orphans == ["h-click"] and state.counts["orphan_clicks"] == 1


def test_duplicate_impressions_and_clicks_are_acknowledged_without_a_sample():
    state = JoinState(window_s=10)
    state.on_impression(imp("r", 1), "h1", now=0.0)
    dup = state.on_impression(imp("r", 1), "h2", now=0.5)
    assert dup.label < 0 and dup.handles == ("h2",)
    state.on_click(click("r", 1), "c1", now=1.0)
    dup_click = state.on_click(click("r", 1), "c2", now=1.5)
    assert dup_click.label < 0 and dup_click.handles == ("c2",)
    # a duplicate impression after the positive must not turn into a negative later
    late_dup = state.on_impression(imp("r", 1), "h3", now=2.0)
    assert late_dup.label < 0
    assert state.expire(now=12.0)[0] == []
    assert state.counts["positives"] == 1 and state.counts["duplicate_impressions"] == 2


def test_same_request_different_items_join_independently():
    state = JoinState(window_s=10)
    state.on_impression(imp("r", 1), "a", now=0.0)
    state.on_impression(imp("r", 2), "b", now=0.0)
    assert state.on_click(click("r", 2), "c", now=1.0).impression.item_id == 2
    negatives, _ = state.expire(now=10.0)
    assert [n.impression.item_id for n in negatives] == [1]
