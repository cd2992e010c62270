"""Hand-made model delivery for follower and predictor tests: deltas, decisions and snapshots published
the way the publisher and the validator publish them (the #6 protocol), with the expected replica
content at every version kept alongside, so a test can compare bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from freshet import bus, snapshots
from freshet.delta import DENSE_SHARD, Delta, decision_subject, delta_subject
from freshet.fids import example_fids
from freshet.model.v1 import model_pb2
from freshet.models import ModelConfig
from freshet.replica import Replica

MODEL = "fm"
TABLE = "fm"
ROW_DIM = 9  # 1 + the default 8 factors
USER = 7
ITEMS = np.arange(40, 60, dtype=np.int64)


def candidate_fids(items: np.ndarray = ITEMS) -> np.ndarray:
    """Every fid a Predict for ``USER`` over ``items`` at position 0 reads: int64 [n], sorted."""
    return np.unique(example_fids(USER, items, 0).reshape(-1))


@dataclass
class State:
    """What a replica holds: rows (fid -> float32 [ROW_DIM]) and the dense bias."""

    rows: dict[int, np.ndarray] = field(default_factory=dict)
    bias: float = 0.0

    def copy(self) -> State:
        return State(dict(self.rows), self.bias)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(fids int64 [n] sorted, values float32 [n, ROW_DIM])."""
        fids = np.array(sorted(self.rows), np.int64)
        values = (
            np.stack([self.rows[f] for f in fids.tolist()]) if len(fids) else np.zeros((0, ROW_DIM), np.float32)
        )
        return fids, values.astype(np.float32)

    def scores(self, items: np.ndarray = ITEMS) -> np.ndarray:
        """Scores float32 [n] a replica with exactly this content serves for ``USER`` over ``items``."""
        replica = Replica(ModelConfig())
        fids, values = self.arrays()
        replica.apply(
            Delta(MODEL, TABLE, 0, 0, 0, 0, fids, values, dense={"bias": np.array([self.bias], np.float32)})
        )
        return replica.score(example_fids(USER, items, 0))


