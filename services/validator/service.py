"""The validator: gates every candidate delta and snapshot, and rolls predictors back on degradation.

One durable consumer reads ``model.<m>.delta.>`` and ``model.<m>.snapshot.candidate`` (two filter
subjects) in stream order, so decisions on ``model.<m>.decision`` follow the candidates' order. Each
delta is judged by ``services.validator.gate.Gate`` (shadow + delta on a clean reference window of
recent samples against the last good version); the first degradation of an episode is followed by
one ROLLBACK to the last good version. Snapshots are loaded from the object store, checked chunk by
chunk and scored whole; an approved one is repeated on ``model.<m>.snapshot.approved``.

On start the shadow is rebuilt by replaying the decision stream (approved deltas, honouring
rollbacks), and the durable consumer resumes where it acknowledged; candidates decided before a
crash but not acknowledged are recognised and skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import nats.errors
import torch
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from freshet import bus, snapshots, telemetry
from freshet.batches import decode_samples
from freshet.config import BusConfig
from freshet.delta import Delta, DeltaError, decision_subject, decode_delta
from freshet.follower import Follower, FollowerSettings
from freshet.model.v1 import model_pb2
from freshet.models import ModelConfig, model_from_setting
from freshet.replica import Replica
from freshet.runtime import NatsMixin, Service
from services.validator.config import ValidatorConfig
from services.validator.gate import Gate, Verdict, check_structure

logger = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)

APPROVE, REJECT, ROLLBACK = model_pb2.DECISION_APPROVE, model_pb2.DECISION_REJECT, model_pb2.DECISION_ROLLBACK


class _Restart(Exception):
    """Handling a candidate failed: re-read from it, so no later candidate is decided before it."""


class ValidatorService(NatsMixin, Service):
    """Decides every candidate of one model, in order, and keeps the shadow replica of the approved state."""

    name = "validator"

    def __init__(
        self, config: ValidatorConfig, bus_config: BusConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.config = config
        self.bus_config = bus_config
        if config.torch_threads > 0:
            torch.set_num_threads(config.torch_threads)
        self.model_config: ModelConfig = model_from_setting(config.model_config)
        self.gate = Gate(self.model_config, config, clock)
        self.approved = 0
        self.rejected = 0
        self.rollbacks = 0
        self.snapshots_approved = 0
        self.snapshots_rejected = 0
        self.bad_samples = 0
        self.sequence_jumps = 0
        self.rebuild_missing = 0
        self.latencies_ms: deque[float] = deque(maxlen=10_000)  # candidate created -> decision published
        self.decided_seq = 0  # highest delta stream sequence decided
        self.last_sequence: dict[int, int] = {}  # per shard, the last delta sequence decided
        self.decided_snapshots: set[str] = set()
        self.approved_snapshots: list[tuple[int, str]] = []  # (decision stream seq, snapshot id)
        self._restart_seq = 0
        self._deciding = False  # a candidate is between its verdict and its commit
        model = config.model
        self.spec = bus.ConsumerSpec(
            stream=bus.MODEL.name,
            durable=config.durable,
            filter_subject="",
            max_deliver=-1,
            max_ack_pending=1000,
            filter_subjects=(f"model.{model}.delta.>", snapshots.candidate_subject(model)),
        )

    async def _start(self) -> None:
        await self._connect_nats(self.bus_config, "freshet-validator")
        await self._rebuild()
        self._samples = await self.js.subscribe(
            self.config.samples_subject,
            cb=self._on_samples,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
        )
        self.spawn(self._consume(), "validator-consume")
        self.spawn(self._refresh_window(), "validator-window")

    async def _stop(self) -> None:
        await self._drain_nats()

    # -- restart ---------------------------------------------------------------------------------

    async def _decisions(self) -> list[tuple[int, model_pb2.Approval]]:
        """Every decision in the stream so far, in order (an ephemeral consumer read to its end)."""
        sub = await self.js.pull_subscribe(
            decision_subject(self.config.model),
            stream=bus.MODEL.name,
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30
            ),
        )
        try:
            left = (await sub.consumer_info()).num_pending
            out = []
            while left > 0:
                for msg in await sub.fetch(min(left, 512), timeout=5.0):
                    out.append((msg.metadata.sequence.stream, model_pb2.Approval.FromString(msg.data)))
                    left -= 1
            return out
        finally:
            await sub.unsubscribe()

    async def _rebuild(self) -> None:
        """Restores the shadow (approved deltas, honouring rollbacks), the per-shard positions and the snapshot log.

        The shadow is booted like a predictor (``_boot_shadow``). Should that fail, it is replayed from
        the stream: the approved state is a stack of delta approvals, a ROLLBACK to X pops every
        approval decided after X, and what is left is applied in order. The rebuilt shadow is taken as
        the last good version; the reference window starts empty (samples from now on).
        """
        stack: list[tuple[int, int]] = []  # (decision seq, delta stream seq)
        pending_rollback: tuple[int, model_pb2.Approval] | None = None
        degraded, streak = False, 0
        for seq, approval in await self._decisions():
            if approval.decision == ROLLBACK:
                while stack and stack[-1][0] > approval.rollback_version:
                    stack.pop()
                pending_rollback = None
                continue
            if approval.snapshot:
                self.decided_snapshots.add(approval.snapshot)
                if approval.decision == APPROVE:
                    self.approved_snapshots.append((seq, approval.snapshot))
                continue
            self.decided_seq = max(self.decided_seq, approval.delta_stream_seq)
            self.last_sequence[approval.shard] = max(self.last_sequence.get(approval.shard, 0), approval.sequence)
            if approval.decision == APPROVE:
                stack.append((seq, approval.delta_stream_seq))
                degraded, streak = False, 0
            elif approval.metrics.get("degraded"):
                degraded, streak = True, 0
                if "rollback_version" in approval.metrics:
                    pending_rollback = (seq, approval)
            elif "healthy_streak" in approval.metrics:
                streak = int(approval.metrics["healthy_streak"])
        if pending_rollback is not None:
            # A crash fell between a degradation's REJECT and its ROLLBACK: publish the ROLLBACK now.
            _, reject = pending_rollback
            version = int(reject.metrics["rollback_version"])
            await self._publish_rollback(version, reject.reason, dict(reject.metrics), reject.delta_stream_seq)
            while stack and stack[-1][0] > version:
                stack.pop()
        booted = await self._boot_shadow()
        if booted is None:
            booted = await self._replay_shadow(stack)
        self.gate.reset(*booted)
        self.gate.degraded, self.gate.healthy_streak = degraded, streak
        if stack or self.decided_snapshots:
            logger.info(
                "shadow rebuilt from the decision stream",
                extra={
                    "version": self.gate.version,
                    "snapshot": self.gate.shadow.snapshot,
                    "deltas": len(stack),
                    "missing": self.rebuild_missing,
                },
            )

    async def _boot_shadow(self) -> tuple[Replica, int] | None:
        """The approved state as a predictor booting now would serve it (``freshet.follower``: the latest
        approved snapshot plus the approved deltas after it, rollbacks honoured); None when it cannot
        be had within ``rebuild_timeout_s`` (say, a gap whose repair needs a snapshot that only this
        validator could approve)."""
        stop = asyncio.Event()
        follower = Follower(
            self.nc,
            self.js,
            self.config.model,
            lambda: Replica(self.model_config),
            FollowerSettings(request_timeout_s=5.0, approval_wait_s=5.0),
            name="validator-shadow",
        )
        task = asyncio.create_task(follower.run(stop))
        try:
            await asyncio.wait_for(asyncio.shield(follower.ready.wait()), self.config.rebuild_timeout_s)
        except TimeoutError:
            logger.error("shadow boot from snapshot + decisions timed out; replaying decisions instead")
            return None
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)
        return follower.replica, follower.version

    async def _replay_shadow(self, stack: list[tuple[int, int]]) -> tuple[Replica, int]:
        """The approved state replayed from the stream's approved deltas (``stack``: those rollbacks left)."""
        shadow = Replica(self.model_config)
        for _, stream_seq in stack:
            try:
                raw = await self.js.get_msg(bus.MODEL.name, seq=stream_seq, direct=True)
                shadow.apply(decode_delta(raw.data))
            except (NotFoundError, DeltaError, ValueError) as exc:
                self.rebuild_missing += 1
                logger.error(
                    "approved delta cannot be replayed into the shadow",
                    extra={"stream_seq": stream_seq, "error": str(exc)},
                )
        return shadow, stack[-1][0] if stack else 0

    # -- samples ---------------------------------------------------------------------------------

    async def _on_samples(self, msg: Msg) -> None:
        try:
            self.gate.observe(decode_samples(msg.data))
        except (DecodeError, ValueError) as exc:
            # The trainer dead-letters these; the window only leaves them out, counted and logged.
            self.bad_samples += 1
            logger.warning("undecodable sample message left out of the window", extra={"error": str(exc)})

    async def _refresh_window(self) -> None:
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=self.config.refresh_s)
            except TimeoutError:
                pass
            if not self.stopping.is_set():
                self.gate.refresh_window()
                if not self._deciding:
                    # Between a verdict and its commit the ROLLBACK names the last good version of the
                    # verdict; promoting in between would reset the shadow to another one.
                    self.gate.maybe_promote()

    # -- candidates ------------------------------------------------------------------------------

    async def _consume(self) -> None:
        spec = self.spec
        floor = await bus.ack_floor(self.js, spec)
        if floor is not None:
            # Resume after the last acknowledged candidate, with the unacknowledged ones first and in order.
            spec = await bus.restart_at(self.js, spec, floor + 1)
        while not self.stopping.is_set():
            await bus.declare_consumer(self.js, spec)
            sub = await self.js.pull_subscribe_bind(spec.durable, stream=spec.stream)
            try:
                while not self.stopping.is_set():
                    try:
                        msgs = await sub.fetch(64, timeout=0.25)
                    except (nats.errors.TimeoutError, TimeoutError):
                        continue
                    for msg in msgs:
                        await self._handle(msg)
            except _Restart:
                spec = await bus.restart_at(self.js, self.spec, self._restart_seq)
                try:
                    await asyncio.wait_for(self.stopping.wait(), timeout=1.0)
                except TimeoutError:
                    pass
            except nats.errors.ConnectionClosedError:
                if self.stopping.is_set():
                    return
                raise
            finally:
                try:
                    await sub.unsubscribe()
                except (nats.errors.Error, NotFoundError):
                    pass  # gone with a drained connection or a deleted consumer

    async def _handle(self, msg: Msg) -> None:
        self._deciding = True
        try:
            if msg.subject == snapshots.candidate_subject(self.config.model):
                await self._on_snapshot(msg)
            else:
                await self._on_delta(msg)
        except Exception as exc:  # noqa: BLE001 - never decide later candidates first: re-read from this one
            if self.stopping.is_set():
                return  # left unacknowledged: redelivered after a restart
            logger.warning(
                "candidate failed; re-reading from it",
                extra={"stream_seq": msg.metadata.sequence.stream, "error": repr(exc)},
            )
            self._restart_seq = msg.metadata.sequence.stream
            raise _Restart from exc
        finally:
            self._deciding = False
        await msg.ack()

    async def _publish(self, approval: model_pb2.Approval, msg_id: str) -> int:
        approval.decided_ms = bus.now_ms()
        return await bus.publish(
            self.js, decision_subject(self.config.model), approval.SerializeToString(), msg_id=msg_id
        )

    async def _publish_rollback(
        self, version: int, reason: str, metrics: dict[str, float], stream_seq: int
    ) -> int:
        """Publishes one ROLLBACK to ``version``, naming the latest snapshot approved at or before it."""
        snapshot = next((sid for seq, sid in reversed(self.approved_snapshots) if seq <= version), "")
        approval = model_pb2.Approval(
            model=self.config.model,
            decision=ROLLBACK,
            rollback_version=version,
            snapshot=snapshot,
            reason=reason,
            metrics=metrics,
        )
        with tracer.start_as_current_span(
            "rollback", attributes={"rollback_version": version, "snapshot": snapshot, "reason": reason}
        ):
            seq = await self._publish(approval, f"rollback:{self.config.model}:{stream_seq}")
        self.rollbacks += 1
        logger.warning(
            "rollback published",
            extra={
                "model": self.config.model,
                "version": version,
                "snapshot": snapshot,
                "reason": reason,
                "seq": seq,
            },
        )
        return seq

    async def _on_delta(self, msg: Msg) -> None:
        stream_seq = msg.metadata.sequence.stream
        if stream_seq <= self.decided_seq:
            return  # decided before a restart; the acknowledgement was lost
        model = self.config.model
        with tracer.start_as_current_span(
            "validate_delta", context=telemetry.extract_headers(msg.headers)
        ) as span:
            approval = model_pb2.Approval(model=model, delta_stream_seq=stream_seq)
            delta: Delta | None = None
            try:
                delta = decode_delta(msg.data)
            except DeltaError as exc:
                verdict = Verdict(False, str(exc))
            else:
                approval.shard, approval.sequence = delta.shard, delta.sequence
                approval.new_version, approval.table = delta.new_version, delta.table
                verdict = self._judge_delta(delta)
            approval.decision = APPROVE if verdict.approve else REJECT
            approval.reason = verdict.reason
            metrics = dict(verdict.metrics)
            if verdict.degraded:
                metrics["degraded"] = 1.0
            if verdict.rollback_version is not None:
                metrics["rollback_version"] = float(verdict.rollback_version)
            approval.metrics.update(metrics)
            version = await self._publish(approval, f"decision:{model}:{stream_seq}")
            if verdict.rollback_version is not None:
                await self._publish_rollback(
                    verdict.rollback_version,
                    f"{verdict.reason} (delta {delta.shard}#{delta.sequence})",
                    metrics,
                    stream_seq,
                )
            if delta is not None:
                self.gate.commit(delta, verdict, version)
                self.last_sequence[delta.shard] = max(self.last_sequence.get(delta.shard, 0), delta.sequence)
                self.latencies_ms.append(approval.decided_ms - delta.created_ms)
            self.decided_seq = stream_seq
            span.set_attributes(
                {
                    "decision": model_pb2.Decision.Name(approval.decision),
                    "reason": verdict.reason,
                    "shard": approval.shard,
                    "sequence": approval.sequence,
                    "version": version,
                    **{f"metric.{k}": v for k, v in metrics.items()},
                }
            )
        if verdict.approve:
            self.approved += 1
        else:
            self.rejected += 1
        log = logger.info if verdict.approve else logger.warning
        log(
            "delta approved" if verdict.approve else "delta rejected",
            extra={
                "model": model,
                "shard": approval.shard,
                "sequence": approval.sequence,
                "stream_seq": stream_seq,
                "version": version,
                "reason": verdict.reason,
                "metrics": metrics,
            },
        )

    def _judge_delta(self, delta: Delta) -> Verdict:
        if delta.model != self.config.model:
            return Verdict(False, f"delta of model {delta.model!r} on {self.config.model!r}'s subject")
        last = self.last_sequence.get(delta.shard, 0)
        if delta.sequence <= last:
            return Verdict(
                False, f"sequence {delta.sequence} of shard {delta.shard} is already decided (last {last})"
            )
        if delta.sequence > last + 1 and last:
            self.sequence_jumps += 1
            logger.error(
                "delta sequence jumps: the publisher skipped deltas",
                extra={"shard": delta.shard, "last": last, "sequence": delta.sequence},
            )
        return self.gate.evaluate_delta(delta)

    async def _on_snapshot(self, msg: Msg) -> None:
        model = self.config.model
        with tracer.start_as_current_span(
            "validate_snapshot", context=telemetry.extract_headers(msg.headers)
        ) as span:
            approval = model_pb2.Approval(model=model)
            try:
                manifest = model_pb2.SnapshotManifest.FromString(msg.data)
            except DecodeError as exc:
                manifest, verdict = None, Verdict(False, f"undecodable snapshot manifest: {exc}")
            else:
                if manifest.id in self.decided_snapshots:
                    return  # decided before a restart
                approval.snapshot = manifest.id
                verdict = await self._judge_snapshot(manifest, msg.metadata.sequence.stream)
            approval.decision = APPROVE if verdict.approve else REJECT
            approval.reason = verdict.reason
            approval.metrics.update(verdict.metrics)
            version = await self._publish(approval, f"decision:{model}:{msg.metadata.sequence.stream}")
            if manifest is not None:
                self.decided_snapshots.add(manifest.id)
            if verdict.approve:
                await bus.publish(
                    self.js,
                    snapshots.approved_subject(model),
                    approval.SerializeToString(),
                    msg_id=f"approved:{model}:{manifest.id}",
                )
                self.approved_snapshots.append((version, manifest.id))
                self.snapshots_approved += 1
            else:
                self.snapshots_rejected += 1
            span.set_attributes(
                {
                    "decision": model_pb2.Decision.Name(approval.decision),
                    "reason": verdict.reason,
                    "snapshot": approval.snapshot,
                    **{f"metric.{k}": v for k, v in verdict.metrics.items()},
                }
            )
        log = logger.info if verdict.approve else logger.warning
        log(
            "snapshot approved" if verdict.approve else "snapshot rejected",
            extra={
                "model": model,
                "snapshot": approval.snapshot,
                "reason": verdict.reason,
                "metrics": verdict.metrics,
            },
        )

    async def _judge_snapshot(self, manifest: model_pb2.SnapshotManifest, stream_seq: int) -> Verdict:
        """Loads a snapshot chunk by chunk into a fresh replica, checking each, then scores it whole."""
        if manifest.model != self.config.model:
            return Verdict(False, f"snapshot of model {manifest.model!r} on {self.config.model!r}'s subject")
        if manifest.delta_stream_seq >= stream_seq:
            return Verdict(
                False,
                f"snapshot covers stream sequence {manifest.delta_stream_seq}, after its announcement {stream_seq}",
            )
        if manifest.model_config:
            try:
                theirs = ModelConfig.from_json(manifest.model_config)
            except (ValueError, TypeError) as exc:
                return Verdict(False, f"snapshot model config is unreadable: {exc}")
            if theirs != self.model_config:
                return Verdict(False, f"snapshot model config {manifest.model_config} is not the validator's")
        replica = Replica(self.model_config)
        metrics = {"rows": 0.0, "max_abs": 0.0, "max_row_norm": 0.0, "chunks": float(len(manifest.chunks))}
        try:
            async for chunk in snapshots.read_chunks(self.js, manifest):
                reason, degraded, measured = check_structure(chunk, replica, self.config)
                for key in ("max_abs", "max_row_norm"):
                    metrics[key] = max(metrics[key], measured.get(key, 0.0))
                if reason:
                    return Verdict(False, f"chunk of {chunk.table!r}/{chunk.shard}: {reason}", metrics, degraded)
                replica.apply(chunk)
                metrics["rows"] += len(chunk.fids)
        except snapshots.SnapshotError as exc:
            return Verdict(False, str(exc), metrics)
        return self.gate.evaluate_replica(replica, metrics)
