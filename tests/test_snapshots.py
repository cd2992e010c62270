"""Naming of snapshots and of the subjects around them (no NATS needed)."""

from __future__ import annotations

from freshet import snapshots
from freshet.delta import DENSE_SHARD, delta_subject, dense_subject


def test_subjects_of_the_delivery_protocol():
    assert snapshots.candidate_subject("fm") == "model.fm.snapshot.candidate"
    assert snapshots.approved_subject("fm") == "model.fm.snapshot.approved"
    assert snapshots.request_subject("fm") == "snapshot.request.fm"
    assert dense_subject("fm") == "model.fm.delta.dense"
    assert delta_subject("fm", DENSE_SHARD) == dense_subject("fm")
    assert delta_subject("fm", 2) == "model.fm.delta.2"


def test_snapshot_ids_sort_by_creation_time_and_differ_within_one_millisecond():
    same_ms = [snapshots.new_snapshot_id(1_700_000_000_000) for _ in range(3)]
    later = snapshots.new_snapshot_id(1_700_000_000_001)
    assert len(set(same_ms)) == 3
    assert sorted(same_ms) == same_ms
    assert max(same_ms) < later
    assert snapshots.new_snapshot_id(999) < snapshots.new_snapshot_id(1_000)


def test_object_names_put_each_snapshot_under_its_model_and_id():
    assert snapshots.chunk_object("fm", "0001-000000", 3) == "fm/0001-000000/3"
    assert snapshots.manifest_object("fm", "0001-000000") == "fm/0001-000000/manifest"
