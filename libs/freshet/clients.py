"""Async gRPC clients of the embedding store and the predictor, speaking numpy at the edge.

Calls carry the caller's trace context and wait for the server to be ready (bounded by the
call timeout), so services can start in any order.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import numpy as np

from freshet import telemetry
from freshet.fids import shard_of
from freshet.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from freshet.store.v1 import store_pb2, store_pb2_grpc
from freshet.tensors import from_tensor, to_tensor

_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


@dataclass(frozen=True)
class ExportedRows:
    """A page of rows changed since a version."""

    fids: np.ndarray  # int64 [n]
    values: np.ndarray  # float32 [n, dim]
    versions: np.ndarray  # int64 [n]
    next_version: int
    has_more: bool


class _Client:
    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.channel = grpc.aio.insecure_channel(address, options=_OPTIONS)

    def _kw(self) -> dict:
        return {"timeout": self.timeout_s, "wait_for_ready": True, "metadata": telemetry.grpc_metadata()}

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


PushPart = tuple[str, np.ndarray, np.ndarray, "np.ndarray | None"]  # table, fids [n], grads [n, dim], counts [n]
PullPart = tuple[str, np.ndarray]  # table, fids [n]


def _push_request(
    table: str, fids: np.ndarray, grads: np.ndarray, counts: np.ndarray | None = None
) -> store_pb2.PushRequest:
    req = store_pb2.PushRequest(table=table, fids=to_tensor(fids), grads=to_tensor(grads.astype(np.float32)))
    if counts is not None:
        req.counts.CopyFrom(to_tensor(np.asarray(counts, np.int32)))
    return req


class StoreRestarted(RuntimeError):
    """A store shard answered from a new process: writes acknowledged after its last checkpoint are gone.

    Raised by every call answered by the new process (its effect did happen there) until the caller,
    having dealt with the loss, calls ``forget_incarnation``; a Checkpoint is refused meanwhile, so the
    loss cannot be made durable by accident.
    """

    def __init__(self, address: str) -> None:
        super().__init__(f"store shard {address} restarted and restored its last checkpoint")
        self.address = address


class StoreClient(_Client):
    """Client of one embedding store shard.

    It remembers the shard's incarnation (``DescribeResponse.incarnation``) from the first answer on;
    a Pull, Push or Describe answered by another incarnation raises ``StoreRestarted``, and so does
    every later one until ``forget_incarnation``.
    """

    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        super().__init__(address, timeout_s)
        self.stub = store_pb2_grpc.EmbeddingStoreStub(self.channel)
        self.incarnation = 0  # 0: not known yet

    def _seen(self, incarnation: int) -> None:
        if not incarnation:  # a server that does not report one
            return
        if not self.incarnation:
            self.incarnation = incarnation
        elif incarnation != self.incarnation:
            raise StoreRestarted(self.address)

    def forget_incarnation(self) -> None:
        """Accepts whichever incarnation answers next (after the caller has handled a restart)."""
        self.incarnation = 0

    async def pull(self, table: str, fids: np.ndarray) -> np.ndarray:
        """Rows of fids int64 [n]: float32 [n, dim]."""
        resp = await self.stub.Pull(store_pb2.PullRequest(table=table, fids=to_tensor(fids)), **self._kw())
        self._seen(resp.incarnation)
        return from_tensor(resp.values, np.float32, 2, "values")

    async def push(self, table: str, fids: np.ndarray, grads: np.ndarray, counts: np.ndarray | None = None) -> int:
        """Applies gradients float32 [n, dim] (summed over ``counts`` samples each); returns the table version."""
        resp = await self.stub.Push(_push_request(table, fids, grads, counts), **self._kw())
        self._seen(resp.incarnation)
        return resp.version

    async def push_pull(self, pushes: list[PushPart], pulls: list[PullPart]) -> tuple[list[int], list[np.ndarray]]:
        """Applies ``pushes`` in order, then reads ``pulls``, in one call (see ``ShardedStoreClient.push_pull``).

        Returns:
            The table version after each push, and the rows float32 [n, dim] of each pull.
        """
        req = store_pb2.PushPullRequest(
            pushes=[_push_request(*p) for p in pushes],
            pulls=[store_pb2.PullRequest(table=table, fids=to_tensor(fids)) for table, fids in pulls],
        )
        resp = await self.stub.PushPull(req, **self._kw())
        self._seen(resp.incarnation)
        return [p.version for p in resp.pushes], [
            from_tensor(p.values, np.float32, 2, "values") for p in resp.pulls
        ]

    async def export(self, table: str, since_version: int, limit: int = 0) -> ExportedRows:
        """One page of rows changed after ``since_version``."""
        req = store_pb2.ExportRequest(table=table, since_version=since_version, limit=limit)
        resp = await self.stub.Export(req, **self._kw())
        return ExportedRows(
            fids=from_tensor(resp.fids, np.int64, 1, "fids"),
            values=from_tensor(resp.values, np.float32, 2, "values"),
            versions=from_tensor(resp.versions, np.int64, 1, "versions"),
            next_version=resp.next_version,
            has_more=resp.has_more,
        )

    async def describe(self) -> store_pb2.DescribeResponse:
        resp = await self.stub.Describe(store_pb2.DescribeRequest(), **self._kw())
        self._seen(resp.incarnation)
        return resp

    async def checkpoint(self, tag: str = "", snapshot_dir: str = "") -> store_pb2.CheckpointResponse:
        """Makes the shard durable now, storing ``tag`` with the checkpoint; optionally a full snapshot too.

        Raises:
            StoreRestarted: the shard restarted since this client last heard from it; nothing was checkpointed.
        """
        req = store_pb2.CheckpointRequest(
            tag=tag, snapshot_dir=snapshot_dir, expected_incarnation=self.incarnation
        )
        try:
            return await self.stub.Checkpoint(req, **self._kw())
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:
                raise
            raise StoreRestarted(self.address) from None

    async def rollback(self, expected_tag: str = "") -> store_pb2.CheckpointResponse:
        """Returns every table of the shard to its last checkpoint; a non-empty ``expected_tag`` must be its tag.

        Raises:
            grpc.aio.AioRpcError: FAILED_PRECONDITION (no data dir, or another tag; nothing rolled back).
        """
        req = store_pb2.RollbackRequest(expected_tag=expected_tag)
        return await self.stub.Rollback(req, **self._kw())


class ShardedStoreClient:
    """Client of a store split into shards by ``freshet.fids.shard_of``.

    Pull and Push deduplicate fids, send each shard its part concurrently and merge the answers
    back into request order (a duplicated fid's gradients are summed before sending).
    """

    def __init__(self, addresses: list[str] | tuple[str, ...], timeout_s: float = 10.0) -> None:
        if not addresses:
            raise ValueError("ShardedStoreClient needs at least one shard address")
        self.shards = [StoreClient(a, timeout_s) for a in addresses]

    def _split(self, unique: np.ndarray) -> list[np.ndarray]:
        if len(self.shards) == 1:
            return [np.arange(len(unique))]
        owner = shard_of(unique, len(self.shards))
        return [np.flatnonzero(owner == i) for i in range(len(self.shards))]

    @staticmethod
    def _dedupe(fids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(distinct fids, inverse) — inverse ``None`` when fids are already strictly increasing,
        as the trainer's are (it deduplicates before pulling): one linear check, no second sort."""
        if len(fids) < 2 or bool(np.all(fids[1:] > fids[:-1])):
            return fids, None
        return np.unique(fids, return_inverse=True)

    async def pull(self, table: str, fids: np.ndarray) -> np.ndarray:
        """Rows of fids int64 [n] (duplicates allowed): float32 [n, dim]."""
        unique, inverse = self._dedupe(fids)
        if len(self.shards) == 1:  # no split, no merge, no task per shard; a writable copy of the answer
            values = (await self.shards[0].pull(table, unique)).copy() if len(unique) else _no_rows()
        else:
            parts = self._split(unique)
            answers = await asyncio.gather(
                *(
                    shard.pull(table, unique[idx])
                    for shard, idx in zip(self.shards, parts, strict=True)
                    if len(idx)
                )
            )
            values = _merge(len(unique), parts, answers)
        return values if inverse is None else values[inverse]

    async def push(
        self, table: str, fids: np.ndarray, grads: np.ndarray, counts: np.ndarray | None = None
    ) -> list[int]:
        """Applies gradients float32 [n, dim]; returns each shard's table version after the update.

        ``counts`` (int [n], optional): the samples each gradient sums over, for the store's row frequencies.
        """
        unique, summed, counts = self._sum(fids, grads, counts)
        if not len(unique):
            return []
        if len(self.shards) == 1:
            return [await self.shards[0].push(table, unique, summed, counts)]
        parts = self._split(unique)
        return list(
            await asyncio.gather(
                *(
                    shard.push(table, unique[idx], summed[idx], None if counts is None else counts[idx])
                    for shard, idx in zip(self.shards, parts, strict=True)
                    if len(idx)
                )
            )
        )

    async def push_pull(self, pushes: list[PushPart], pulls: list[PullPart]) -> list[np.ndarray]:
        """Pushes, then pulls, with one ``PushPull`` call per shard concerned, concurrently.

        On each shard every push (as ``push``: duplicates summed) is applied before any pull reads, so
        the pulls see the pushes. Across shards there is no such order, nor any need for one: a fid
        lives on one shard.

        Args:
            pushes: (table, fids int64 [n], grads float32 [n, dim], counts int [n] or None) each.
            pulls: (table, fids int64 [n], duplicates allowed) each.

        Returns:
            The rows float32 [n, dim] of each pull, in order.
        """
        summed = [(table, *self._sum(fids, grads, counts)) for table, fids, grads, counts in pushes]
        deduped = [(table, *self._dedupe(fids)) for table, fids in pulls]
        if len(self.shards) == 1:
            _, values = await self.shards[0].push_pull(summed, [(table, unique) for table, unique, _ in deduped])
            return [  # writable arrays, not views on the answer's bytes
                v.copy() if inverse is None else v[inverse]
                for v, (_, _, inverse) in zip(values, deduped, strict=True)
            ]
        push_parts = [self._split(unique) for _, unique, _, _ in summed]
        pull_parts = [self._split(unique) for _, unique, _ in deduped]
        calls, answered = [], []
        for s, shard in enumerate(self.shards):
            shard_pushes = [
                (table, unique[idx[s]], grads[idx[s]], None if counts is None else counts[idx[s]])
                for (table, unique, grads, counts), idx in zip(summed, push_parts, strict=True)
                if len(idx[s])
            ]
            shard_pulls = [
                (table, unique[idx[s]]) for (table, unique, _), idx in zip(deduped, pull_parts, strict=True)
            ]
            if shard_pushes or any(len(f) for _, f in shard_pulls):
                calls.append(shard.push_pull(shard_pushes, shard_pulls))
                answered.append(s)
        results = dict(zip(answered, await asyncio.gather(*calls), strict=True))
        out = []
        for i, (_, unique, inverse) in enumerate(deduped):
            parts = pull_parts[i]
            answers = [results[s][1][i] for s in range(len(self.shards)) if s in results and len(parts[s])]
            values = _merge(len(unique), parts, answers)
            out.append(values if inverse is None else values[inverse])
        return out

    def _sum(
        self, fids: np.ndarray, grads: np.ndarray, counts: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Distinct fids, their summed gradients and summed counts."""
        unique, inverse = self._dedupe(fids)
        if inverse is None:
            return unique, grads, counts
        summed = np.zeros((len(unique), grads.shape[1]), np.float32)
        np.add.at(summed, inverse, grads)
        if counts is not None:
            counts = np.bincount(inverse, weights=counts, minlength=len(unique)).astype(np.int32)
        return unique, summed, counts

    async def describe(self) -> list[store_pb2.DescribeResponse]:
        return list(await asyncio.gather(*(s.describe() for s in self.shards)))

    def forget_incarnations(self) -> None:
        """See ``StoreClient.forget_incarnation``: every shard's next answer sets its incarnation."""
        for shard in self.shards:
            shard.forget_incarnation()

    async def checkpoint(self, tag: str = "") -> list[store_pb2.CheckpointResponse]:
        """Checkpoints every shard with the same tag."""
        return list(await asyncio.gather(*(s.checkpoint(tag) for s in self.shards)))

    async def rollback(self, expected_tag: str = "") -> list[store_pb2.CheckpointResponse]:
        """Rolls every shard back to its last checkpoint (see ``StoreClient.rollback``), concurrently.

        Each shard is all-or-nothing; if one fails, the others may have rolled back. Rolling back
        again to the same checkpoint is harmless (same values, new versions), so a caller retries.
        """
        return list(await asyncio.gather(*(s.rollback(expected_tag) for s in self.shards)))

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.shards))

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _no_rows() -> np.ndarray:
    return np.empty((0, 0), np.float32)


