"""Which delta positions a snapshot covers (the follower skips those and repairs gaps with it)."""

from __future__ import annotations

from freshet.delta import DENSE_SHARD
from freshet.follower import Gap, covers, position_of
from freshet.model.v1 import model_pb2


def _manifest() -> model_pb2.SnapshotManifest:
    return model_pb2.SnapshotManifest(
        model="fm",
        id="s",
        shards=[model_pb2.ShardPosition(shard=0, sequence=7), model_pb2.ShardPosition(shard=2, sequence=3)],
        dense_sequence=4,
    )


def test_a_snapshot_covers_each_shard_up_to_its_position_and_dense_deltas_up_to_dense_sequence():
    manifest = _manifest()
    assert covers(manifest, 0, 7) and not covers(manifest, 0, 8)
    assert covers(manifest, 2, 3) and not covers(manifest, 2, 4)
    assert covers(manifest, DENSE_SHARD, 4) and not covers(manifest, DENSE_SHARD, 5)


def test_a_shard_the_snapshot_does_not_list_is_covered_by_nothing():
    assert position_of(_manifest(), 1) == 0
    assert not covers(_manifest(), 1, 1)


def test_a_gap_names_its_shard_the_end_of_the_hole_and_the_decision():
    gap = Gap(3, 9, 120, "decision for sequence 10, expected 6")
    assert str(gap) == "shard 3 up to sequence 9 at decision #120: decision for sequence 10, expected 6"
