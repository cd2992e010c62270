"""Follows a model's served state: boot from a snapshot, apply approved deltas, repair gaps, honour rollbacks.

The #6 delivery protocol, as a ``Follower`` holding a ``freshet.replica.Replica``:

- **Boot**: load the latest approved snapshot (``model.<m>.snapshot.approved``), or nothing when
  none was approved, then replay the decisions from the snapshot's ``delta_stream_seq + 1`` up to
  the last decision there is, skipping deltas the snapshot covers; only then is the replica served
  (``ready``), and an ordered consumer (DeliverPolicy BY_START_SEQUENCE) follows the decisions after it.
- **Decisions** (``model.<m>.decision``): a delta APPROVE fetches the delta by its stream sequence
  (direct get) and applies it; a REJECT only counts as decided; a snapshot decision changes nothing.
  Per shard (dense parameters are shard -1) the decided sequences must run last+1, last+2, ...
- **Gaps**: a decision whose sequence jumps, or an approved delta missing from the stream (or
  not decodable, or not the delta the approval names), is never skipped: it is counted, logged and
  repaired by resync: the latest approved snapshot if it covers the missing position, else one
  asked for on ``snapshot.request.<m>`` once the validator approved it; the decisions from the
  snapshot's position up to the current one are replayed on top.
- **ROLLBACK** to X (snapshot S or ""): load S, replay the decisions from its position up to and
  including X, and serve that as version X; decisions after X and before the rollback are revoked.

Atomicity: every rebuild (boot, resync, rollback) fills a *new* ``Replica`` off to the side, with
awaits between chunks and decisions, while readers keep the old one; the follower then swaps the
reference in one assignment on the event loop. A live delta is applied to the served replica in
place, synchronously (no await between its first write and setting ``version``), so a reader that
reads ``follower.replica`` once and scores without awaiting sees one version.

Version: the MODEL stream sequence of the last approval the content reflects: the last applied
delta approval, or, for a replica just loaded from a snapshot, that snapshot's approval message on
``snapshot.approved``. After a rollback to X it is X.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from freshet import bus, snapshots, telemetry
from freshet.delta import DENSE_SHARD, DeltaError, decision_subject, decode_delta
from freshet.model.v1 import model_pb2
from freshet.replica import Replica

logger = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)


@dataclass(frozen=True)
class FollowerSettings:
    """How a follower waits for snapshots while repairing a gap.

    Attributes:
        request_timeout_s: how long a snapshot request waits for the publisher's reply.
        approval_wait_s: how long to wait for the validator to approve a requested snapshot.
        retry_max_s: the longest pause between resync attempts (exponential from 0.1 s).
        idle_poll_s: how long one read of the decision subscription waits before checking for stop.
    """

    request_timeout_s: float = 30.0
    approval_wait_s: float = 30.0
    retry_max_s: float = 5.0
    idle_poll_s: float = 0.25


@dataclass
class FollowerStats:
    """What the follower did, for tests, logs and metrics."""

    applied: int = 0  # delta approvals applied live
    rejected: int = 0  # delta rejections seen live
    skipped: int = 0  # decisions on deltas already decided or covered by the loaded snapshot
    gaps: int = 0  # sequence jumps and missing/unreadable approved deltas found
    resyncs: int = 0  # rebuilds from a snapshot that repaired a gap
    rollbacks: int = 0  # ROLLBACK decisions honoured live
    bad_decisions: int = 0  # undecodable or meaningless decision messages (logged)
    failed_rollbacks: int = 0  # ROLLBACKs whose snapshot or deltas are gone (logged; state kept)
    snapshots_loaded: int = 0


@dataclass
class Gap(Exception):
    """A hole in a shard's delta sequence that the decision stream alone cannot fill.

    ``missing`` is the last sequence of the hole: a snapshot covers it when its position for
    ``shard`` is at least ``missing``.
    """

    shard: int
    missing: int
    decision_seq: int
    reason: str = field(default="")

    def __str__(self) -> str:
        return f"shard {self.shard} up to sequence {self.missing} at decision #{self.decision_seq}: {self.reason}"


@dataclass(frozen=True)
class _Approved:
    """An approved snapshot: its manifest and the stream sequence of its approval on ``snapshot.approved``."""

    manifest: model_pb2.SnapshotManifest
    approval_seq: int


def covers(manifest: model_pb2.SnapshotManifest, shard: int, sequence: int) -> bool:
    """Whether the snapshot holds shard ``shard``'s deltas up to ``sequence``."""
    return position_of(manifest, shard) >= sequence


