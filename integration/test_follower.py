"""The served-state follower on a real nats-server: boot from a snapshot, gap repair, rollback.

Deltas, decisions and snapshots are published by hand (``integration.delivery``) exactly as the
publisher and validator publish them, and every version's expected content is known, so replicas
are compared bit for bit.
"""

from __future__ import annotations

import asyncio

import nats.errors
import numpy as np
import pytest

from freshet import bus
from freshet.config import BusConfig
from freshet.delta import DENSE_SHARD
from freshet.follower import Follower, FollowerSettings
from freshet.models import ModelConfig
from freshet.replica import Replica
from integration.delivery import MODEL, TABLE, ModelLog, State, candidate_fids

_SETTINGS = FollowerSettings(request_timeout_s=5.0, approval_wait_s=5.0, retry_max_s=0.2, idle_poll_s=0.05)


@pytest.fixture
async def nc(nats_url):
    conn = await bus.connect(BusConfig(nats_url=nats_url), "test-follower")
    yield conn
    await conn.close()


@pytest.fixture
def log(js) -> ModelLog:
    return ModelLog(js)


class Running:
    """Followers started on demand, each on its own connection and stopped at the end of the test."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.conns = []

    async def start(self, name: str = "follower") -> Follower:
        conn = await bus.connect(BusConfig(nats_url=self.nats_url), name)
        self.conns.append(conn)
        follower = Follower(conn, conn.jetstream(), MODEL, lambda: Replica(ModelConfig()), _SETTINGS, name=name)
        self.tasks.append(asyncio.create_task(follower.run(self.stop)))
        return follower

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)  # a crash of a follower fails the test here
        for conn in self.conns:
            await conn.close()


@pytest.fixture
async def running(nats_url):
    followers = Running(nats_url)
    yield followers
    await followers.close()


def _holds(follower: Follower, state: State) -> bool:
    """The follower's replica holds exactly ``state``: rows bit for bit, and the dense bias."""
    replica = follower.replica
    fids, values = state.arrays()
    bias = float(replica.model.state_dict()["bias"][0])
    return replica.equal_rows(TABLE, fids, values) and bias == np.float32(state.bias)


async def test_a_late_follower_boots_from_the_approved_snapshot_and_replays_only_what_it_does_not_cover(
    running, log, js
):
    covered = []
    for i in range(3):
        delta, seq = await log.publish_delta(fids=candidate_fids()[i::2])
        await log.decide(delta, seq)
        covered.append(seq)
    dense, dense_seq = await log.publish_delta(shard=DENSE_SHARD, bias=0.25)
    await log.decide(dense, dense_seq)
    snapshot = await log.write_snapshot()
    await log.approved_delta(fids=candidate_fids()[:5])
    await log.approve_snapshot(snapshot)
    await log.approved_delta(shard=DENSE_SHARD, bias=-0.5)
    last = await log.approved_delta(fids=candidate_fids()[3:9])
    # The covered deltas are gone from the stream: fetching one would be a gap.
    for seq in [*covered, dense_seq]:
        await js.delete_msg(bus.MODEL.name, seq)

    follower = await running.start()
    await asyncio.wait_for(follower.ready.wait(), 10)

    assert follower.version == last and follower.position == last
    assert follower.replica.snapshot == snapshot.id
    assert _holds(follower, log.served)
    assert follower.stats.gaps == 0 and follower.stats.snapshots_loaded == 1
    assert follower.replica.shard_sequences == {0: 5, DENSE_SHARD: 2}


async def test_a_deleted_approved_delta_is_a_gap_repaired_by_a_requested_snapshot(running, log, js, nc):
    reasons = await log.respond_to_snapshot_requests(nc)
    follower = await running.start()
    v1 = await log.approved_delta()
    await follower.wait_version(v1)

    missing, missing_seq = await log.publish_delta(fids=candidate_fids()[::3])
    await js.delete_msg(bus.MODEL.name, missing_seq)  # lost before the follower fetched it
    third, third_seq = await log.publish_delta(fids=candidate_fids()[1::3])
    gap_decision = await log.decide(missing, missing_seq)
    after = await log.decide(third, third_seq)

    await follower.wait_position(after, timeout_s=15)
    assert follower.stats.gaps == 1 and follower.stats.resyncs == 1
    assert len(reasons) == 1 and "missing" in reasons[0]
    # The snapshot holds what the store held when asked (deltas 1-3): the deleted delta's rows too.
    assert _holds(follower, log.published)
    assert follower.version > gap_decision and follower.replica.shard_sequences[0] == 3
    assert follower.stats.skipped == 1  # delta 3's approval: covered by the snapshot

    v4 = await log.approved_delta()
    await follower.wait_version(v4)
    assert _holds(follower, log.published) and follower.stats.gaps == 1


