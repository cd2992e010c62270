"""The trainer: samples -> pull rows -> forward/backward -> push sparse gradients -> dense step.

One worker for batch and online training: it first trains on a dataset file (``FRESHET_TRAINER_REPLAY``)
or on the history in the SAMPLES stream (``FRESHET_TRAINER_START=first``), then keeps following the
stream, through the same code path.

Pipelining (``FRESHET_TRAIN_PIPELINE``, on by default)
    While batch k is computed (forward/backward in a worker thread, so the event loop keeps serving
    gRPC), batch k+1 is fetched, planned and its rows pulled. Batch k+1 therefore reads rows before
    batch k's gradients were pushed (a staleness of one step, as in Monolith and PERSIA). Off, every
    step reads what the previous one pushed: with small batches on a bursty stream (MovieLens users
    rate in bursts) that is worth more online AUC than the throughput pipelining gives.

Progressive validation
    Every batch is scored before the model learns from it; AUC and log loss over everything and over a
    sliding window are logged and kept in ``learner.metrics`` (version-1 samples only: later versions of
    a sample are label updates, see below).

Label updates
    The joiner emits version 2, 3, ... of a sample when more action types arrive. The click label of an
    impression is decided by its first version, so later versions train every task except click (their
    click label was already learnt).

Exactly once (``FRESHET_TRAINER_CHECKPOINT_S`` > 0)
    Every few seconds the trainer writes its state (dense parameters, dense optimizer, counters and the
    stream sequence of the last trained sample) to the JetStream object store ``FRESHET_TRAINER`` as
    ``<durable>.next``, checkpoints every store shard with the tag ``<durable>@<seq>``, then copies the
    state to ``<durable>.last``. On start it finds the state whose tag every shard reports, rolls every
    shard back to that checkpoint (undoing pushes made after it) and consumes the stream from the next
    sequence, so no sample is trained twice or skipped across a crash of the trainer.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import nats
import numpy as np
import torch
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js.errors import BucketNotFoundError, ObjectNotFoundError
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from freshet import bus, telemetry
from freshet.batches import SampleArrays, decode_samples
from freshet.clients import ShardedStoreClient, StoreRestarted
from freshet.config import BusConfig
from freshet.metrics import ProgressiveMetrics
from freshet.model.v1 import model_pb2
from freshet.models import TASKS, BatchPlan, CtrModel, ModelConfig, loss, plan, pool
from freshet.runtime import NatsMixin, Service
from freshet.tensors import TensorError, to_tensor
from services.trainer.config import TrainerConfig

logger = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)

STATE_BUCKET = "FRESHET_TRAINER"
READY_WAIT_S = 0.005  # how long a fetch waits for the server to hand over messages that are already waiting


@dataclass
class Prepared:
    """A batch with its pooling plan and the rows pulled for it."""

    batch: SampleArrays
    plan: BatchPlan
    rows: dict[str, np.ndarray]


@dataclass
class Computed:
    probs: np.ndarray  # click probability before training, float32 [B]
    grads: dict[str, np.ndarray]
    loss: float


class Learner:
    """The training step, independent of NATS so it can be driven by a stream, a file or a test."""

    def __init__(
        self,
        config: ModelConfig,
        store: ShardedStoreClient,
        dense_lr: float,
        seed: int = 0,
        metrics_window: int = 10_000,
    ) -> None:
        self.config = config
        self.store = store
        self.model = CtrModel(config, seed=seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adagrad(params, lr=dense_lr) if params else None
        self.metrics = ProgressiveMetrics(window=metrics_window)
        self.step = 0
        self.samples_trained = 0
        self._metric_column = TASKS.index(config.tasks[0])  # the first task is the one evaluated

    async def prepare(self, batch: SampleArrays) -> Prepared:
        """Plans the batch and pulls its rows from every table concurrently."""
        batch_plan = plan(batch.fids, batch.lengths, self.config)
        names = [name for name, t in batch_plan.tables.items() if len(t.fids)]
        pulled = await asyncio.gather(*(self.store.pull(name, batch_plan.tables[name].fids) for name in names))
        return Prepared(batch, batch_plan, dict(zip(names, pulled, strict=True)))

    def compute(self, prep: Prepared) -> Computed:
        """Scores the batch (progressive validation), then backward and the dense optimizer step."""
        batch = prep.batch
        rows = {}
        for name, table in prep.plan.tables.items():
            values = prep.rows.get(name)
            tensor = torch.from_numpy(values) if values is not None else torch.zeros((0, table.width))
            rows[name] = tensor.requires_grad_(True)
        logits = self.model(pool(prep.plan, rows))
        probs = torch.sigmoid(logits[:, 0]).detach().numpy()
        first = batch.versions <= 1
        self.metrics.update(probs[first], batch.label_vectors[first, self._metric_column])
        total = self._loss(logits, batch)
        if self.optimizer is not None:
            self.optimizer.zero_grad()
        total.backward()
        if self.optimizer is not None:
            self.optimizer.step()
        grads = {name: r.grad.numpy() for name, r in rows.items() if name in prep.rows and r.grad is not None}
        self.step += 1
        self.samples_trained += len(batch)
        return Computed(probs, grads, float(total.detach()))

    def _loss(self, logits: torch.Tensor, batch: SampleArrays) -> torch.Tensor:
        """The model's loss; label updates (version > 1) weigh nothing on the click task."""
        weights = np.repeat(batch.weights.astype(np.float32)[:, None], len(self.config.tasks), axis=1)
        if "click" in self.config.tasks:
            weights[batch.versions > 1, self.config.tasks.index("click")] = 0.0
        return loss(logits, batch.label_vectors, weights, self.config.tasks)

    async def push(self, prep: Prepared, computed: Computed) -> None:
        """Pushes each table's gradients with the number of samples behind each (the rows' frequencies)."""
        pushes = []
        for name, grad in computed.grads.items():
            table = prep.plan.tables[name]
            counts = np.bincount(table.rows, minlength=len(table.fids)).astype(np.int32)
            pushes.append(self.store.push(name, table.fids, grad, counts))
        await asyncio.gather(*pushes)

    async def learn(self, batch: SampleArrays) -> np.ndarray:
        """One unpipelined step; returns the click probabilities before training."""
        prep = await self.prepare(batch)
        computed = self.compute(prep)
        await self.push(prep, computed)
        return computed.probs

    def state_bytes(self, position: int) -> bytes:
        """Dense parameters, optimizer and counters as of ``position`` (the last trained stream sequence)."""
        buffer = io.BytesIO()
        torch.save(
            {
                "position": position,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "step": self.step,
                "samples_trained": self.samples_trained,
                "config": self.config.to_json(),
            },
            buffer,
        )
        return buffer.getvalue()

    def load_state(self, data: bytes) -> int:
        """Restores ``state_bytes``; returns its position."""
        state = torch.load(io.BytesIO(data), weights_only=False)
        if state["config"] != self.config.to_json():
            raise ValueError(
                f"the checkpointed model config {state['config']} differs from the configured {self.config.to_json()}"
            )
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.samples_trained = state["step"], state["samples_trained"]
        return int(state["position"])

    def dense_snapshot(self, model: str, position: int) -> model_pb2.DenseSnapshot:
        params = {
            name: to_tensor(p.detach().numpy().astype(np.float32)) for name, p in self.model.state_dict().items()
        }
        return model_pb2.DenseSnapshot(
            model=model,
            step=self.step,
            params=params,
            samples_trained=self.samples_trained,
            created_ms=bus.now_ms(),
            stream_seq=position,
            model_config=self.config.to_json(),
        )