class ModelLog:
    """Publishes deltas and decisions of one model and remembers the content at each version.

    ``published`` is what the store would hold (every delta published, approved or not): snapshots
    are written from it, as the publisher exports the store. ``served`` is what a replica following
    the decisions holds, and ``versions`` maps each version (the decision's stream sequence) to it.
    """

    def __init__(self, js) -> None:
        self.js = js
        self.sequences: dict[int, int] = {}  # shard -> last delta sequence published
        self.published = State()
        self.served = State()
        self.versions: dict[int, State] = {0: State()}
        self.snapshots: dict[str, State] = {}  # snapshot id -> its content
        self.last_delta_seq = 0
        self.rng = np.random.default_rng(0)

    def rows(self, fids: np.ndarray, scale: float = 0.3) -> np.ndarray:
        return self.rng.normal(scale=scale, size=(len(fids), ROW_DIM)).astype(np.float32)

    async def publish_delta(
        self,
        fids: np.ndarray | None = None,
        values: np.ndarray | None = None,
        shard: int = 0,
        bias: float | None = None,
        scale: float = 0.3,
    ) -> tuple[Delta, int]:
        """Publishes the shard's next delta (rows of ``fids``, default the candidates' fids, random
        values); a dense delta (shard -1) carries only ``bias``. Returns it and its stream sequence."""
        sequence = self.sequences.get(shard, 0) + 1
        if shard == DENSE_SHARD:
            fids, values = np.zeros(0, np.int64), np.zeros((0, ROW_DIM), np.float32)
        else:
            fids = candidate_fids() if fids is None else fids
            values = self.rows(fids, scale) if values is None else values
        delta = Delta(
            MODEL,
            TABLE if shard != DENSE_SHARD else "",
            shard,
            sequence,
            10 * (sequence - 1),
            10 * sequence,
            fids,
            values,
            dense={} if bias is None else {"bias": np.array([bias], np.float32)},
        )
        stream_seq = await bus.publish(self.js, delta_subject(MODEL, shard), delta.to_proto().SerializeToString())
        self.sequences[shard] = sequence
        self.last_delta_seq = stream_seq
        _apply(self.published, delta)
        return delta, stream_seq

    async def decide(
        self,
        delta: Delta,
        stream_seq: int,
        decision: int = model_pb2.DECISION_APPROVE,
        sequence: int | None = None,
    ) -> int:
        """Publishes a decision on a delta; returns its stream sequence (the version, when approved)."""
        approval = model_pb2.Approval(
            model=MODEL,
            shard=delta.shard,
            sequence=delta.sequence if sequence is None else sequence,
            new_version=delta.new_version,
            delta_stream_seq=stream_seq,
            decision=decision,
            table=delta.table,
            decided_ms=bus.now_ms(),
        )
        seq = await bus.publish(self.js, decision_subject(MODEL), approval.SerializeToString())
        if decision == model_pb2.DECISION_APPROVE:
            _apply(self.served, delta)
            self.versions[seq] = self.served.copy()
        return seq

    async def approved_delta(self, **kwargs) -> int:
        """Publishes a delta and its approval; returns the version."""
        delta, stream_seq = await self.publish_delta(**kwargs)
        return await self.decide(delta, stream_seq)

    async def rollback(self, version: int, snapshot: str = "") -> int:
        """Publishes ROLLBACK to ``version`` (rebuilt from ``snapshot``); returns its stream sequence."""
        approval = model_pb2.Approval(
            model=MODEL,
            decision=model_pb2.DECISION_ROLLBACK,
            rollback_version=version,
            snapshot=snapshot,
            reason="test",
        )
        seq = await bus.publish(self.js, decision_subject(MODEL), approval.SerializeToString())
        self.served = self.versions[version].copy()
        return seq

    async def write_snapshot(self, reason: str = "test") -> model_pb2.SnapshotManifest:
        """Writes a snapshot of ``published`` covering every delta published so far (not yet approved)."""
        fids, values = self.published.arrays()
        chunks = [
            Delta(MODEL, TABLE, 0, 0, 0, 10 * self.sequences.get(0, 0), part_f, part_v)
            for part_f, part_v in zip(np.array_split(fids, 3), np.array_split(values, 3), strict=True)
        ]
        chunks.append(
            Delta(
                MODEL,
                "",
                DENSE_SHARD,
                0,
                0,
                0,
                np.zeros(0, np.int64),
                np.zeros((0, ROW_DIM), np.float32),
                dense={"bias": np.array([self.published.bias], np.float32)},
            )
        )
        manifest = model_pb2.SnapshotManifest(
            model=MODEL,
            shards=[
                model_pb2.ShardPosition(shard=s, sequence=q, table_versions={TABLE: 10 * q})
                for s, q in sorted(self.sequences.items())
                if s != DENSE_SHARD
            ],
            delta_stream_seq=self.last_delta_seq,
            dense_sequence=self.sequences.get(DENSE_SHARD, 0),
            reason=reason,
        )
        written = await snapshots.write_snapshot(self.js, manifest, chunks)
        self.snapshots[written.id] = self.published.copy()
        return written

    async def approve_snapshot(self, manifest: model_pb2.SnapshotManifest) -> tuple[int, int]:
        """Publishes the snapshot's APPROVE on both subjects, as the validator does; returns both sequences.

        A replica loaded from the snapshot serves it as the version of its ``snapshot.approved`` message.
        """
        approval = model_pb2.Approval(
            model=MODEL, snapshot=manifest.id, decision=model_pb2.DECISION_APPROVE, decided_ms=bus.now_ms()
        )
        data = approval.SerializeToString()
        on_decisions = await bus.publish(self.js, decision_subject(MODEL), data)
        on_approved = await bus.publish(self.js, snapshots.approved_subject(MODEL), data)
        self.versions[on_approved] = self.snapshots[manifest.id]
        return on_decisions, on_approved

    async def respond_to_snapshot_requests(self, nc, approve: bool = True) -> list[str]:
        """Answers ``snapshot.request.<m>`` as publisher and validator together: writes a snapshot of
        ``published``, approves it (unless not ``approve``) and replies with the manifest.

        Returns the list the reasons of the requests are appended to.
        """
        reasons: list[str] = []

        async def respond(msg) -> None:
            reasons.append(model_pb2.SnapshotRequest.FromString(msg.data).reason)
            manifest = await self.write_snapshot("on demand")
            if approve:
                await self.approve_snapshot(manifest)
            await msg.respond(manifest.SerializeToString())

        await nc.subscribe(snapshots.request_subject(MODEL), cb=respond)
        return reasons


def _apply(state: State, delta: Delta) -> None:
    state.rows.update(zip(delta.fids.tolist(), delta.values, strict=True))
    if "bias" in delta.dense:
        state.bias = float(delta.dense["bias"][0])