async def test_a_sequence_jump_is_repaired_from_the_latest_approved_snapshot_when_it_covers_the_hole(
    running, log, js
):
    follower = await running.start()
    v1 = await log.approved_delta()
    await follower.wait_version(v1)

    second, second_seq = await log.publish_delta(fids=candidate_fids()[:4])
    third, third_seq = await log.publish_delta(fids=candidate_fids()[2:8])
    snapshot = await log.write_snapshot()
    _, approved_seq = await log.approve_snapshot(snapshot)
    # The decision on delta 2 never comes: 3 follows 1. No responder: the approved snapshot must do.
    jump = await log.decide(third, third_seq)

    await follower.wait_position(jump, timeout_s=15)
    assert follower.stats.gaps == 1 and follower.stats.resyncs == 1
    assert follower.version == approved_seq and follower.replica.snapshot == snapshot.id
    assert _holds(follower, log.snapshots[snapshot.id])
    assert second_seq  # published (its rows are in the snapshot) but never decided


async def test_rollback_serves_the_rows_of_that_version_again_and_continues_after_it(running, log, js):
    follower = await running.start()
    await log.approved_delta(shard=DENSE_SHARD, bias=0.1)
    await log.approved_delta()
    snapshot = await log.write_snapshot()
    await log.approve_snapshot(snapshot)
    v3 = await log.approved_delta(fids=candidate_fids()[::2])
    at_v3 = log.versions[v3]
    await log.approved_delta(shard=DENSE_SHARD, bias=3.0)
    v5 = await log.approved_delta(fids=candidate_fids()[1::2], scale=5.0)
    await follower.wait_version(v5)
    before = follower.replica

    rollback = await log.rollback(v3, snapshot.id)
    await follower.wait_position(rollback)
    assert follower.version == v3 and _holds(follower, at_v3)
    assert follower.stats.rollbacks == 1 and follower.replica is not before  # rebuilt aside, swapped in
    # Revoked deltas stay decided: the next ones continue their sequences without a gap.
    v6 = await log.approved_delta(fids=candidate_fids()[:3])
    await follower.wait_version(v6)
    assert _holds(follower, log.served) and follower.stats.gaps == 0

    # A rollback from the start of the stream (no snapshot), to a version before the snapshot.
    first = min(v for v in log.versions if v)
    rollback = await log.rollback(first)
    await follower.wait_position(rollback)
    assert follower.version == first and _holds(follower, log.versions[first])

    # A follower booting now replays both rollbacks and ends with the same content.
    v7 = await log.approved_delta(fids=candidate_fids()[5:7])
    late = await running.start("late")
    await asyncio.wait_for(late.ready.wait(), 10)
    await follower.wait_version(v7)
    assert late.version == follower.version == v7
    assert _holds(late, log.served) and _holds(follower, log.served)
    assert late.stats.rollbacks == 0  # honoured while booting, not counted as live rollbacks


async def test_a_rollback_to_a_snapshot_that_is_gone_keeps_the_state_and_says_so(running, log):
    follower = await running.start()
    v1 = await log.approved_delta()
    rollback = await log.rollback(v1, "000000000000001-000000")
    await follower.wait_position(rollback)
    assert follower.version == v1 and follower.stats.failed_rollbacks == 1 and follower.stats.rollbacks == 0


async def test_a_nats_timeout_while_fetching_an_approved_delta_is_retried_not_a_gap(running, log):
    follower = await running.start()
    await asyncio.wait_for(follower.ready.wait(), 10)
    get_msg, failures = follower.js.get_msg, []

    async def flaky_get_msg(*args, **kwargs):
        if not failures:
            failures.append(kwargs.get("seq"))
            raise nats.errors.TimeoutError
        return await get_msg(*args, **kwargs)

    follower.js.get_msg = flaky_get_msg
    v1 = await log.approved_delta()
    await follower.wait_version(v1)
    assert len(failures) == 1 and follower.stats.gaps == 0 and _holds(follower, log.served)