def register_metrics(meter: Meter, learner: Learner, position: Callable[[], int]) -> None:
    """Observable gauges ``freshet.trainer.*``: the progressive evaluation and the training progress."""
    metrics = learner.metrics
    readings = {
        "progressive_auc": metrics.auc,
        "window_auc": metrics.window_auc,
        "log_loss": metrics.mean_log_loss,
        "window_log_loss": metrics.window_log_loss,
        "samples_trained": lambda: learner.samples_trained,
        "steps": lambda: learner.step,
        "stream_position": position,
    }
    for name, read in readings.items():

        def observe(options: CallbackOptions, read: Callable[[], float | None] = read) -> list[Observation]:
            value = read()
            return [] if value is None else [Observation(value)]

        meter.create_observable_gauge(f"freshet.trainer.{name}", callbacks=[observe])


@dataclass
class Fetched:
    """Sample messages fetched together, decoded; ``last_seq`` is the stream sequence of the last one."""

    msgs: list[Msg]
    batches: list[SampleArrays] = field(default_factory=list)
    last_seq: int = 0


class TrainerService(NatsMixin, Service):
    """One training worker on a durable consumer of the SAMPLES stream (see the module docstring)."""

    name = "trainer"

    def __init__(self, config: TrainerConfig, bus_config: BusConfig) -> None:
        super().__init__()
        self.config = config
        self.bus_config = bus_config
        self.model_config = config.model_spec()
        if config.torch_threads > 0:
            torch.set_num_threads(config.torch_threads)
        self.store = ShardedStoreClient([a.strip() for a in config.store_address.split(",") if a.strip()])
        self.learner = Learner(
            self.model_config, self.store, config.dense_lr, seed=config.seed, metrics_window=config.metrics_window
        )
        register_metrics(telemetry.meter(__name__), self.learner, lambda: self.position)
        self.position = 0  # stream sequence of the last sample message trained
        self.resumed_from: int | None = None
        self.checkpoints = 0
        self.store_restarts = 0
        self._last_dense = time.monotonic()
        self._last_dense_step = 0
        self._last_log = time.monotonic()
        self._last_checkpoint = time.monotonic()
        self._state_store = None

    async def _start(self) -> None:
        await self._connect_nats(self.bus_config, "freshet-trainer")
        self.spawn(self._run(), "trainer-run")

    async def _stop(self) -> None:
        await self._drain_nats()
        await self.store.close()

    async def _run(self) -> None:
        if not await self._check_tables():
            return
        start = await self._resume()
        if self.config.replay:
            await self._train_file(self.config.replay)
        spec = bus.ConsumerSpec(
            stream=bus.SAMPLES.name,
            durable=self.config.durable,
            filter_subject=self.config.subject,
            max_ack_pending=max(10_000, 4 * self.config.fetch_batch),
            max_deliver=-1,  # a failed step is the store's or the network's fault; junk is dead-lettered
        )
        spec = await self._position_consumer(spec, start)
        await bus.declare_consumer(self.js, spec)
        self.sub = await self.js.pull_subscribe_bind(spec.durable, stream=spec.stream)
        try:
            while True:
                try:
                    await self._train_stream()
                    break
                except (StoreRestarted, grpc.aio.AioRpcError) as exc:
                    if not _store_lost_writes(exc):
                        raise
                    spec = await self._recover_store_restart(spec, exc)
            if self._state_store is not None:  # a clean stop resumes from here, with nothing to roll back
                try:
                    await self.checkpoint()
                except (grpc.aio.AioRpcError, nats.errors.Error, StoreRestarted) as exc:
                    logger.warning(
                        "no checkpoint at shutdown; the next start rolls back", extra={"error": repr(exc)}
                    )
        finally:
            await self.sub.unsubscribe()  # else draining the connection waits for its undelivered fetches

    async def _recover_store_restart(self, spec: bus.ConsumerSpec, exc: Exception) -> bus.ConsumerSpec:
        while not self.stopping.is_set():  # the shard may still be starting, or another one restart too
            try:
                return await self._after_store_restart(spec, exc)
            except (StoreRestarted, grpc.aio.AioRpcError) as again:
                if not _store_lost_writes(again):
                    raise
                exc = again
                await asyncio.sleep(0.2)
        return spec

    async def _after_store_restart(self, spec: bus.ConsumerSpec, exc: Exception) -> bus.ConsumerSpec:
        """Rolls every shard and this trainer back to the last checkpoint and re-reads the stream from there.

        A restarted shard restored its own last checkpoint, so pushes it acknowledged after that are
        gone, while the other shards still hold theirs (and a push cut off by a lost connection may or
        may not have been applied): only a rollback of everything to the trainer's checkpoint (the
        store's Rollback reaches back past automatic checkpoints) keeps every sample trained exactly
        once. Without checkpoints (at-least-once) the lost pushes are only reported.
        """
        self.store_restarts += 1
        reason = str(exc) if isinstance(exc, StoreRestarted) else f"{exc.code().name}: {exc.details()}"
        if self._state_store is None:
            logger.error(
                "store shard restarted or unreachable; updates since its last checkpoint may be lost "
                "(FRESHET_TRAINER_CHECKPOINT_S=0: no exactly-once rollback)",
                extra={"reason": reason},
            )
            return spec
        self.store.forget_incarnations()  # whichever shards restarted, all are rolled back now
        start = await self._resume()
        logger.warning(
            "store shard restarted or unreachable; rolled back to the last checkpoint, re-reading the stream",
            extra={"reason": reason, "from_seq": start},
        )
        await self.sub.unsubscribe()
        spec = await bus.restart_at(self.js, spec, start)
        await bus.declare_consumer(self.js, spec)
        self.sub = await self.js.pull_subscribe_bind(spec.durable, stream=spec.stream)
        return spec

    # -- start-up ------------------------------------------------------------------------------------

    async def _check_tables(self) -> bool:
        """Fails at start-up when the store's tables cannot hold this model's rows."""
        while True:
            try:
                described = await self.store.describe()
                break
            except grpc.aio.AioRpcError as exc:
                if self.stopping.is_set():
                    return False
                logger.warning("store not reachable yet", extra={"code": exc.code().name})
                await asyncio.sleep(0.2)
        shards = {d.num_shards for d in described}
        if shards != {len(described)}:
            raise ValueError(
                f"FRESHET_STORE_ADDRESS lists {len(described)} shards, the store says {sorted(shards)}"
            )
        have = {t.name: t.dim for t in described[0].tables}
        for name, width in self.model_config.tables().items():
            if have.get(name) != width:
                raise ValueError(
                    f"the model needs store table {name!r} with rows of {width} floats, the store has "
                    f"{have.get(name)} (FRESHET_MODEL_CONFIG vs FRESHET_STORE_TABLES); store tables: {have}"
                )
        return True

    async def _resume(self) -> int | None:
        """The stream sequence to start from after a checkpoint (store rolled back to it), or None."""
        if self.config.checkpoint_s <= 0:
            return None
        try:
            self._state_store = await self.js.object_store(STATE_BUCKET)
        except BucketNotFoundError:
            self._state_store = await self.js.create_object_store(STATE_BUCKET)
        states = {}
        for which in ("next", "last"):
            try:
                states[which] = (await self._state_store.get(f"{self.config.durable}.{which}")).data
            except ObjectNotFoundError:
                pass
        if not states:
            return None
        tags = {t.checkpoint_tag for d in await self.store.describe() for t in d.tables}
        for which, data in states.items():
            tag = self._tag(_position_of(data))
            if tags == {tag}:
                await self.store.rollback(expected_tag=tag)
                self.position = self.learner.load_state(data)
                self.resumed_from = self.position
                logger.info("resumed from checkpoint", extra={"position": self.position, "state": which})
                return self.position + 1
        known = sorted(self._tag(_position_of(d)) for d in states.values())
        raise RuntimeError(
            f"cannot resume exactly once: the store shards report checkpoint tags {sorted(tags)}, this trainer's "
            f"checkpoints are {known} (a shard lost its checkpoint, or was checkpointed by someone else); "
            f"delete object {self.config.durable}.* in bucket {STATE_BUCKET} to start over"
        )

    def _tag(self, position: int) -> str:
        return f"{self.config.durable}@{position}"

    async def _position_consumer(self, spec: bus.ConsumerSpec, start: int | None) -> bus.ConsumerSpec:
        """Recreates the durable consumer at ``start`` (a checkpoint's next sequence) or per FRESHET_TRAINER_START.

        With checkpoints on and no checkpoint yet, the start is made explicit and checkpointed at once
        (position = start - 1), which also fails early when the store cannot checkpoint.
        """
        mode = self.config.start
        if start is None:
            if mode == "resume":
                start = (await bus.ack_floor(self.js, spec) or 0) + 1
            elif mode == "new":
                start = (await self.js.stream_info(spec.stream)).state.last_seq + 1
            else:
                start = int(mode[4:]) if mode.startswith("seq:") else 1
            if self._state_store is not None:
                self.position = start - 1
                try:
                    await self.checkpoint()
                except grpc.aio.AioRpcError as exc:
                    raise ValueError(
                        f"exactly-once training checkpoints the store, which refused: {exc.details()} "
                        "(give every store shard FRESHET_STORE_DATA_DIR, or set FRESHET_TRAINER_CHECKPOINT_S=0 "
                        "for at-least-once training)"
                    ) from None
        return await bus.restart_at(self.js, spec, start)

    # -- training ------------------------------------------------------------------------------------

    async def _train_file(self, source: str) -> None:
        """Batch training on a dataset file before the stream (the same steps, no checkpoints)."""
        from freshet.datasets import dataset_samples

        fmt, _, path = source.partition(":")
        for batch in dataset_samples(fmt, path, self.config.batch_size):
            if self.stopping.is_set():
                return
            prep = await self.learner.prepare(batch)
            computed = await asyncio.to_thread(self.learner.compute, prep)
            await self.learner.push(prep, computed)
            await self._after_step(boundary=False)
        logger.info("dataset trained", extra={"source": source, "samples": self.learner.samples_trained})

    async def _fetch(self) -> Fetched | None:
        """The next messages (malformed ones dead-lettered; none after a quiet fetch timeout), or None when stopping."""
        while not self.stopping.is_set():
            fetched = Fetched([])
            try:
                # Wait for the first message only, then take what is there: a pull for a full batch would
                # linger until the timeout whenever fewer messages are waiting, adding it to every sample's
                # freshness at low load. Under load the waiting messages make the batch large anyway.
                msgs = await self.sub.fetch(1, timeout=self.config.fetch_timeout_s)
            except (TimeoutError, nats.errors.TimeoutError):
                return fetched  # nothing new: lets the training loop checkpoint while the stream is quiet
            if self.config.fetch_batch > 1:
                try:
                    msgs += await self.sub.fetch(self.config.fetch_batch - 1, timeout=READY_WAIT_S)
                except (TimeoutError, nats.errors.TimeoutError):
                    pass  # nothing else waiting; a late answer stays queued for the next fetch
            for msg in msgs:
                try:
                    fetched.batches.append(decode_samples(msg.data))
                    fetched.msgs.append(msg)
                except (DecodeError, TensorError, ValueError) as exc:
                    logger.warning("malformed sample message", extra={"subject": msg.subject, "error": str(exc)})
                    await bus.dead_letter(self.js, "samples", msg, f"malformed SampleBatch: {exc}")
                    await msg.term()
                fetched.last_seq = msg.metadata.sequence.stream
            return fetched
        return None

    def _steps(self, fetched: Fetched) -> list[SampleArrays]:
        if not fetched.batches:
            return []
        batch = SampleArrays.concat(fetched.batches) if len(fetched.batches) > 1 else fetched.batches[0]
        size = self.config.batch_size
        if len(batch) <= size:
            return [batch]
        return [_slice(batch, i, min(i + size, len(batch))) for i in range(0, len(batch), size)]

    async def _train_stream(self) -> None:
        """Fetch -> pull (next batch) overlapping compute (this batch) -> push -> ack, until stopped."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=2)
        step_done = asyncio.Event()  # unpipelined: the producer waits for the previous step's push
        step_done.set()

        async def produce() -> None:
            try:
                while (fetched := await self._fetch()) is not None:
                    steps = self._steps(fetched)
                    for i, step in enumerate(steps):
                        if not self.config.pipeline:
                            await step_done.wait()
                            step_done.clear()
                        prep = await self.learner.prepare(step)
                        await queue.put((prep, fetched if i == len(steps) - 1 else None))
                    if not steps:
                        await queue.put((None, fetched))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                await queue.put(exc)
                return
            await queue.put(None)

        producer = asyncio.create_task(produce())
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                prep, done = item
                if prep is not None:
                    links = telemetry.links_from(m.headers for m in (done.msgs if done else []))
                    with tracer.start_as_current_span(
                        "train_batch", links=links, attributes={"samples": len(prep.batch)}
                    ):
                        computed = await asyncio.to_thread(self.learner.compute, prep)
                        await self.learner.push(prep, computed)
                if done is not None:
                    for msg in done.msgs:
                        await msg.ack()
                    self.position = max(self.position, done.last_seq)
                # Checkpoints only between fetches: mid-fetch, the store holds pushes of samples that
                # the position does not cover yet.
                await self._after_step(boundary=done is not None)
                step_done.set()
        finally:
            producer.cancel()

    async def _after_step(self, boundary: bool) -> None:
        await self._maybe_publish_dense()
        if boundary:
            await self._maybe_checkpoint()
        self._maybe_log()

    async def _maybe_checkpoint(self, force: bool = False) -> None:
        if self.config.checkpoint_s <= 0 or self._state_store is None:
            return
        now = time.monotonic()
        if not force and now - self._last_checkpoint < self.config.checkpoint_s:
            return
        self._last_checkpoint = now
        await self.checkpoint()

    async def checkpoint(self) -> None:
        """State as ``.next``, store checkpoint tagged with the position, then state as ``.last``."""
        data = self.learner.state_bytes(self.position)
        await self._state_store.put(f"{self.config.durable}.next", data)
        await self.store.checkpoint(self._tag(self.position))
        await self._state_store.put(f"{self.config.durable}.last", data)
        self.checkpoints += 1

    async def _maybe_publish_dense(self) -> None:
        now, step = time.monotonic(), self.learner.step
        if step == self._last_dense_step:
            return
        by_steps = 0 < self.config.dense_interval_steps <= step - self._last_dense_step
        if not by_steps and now - self._last_dense < self.config.dense_interval_s:
            return
        snap = self.learner.dense_snapshot(self.config.model, self.position)
        await bus.publish(self.js, f"dense.{self.config.model}", snap.SerializeToString())
        self._last_dense, self._last_dense_step = now, snap.step

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < self.config.log_interval_s:
            return
        self._last_log = now
        metrics = self.learner.metrics
        window, overall = metrics.window_auc(), metrics.auc()
        logger.info(
            "training progress",
            extra={
                "step": self.learner.step,
                "samples_trained": self.learner.samples_trained,
                "position": self.position,
                "progressive_auc": None if overall is None else round(overall, 4),
                "window_auc": None if window is None else round(window, 4),
                "log_loss": metrics.mean_log_loss(),
                "window_log_loss": metrics.window_log_loss(),
            },
        )


def _store_lost_writes(exc: Exception) -> bool:
    """Whether a store call's failure means acknowledged or in-flight writes may be lost (a shard restart
    or a dropped connection), which a rollback to the last checkpoint repairs."""
    if isinstance(exc, StoreRestarted):
        return True
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


def _position_of(state: bytes) -> int:
    return int(torch.load(io.BytesIO(state), weights_only=False)["position"])


def _slice(batch: SampleArrays, start: int, stop: int) -> SampleArrays:
    offsets = np.concatenate([[0], np.cumsum(batch.lengths, dtype=np.int64)])
    return SampleArrays(
        fids=batch.fids[offsets[start] : offsets[stop]],
        lengths=batch.lengths[start:stop],
        labels=batch.labels[start:stop],
        weights=batch.weights[start:stop],
        sample_ids=batch.sample_ids[start:stop],
        event_time_ms=batch.event_time_ms[start:stop],
        user_ids=batch.user_ids[start:stop],
        item_ids=batch.item_ids[start:stop],
        label_vectors=batch.label_vectors[start:stop],
        versions=batch.versions[start:stop],
    )