def position_of(manifest: model_pb2.SnapshotManifest, shard: int) -> int:
    """The last delta sequence of ``shard`` (DENSE_SHARD: the dense deltas) a snapshot covers; 0 if none."""
    if shard == DENSE_SHARD:
        return manifest.dense_sequence
    return next((p.sequence for p in manifest.shards if p.shard == shard), 0)


# Errors of a NATS round trip that a retry can cure (a timeout covers nats.errors.TimeoutError).
_TRANSIENT = (TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionReconnectingError)


class _Stopped(Exception):
    """The follower was asked to stop while waiting."""


class Follower:
    """Keeps ``replica`` at the model's approved state (see the module docstring).

    Use: ``await follower.run(stop)`` in a task; ``follower.replica`` is the served replica (read it
    once per request), ``follower.ready`` is set once the boot catch-up is done.
    """

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        model: str,
        new_replica: Callable[[], Replica],
        settings: FollowerSettings | None = None,
        name: str = "follower",
    ) -> None:
        self.nc = nc
        self.js = js
        self.model = model
        self.new_replica = new_replica
        self.settings = settings or FollowerSettings()
        self.name = name
        self.replica = new_replica()
        self.position = 0  # MODEL stream sequence of the last decision handled
        self.stats = FollowerStats()
        self.ready = asyncio.Event()
        self._changed = asyncio.Condition()
        self._stop = asyncio.Event()

    @property
    def version(self) -> int:
        return self.replica.version

    @property
    def subject(self) -> str:
        return decision_subject(self.model)

    # -- waiting (tests, benchmarks) ---------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Waits until ``predicate()`` holds, re-checked after every decision and swap.

        Raises:
            TimeoutError: it did not hold within ``timeout_s``.
        """
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout_s)

    async def wait_version(self, version: int, timeout_s: float = 10.0) -> None:
        """Waits until the served version is exactly ``version``."""
        await self.wait_for(lambda: self.version == version, timeout_s)

    async def wait_position(self, stream_seq: int, timeout_s: float = 10.0) -> int:
        """Waits until every decision up to MODEL stream sequence ``stream_seq`` is handled; returns the version."""
        await self.wait_for(lambda: self.position >= stream_seq, timeout_s)
        return self.version

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- running ------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Boots, then follows the decisions until ``stop`` is set."""
        self._stop = stop
        try:
            await self._boot()
            await self._follow()
        except _Stopped:
            return

    async def _boot(self) -> None:
        last = await self._last_decision_seq()
        with tracer.start_as_current_span("follower_boot", attributes={"model": self.model, "until": last}):
            replica = await self._rebuild(last, need=None, reason="boot")
        self._swap(replica, last)
        self.ready.set()
        await self._notify()
        logger.info(
            "replica caught up",
            extra={
                "follower": self.name,
                "model": self.model,
                "version": self.version,
                "position": last,
                "snapshot": replica.snapshot,
                "rows": len(replica),
            },
        )

    async def _follow(self) -> None:
        sub = await self._subscribe_from(self.position + 1)
        try:
            while not self._stop.is_set():
                try:
                    msg = await sub.next_msg(timeout=self.settings.idle_poll_s)
                except TimeoutError:
                    continue
                except Exception:  # noqa: BLE001 - the connection closed under us on shutdown
                    if self._stop.is_set() or self.nc.is_closed:
                        return
                    raise
                seq = msg.metadata.sequence.stream
                if seq <= self.position:
                    continue  # a rebuild already read past it
                await self._on_decision(seq, msg.data)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - already closed with the connection
                pass

    async def _on_decision(self, seq: int, data: bytes) -> None:
        approval = self._decode(seq, data, live=True)
        replica = self.replica
        if approval is not None:
            try:
                # A NATS hiccup while fetching is retried: nothing is applied before the fetch succeeds.
                async for attempt in self._retrying(_TRANSIENT):
                    with attempt:
                        replica = await self._step(self.replica, seq, approval, live=True)
            except Gap as gap:
                self._count_gap(gap)
                replica = await self._rebuild(seq, need=gap, reason=f"gap: {gap}")
                self.stats.resyncs += 1
                logger.warning(
                    "gap repaired by resync",
                    extra={
                        "follower": self.name,
                        "model": self.model,
                        "snapshot": replica.snapshot,
                        "version": replica.version,
                    },
                )
        self._swap(replica, seq)
        await self._notify()

    def _swap(self, replica: Replica, position: int) -> None:
        # One assignment: readers hold either the old replica or the new one, never a mix.
        self.replica = replica
        self.position = position

    # -- one decision --------------------------------------------------------------------------------

    def _decode(self, seq: int, data: bytes, live: bool) -> model_pb2.Approval | None:
        try:
            return model_pb2.Approval.FromString(data)
        except Exception as exc:  # noqa: BLE001 - protobuf raises several types for bad bytes
            if live:
                self.stats.bad_decisions += 1
                logger.error("undecodable decision ignored", extra={"stream_seq": seq, "error": str(exc)})
            return None

    async def _step(self, replica: Replica, seq: int, approval: model_pb2.Approval, live: bool) -> Replica:
        """Applies decision #seq to ``replica``, in place, or returns the replica a rollback rebuilt.

        Raises:
            Gap: the decision's sequence jumps, or its approved delta cannot be had from the stream.
        """
        if approval.decision == model_pb2.DECISION_ROLLBACK:
            return await self._rollback(replica, seq, approval, live)
        if approval.snapshot:
            return replica  # a snapshot's APPROVE/REJECT: snapshots are loaded at boot and to repair gaps
        if approval.decision not in (model_pb2.DECISION_APPROVE, model_pb2.DECISION_REJECT):
            if live:
                self.stats.bad_decisions += 1
                logger.error("decision without a verdict ignored", extra={"stream_seq": seq})
            return replica
        shard, sequence = approval.shard, approval.sequence
        last = replica.shard_sequences.get(shard, 0)
        if sequence <= last:
            self.stats.skipped += live
            return replica  # decided already, or covered by the snapshot the replica was loaded from
        if sequence > last + 1:
            raise Gap(shard, sequence - 1, seq, f"decision for sequence {sequence}, expected {last + 1}")
        if approval.decision == model_pb2.DECISION_REJECT:
            replica.advance(shard, sequence)
            self.stats.rejected += live
            return replica
        try:
            raw = await self.js.get_msg(bus.MODEL.name, seq=approval.delta_stream_seq, direct=True)
        except NotFoundError:
            raise Gap(shard, sequence, seq, f"approved delta #{approval.delta_stream_seq} is missing") from None
        with tracer.start_as_current_span(
            "apply_delta",
            context=telemetry.extract_headers(raw.headers),
            attributes={"shard": shard, "sequence": sequence, "version": seq},
        ):
            try:
                delta = decode_delta(raw.data)
            except DeltaError as exc:
                raise Gap(shard, sequence, seq, f"approved delta #{approval.delta_stream_seq}: {exc}") from None
            if (delta.shard, delta.sequence) != (shard, sequence):
                raise Gap(
                    shard,
                    sequence,
                    seq,
                    f"stream message #{approval.delta_stream_seq} holds delta {delta.shard}#{delta.sequence}",
                )
            try:
                replica.apply(delta)
            except ValueError as exc:
                raise Gap(shard, sequence, seq, f"approved delta cannot be applied: {exc}") from None
            # Same synchronous step as the rows: a reader sees the new rows with the new version.
            replica.version = seq
        self.stats.applied += live
        return replica

    def _count_gap(self, gap: Gap) -> None:
        self.stats.gaps += 1
        logger.error(
            "delta sequence gap",
            extra={
                "follower": self.name,
                "model": self.model,
                "shard": gap.shard,
                "missing": gap.missing,
                "stream_seq": gap.decision_seq,
                "reason": gap.reason,
            },
        )

    async def _rollback(self, current: Replica, seq: int, approval: model_pb2.Approval, live: bool) -> Replica:
        target = approval.rollback_version
        try:
            with tracer.start_as_current_span(
                "rollback", attributes={"model": self.model, "version": target, "snapshot": approval.snapshot}
            ):
                source = None
                if approval.snapshot:
                    manifest = await snapshots.read_manifest(self.js, self.model, approval.snapshot)
                    source = _Approved(manifest, target)
                rebuilt = await self._build(source, target)
        except (Gap, snapshots.SnapshotError) as exc:
            # The state at X cannot be rebuilt (its snapshot or a delta is gone): keep serving what
            # we have rather than a guess, and say so loudly. Retrying cannot bring them back.
            self.stats.failed_rollbacks += live
            logger.error(
                "rollback cannot be honoured",
                extra={
                    "follower": self.name,
                    "model": self.model,
                    "version": target,
                    "stream_seq": seq,
                    "error": str(exc),
                },
            )
            return current
        rebuilt.version = target
        # Approvals after X are revoked, but their sequences stay decided: the deltas after the
        # rollback continue from them, and must not look like a gap.
        for shard, sequence in current.shard_sequences.items():
            rebuilt.advance(shard, sequence)
        if live:
            self.stats.rollbacks += 1
            logger.warning(
                "rolled back",
                extra={
                    "follower": self.name,
                    "model": self.model,
                    "version": target,
                    "snapshot": approval.snapshot,
                    "stream_seq": seq,
                    "reason": approval.reason,
                },
            )
        return rebuilt

    # -- rebuilding ----------------------------------------------------------------------------------

    async def _rebuild(self, until: int, need: Gap | None, reason: str) -> Replica:
        """A new replica at decision ``until``: from the latest approved snapshot (one covering
        ``need`` when given, asked for if there is none), plus the decisions after it.

        Retries (tenacity, until stopped) when no covering snapshot can be had yet, or when the
        replay finds another gap.
        """
        async for attempt in self._retrying((snapshots.SnapshotError, Gap, *_TRANSIENT)):
            with attempt:
                source = await self._latest_approved()
                if need is not None and (source is None or not covers(source.manifest, need.shard, need.missing)):
                    source = await self._requested_snapshot(need, reason)
                try:
                    return await self._build(source, until)
                except Gap as gap:
                    self._count_gap(gap)
                    need = gap
                    raise
        raise _Stopped

    def _retrying(self, errors: tuple[type[BaseException], ...]) -> AsyncRetrying:
        """Retries on ``errors`` with exponential pauses up to ``retry_max_s``, until the follower stops."""
        return AsyncRetrying(
            retry=retry_if_exception_type(errors),
            wait=wait_exponential(multiplier=0.1, max=self.settings.retry_max_s),
            stop=self._stopped,
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )

    def _stopped(self, retry_state: RetryCallState) -> bool:
        if self._stop.is_set():
            raise _Stopped
        return False

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            return
        raise _Stopped

    def _log_retry(self, retry_state: RetryCallState) -> None:
        logger.warning(
            "follower step failed; retrying",
            extra={
                "follower": self.name,
                "model": self.model,
                "attempt": retry_state.attempt_number,
                "error": str(retry_state.outcome.exception()) if retry_state.outcome else "",
            },
        )

    async def _requested_snapshot(self, need: Gap, reason: str) -> _Approved:
        """Asks the publisher for a snapshot and waits until the validator approved one covering ``need``.

        Raises:
            snapshots.SnapshotError: no reply, an error reply, or no covering approval in time.
        """
        manifest = await snapshots.request_snapshot(
            self.nc, self.model, reason, timeout_s=self.settings.request_timeout_s
        )
        logger.info(
            "snapshot requested", extra={"follower": self.name, "model": self.model, "snapshot": manifest.id}
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.approval_wait_s
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(snapshots.SnapshotError),
            wait=wait_exponential(multiplier=0.02, max=0.5),
            stop=lambda rs: self._stopped(rs) or loop.time() >= deadline,
            sleep=self._sleep,
            reraise=True,
        ):
            with attempt:
                source = await self._latest_approved()
                if source is None or source.manifest.id < manifest.id:
                    raise snapshots.SnapshotError(f"snapshot {manifest.id} not approved yet")
                if not covers(source.manifest, need.shard, need.missing):
                    raise snapshots.SnapshotError(f"approved snapshot {source.manifest.id} does not cover {need}")
                return source
        raise AssertionError("unreachable")

    async def _latest_approved(self) -> _Approved | None:
        found = await snapshots.latest_approved(self.js, self.model)
        return None if found is None else _Approved(found.manifest, found.seq)

    async def _last_decision_seq(self) -> int:
        try:
            return (await self.js.get_last_msg(bus.MODEL.name, self.subject)).seq
        except NotFoundError:
            return 0

    async def _build(self, source: _Approved | None, until: int) -> Replica:
        """A new replica: the snapshot's rows (if any), then the decisions after its position up to ``until``.

        Raises:
            Gap: the replay met a hole; snapshots.SnapshotError: the snapshot cannot be read.
        """
        replica = self.new_replica()
        start = 1
        if source is not None:
            await self._load(replica, source)
            start = source.manifest.delta_stream_seq + 1
        async with aclosing(self._decisions(start, until)) as decisions:
            async for seq, data in decisions:
                approval = self._decode(seq, data, live=False)
                if approval is not None:
                    replica = await self._step(replica, seq, approval, live=False)
        return replica

    async def _load(self, replica: Replica, source: _Approved) -> None:
        manifest = source.manifest
        with tracer.start_as_current_span("load_snapshot", attributes={"snapshot": manifest.id}):
            async for chunk in snapshots.read_chunks(self.js, manifest):
                if self._stop.is_set():
                    raise _Stopped
                try:
                    replica.apply(chunk)
                except ValueError as exc:
                    raise snapshots.SnapshotError(
                        f"snapshot {manifest.id} does not fit the model: {exc}"
                    ) from None
        for position in manifest.shards:
            replica.advance(position.shard, position.sequence)
            for table, version in position.table_versions.items():
                replica.table_versions[(position.shard, table)] = version
        replica.advance(DENSE_SHARD, manifest.dense_sequence)
        replica.snapshot = manifest.id
        replica.version = source.approval_seq
        self.stats.snapshots_loaded += 1
        logger.info(
            "snapshot loaded",
            extra={"follower": self.name, "model": self.model, "snapshot": manifest.id, "rows": len(replica)},
        )

    async def _subscribe_from(self, start: int):
        """An ordered consumer of the decision subject from stream sequence ``start`` on."""
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        return await self.js.subscribe(
            self.subject,
            stream=bus.MODEL.name,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            config=config,
        )

    async def _decisions(self, start: int, until: int) -> AsyncIterator[tuple[int, bytes]]:
        """Decision messages (stream sequence, bytes) with start <= sequence <= until, in order."""
        until = min(until, await self._last_decision_seq())
        if until < start:
            return
        sub = await self._subscribe_from(start)
        try:
            while True:
                if self._stop.is_set():
                    raise _Stopped
                try:
                    msg = await sub.next_msg(timeout=self.settings.idle_poll_s)
                except TimeoutError:
                    continue
                seq = msg.metadata.sequence.stream
                if seq > until:
                    return
                yield seq, msg.data
                if seq >= until or msg.metadata.num_pending == 0:
                    return
        finally:
            await sub.unsubscribe()