def _merge(n: int, parts: list[np.ndarray], answers: list[np.ndarray]) -> np.ndarray:
    """Rows [n, dim] from each shard's answer (``answers`` holds one per non-empty part, in shard order)."""
    dim = answers[0].shape[1] if answers else 0
    values = np.empty((n, dim), np.float32)
    it = iter(answers)
    for idx in parts:
        if len(idx):
            values[idx] = next(it)
    return values


class PredictorClient(_Client):
    """Client of a predictor replica."""

    def __init__(self, address: str, timeout_s: float = 5.0) -> None:
        super().__init__(address, timeout_s)
        self.stub = predictor_pb2_grpc.PredictorStub(self.channel)

    async def predict(
        self,
        model: str,
        user_id: int,
        item_ids: np.ndarray,
        position: int = 0,
        context: dict[str, str] | None = None,
    ) -> tuple[np.ndarray, int]:
        """Scores float32 [n] of the candidates and the model version that produced them."""
        req = predictor_pb2.PredictRequest(
            model=model,
            user_id=user_id,
            item_ids=to_tensor(np.asarray(item_ids, np.int64)),
            position=position,
            context=context or {},
        )
        resp = await self.stub.Predict(req, **self._kw())
        return from_tensor(resp.scores, np.float32, 1, "scores"), resp.model_version
