"""The trainer: samples -> pull rows -> forward/backward -> push sparse gradients -> dense step.

One worker for batch and online training: it first trains on a dataset file (``FRESHET_TRAINER_REPLAY``)
or on the history in the SAMPLES stream (``FRESHET_TRAINER_START=first``), then keeps following the
stream, through the same code path.

Pushes and pulls
    A step's push and the pull of a later step's rows travel in one ``PushPull`` call (one round trip
    per step, not two); the store applies the push, then reads. Acks of the sample messages and
    ``position`` advance only once the pushes of all their steps are acknowledged, in order, and a
    checkpoint first waits for every push under way, so it never covers a sample whose push may not
    have landed. Steps are computed on the event loop: the work holds the GIL anyway, and a worker
    thread only added hand-offs; the calls under way are sent before a compute starts.

Pipelining (``FRESHET_TRAIN_PIPELINE``, on by default)
    Step k's push carries the pull of step k+2 and is answered while step k+1 is computed, so the
    store works while the trainer computes and the trainer never waits for a round trip. Step k+2
    thus reads rows without step k+1's gradients: a staleness of one step, as in Monolith and PERSIA
    (pushes still under way when a pull is sent are ahead of it on the same connection, and the store
    serves one connection's calls in order; gRPC does not promise that order, so at worst two steps).
    At most ``MAX_INFLIGHT_PUSHES`` pushes are under way. Off, step k's push carries step k+1's pull
    and the next compute waits for it: every step reads what the previous one pushed. With small
    batches on a bursty stream (MovieLens users rate in bursts) that is worth more online AUC than
    the throughput pipelining gives.

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
from collections import deque
from collections.abc import Callable, Sequence
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
from freshet.clients import PullPart, PushPart, ShardedStoreClient, StoreRestarted
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
QUEUED_STEPS = 4  # planned steps waiting for the training loop at most
MAX_INFLIGHT_PUSHES = 2  # pushes under way at once at most (a push that also pulls waits for the others)


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

    def plan(self, batch: SampleArrays) -> Prepared:
        """The batch's pooling plan; its rows are still to be pulled (``exchange``)."""
        return Prepared(batch, plan(batch.fids, batch.lengths, self.config), {})

    async def prepare(self, batch: SampleArrays) -> Prepared:
        """Plans the batch and pulls its rows from every table."""
        prep = self.plan(batch)
        await self.exchange(None, [prep])
        return prep

    async def exchange(self, pushed: tuple[Prepared, Computed] | None, pulled: Sequence[Prepared]) -> None:
        """Pushes a computed step's gradients, then pulls the rows of ``pulled`` steps, in one call per shard.

        The store applies the push before it reads, so the pulled rows include it.
        """
        pushes = self.push_parts(*pushed) if pushed is not None else []
        pulls = [_pull_parts(p) for p in pulled]
        if not pushes and not any(pulls):
            return
        values = iter(await self.store.push_pull(pushes, [part for parts in pulls for part in parts]))
        for prep, parts in zip(pulled, pulls, strict=True):
            prep.rows.update((name, next(values)) for name, _ in parts)

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

    @staticmethod
    def push_parts(prep: Prepared, computed: Computed) -> list[PushPart]:
        """Each table's gradients with the number of samples behind each (the rows' frequencies)."""
        parts = []
        for name, grad in computed.grads.items():
            table = prep.plan.tables[name]
            counts = np.bincount(table.rows, minlength=len(table.fids)).astype(np.int32)
            parts.append((name, table.fids, grad, counts))
        return parts

    async def push(self, prep: Prepared, computed: Computed) -> None:
        """Pushes each table's gradients (see ``push_parts``)."""
        await self.exchange((prep, computed), [])

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
class _Step:
    """A planned step on its way through the training loop."""

    index: int
    prep: Prepared | None  # None: a fetch without samples
    done: Fetched | None  # the fetch this step completes: acked once its push is acknowledged
    rows: asyncio.Task | None = None  # the call that brings its rows (its own pull, or an earlier push's)


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
        self._inflight: deque[tuple[_Step, asyncio.Task]] = deque()  # pushes under way, oldest first

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
        """Batch training on a dataset file before the stream (the same steps, unpipelined, no checkpoints)."""
        from freshet.datasets import dataset_samples

        fmt, _, path = source.partition(":")
        previous = None  # the last step computed, pushed by the call that pulls the next one's rows
        for batch in dataset_samples(fmt, path, self.config.batch_size):
            if self.stopping.is_set():
                break
            prep = self.learner.plan(batch)
            await self.learner.exchange(previous, [prep])
            previous = (prep, self.learner.compute(prep))
            await self._after_step(boundary=False)
        await self.learner.exchange(previous, [])
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
        """The fetched samples in steps of ``batch_size`` (the last one smaller), in order.

        A message is sliced where it holds whole steps and only the pieces of a step that spans
        messages are concatenated: concatenating the whole fetch first would copy every sample.
        """
        size = self.config.batch_size
        steps: list[SampleArrays] = []
        pieces: list[SampleArrays] = []
        pending = 0  # samples in pieces
        for batch in fetched.batches:
            offsets, start, n = None, 0, len(batch)
            while start < n:
                stop = min(n, start + size - pending)
                if start == 0 and stop == n:
                    piece = batch
                else:
                    if offsets is None:
                        offsets = np.concatenate([[0], np.cumsum(batch.lengths, dtype=np.int64)])
                    piece = _slice(batch, offsets, start, stop)
                pieces.append(piece)
                pending += stop - start
                start = stop
                if pending == size:
                    steps.append(pieces[0] if len(pieces) == 1 else SampleArrays.concat(pieces))
                    pieces, pending = [], 0
        if pieces:
            steps.append(pieces[0] if len(pieces) == 1 else SampleArrays.concat(pieces))
        return steps

    async def _train_stream(self) -> None:
        """Fetch + plan (a task) -> rows -> compute -> push, with the pull of a later step in the push's call.

        Pipelined (depth 2): while step k is computed, the call that pushes step k-1 and pulls step k+1
        is under way; unpipelined (depth 1): step k's push carries step k+1's pull, and the next compute
        waits for it. Acks and ``position`` follow the pushes, in order (see ``_settle``).
        """
        queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUED_STEPS)
        depth = 2 if self.config.pipeline else 1  # steps whose rows are requested while one is computed
        ahead: deque[_Step] = deque()  # rows requested (or none needed), not computed yet
        self._inflight.clear()
        ended = False

        async def produce() -> None:
            index = 0
            try:
                while (fetched := await self._fetch()) is not None:
                    steps = self._steps(fetched)
                    for i, step in enumerate(steps):
                        last = i == len(steps) - 1
                        await queue.put(_Step(index, self.learner.plan(step), fetched if last else None))
                        index += 1
                    if not steps:
                        await queue.put(_Step(index, None, fetched))
                        index += 1
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                await queue.put(exc)
                return
            await queue.put(None)

        def take(item: _Step | Exception | None) -> _Step | None:
            nonlocal ended
            if isinstance(item, Exception):
                raise item
            ended = item is None
            return item

        def poll() -> _Step | None:
            return None if ended or queue.empty() else take(queue.get_nowait())

        producer = asyncio.create_task(produce())
        try:
            while True:
                if not ahead:
                    if self._inflight and queue.empty():
                        await self._settle(0)  # idle: let the pushes complete (acks, checkpoints)
                    if ended or (step := take(await queue.get())) is None:
                        break
                    ahead.append(await self._request_rows(step, depth))
                while len(ahead) < depth and (step := poll()) is not None:
                    ahead.append(await self._request_rows(step, depth))
                current = ahead.popleft()
                if current.prep is None:  # a fetch without samples: a quiet stream, or only malformed messages
                    await self._settle(0)
                    await self._finish(current)
                    await self._after_step(boundary=True)
                    continue
                await current.rows
                links = telemetry.links_from(m.headers for m in (current.done.msgs if current.done else []))
                with tracer.start_as_current_span(
                    "train_batch", links=links, attributes={"samples": len(current.prep.batch)}
                ):
                    computed = self.learner.compute(current.prep)
                    following = poll() if len(ahead) < depth else None
                    pulled = [following.prep] if following is not None and following.prep is not None else []
                    # Unpipelined, the next step must read every push; pipelined, the store applies the
                    # push under way first (one connection's calls in order), then this one, then reads.
                    await self._settle(0 if pulled and not self.config.pipeline else MAX_INFLIGHT_PUSHES - 1)
                    call = asyncio.create_task(self.learner.exchange((current.prep, computed), pulled))
                self._inflight.append((current, call))
                if following is not None:
                    following.rows = call if pulled else None
                    ahead.append(following)
                for _ in range(2):  # grpc.aio runs a call in a task of its own: send it before the next compute
                    await asyncio.sleep(0)
                await self._settle_done()
                await self._maybe_publish_dense()
                if current.done is not None and self._checkpoint_due():
                    # Only after the last step of a fetch: mid-fetch, the store holds pushes of samples
                    # that the position does not cover yet.
                    await self._settle(0)
                    await self._maybe_checkpoint()
                self._maybe_log()
            await self._settle(0)
        finally:
            producer.cancel()
            # A push still under way could land after the rollback of a recovery: wait for every call.
            calls = [call for _, call in self._inflight] + [s.rows for s in ahead if s.rows is not None]
            if calls:
                await asyncio.wait(calls)
                for call in calls:
                    if not call.cancelled():
                        call.exception()  # retrieved: the first failure is the one raised
            self._inflight.clear()

    async def _request_rows(self, step: _Step, depth: int) -> _Step:
        """Starts the pull of a step's rows on its own (no push to carry it), after every push it must see."""
        if step.prep is not None:
            while self._inflight and self._inflight[0][0].index <= step.index - depth:
                await self._settle(len(self._inflight) - 1)
            step.rows = asyncio.create_task(self.learner.exchange(None, [step.prep]))
        return step

    async def _settle(self, keep: int) -> None:
        """Waits for the oldest pushes until at most ``keep`` are under way; acks the fetches they complete."""
        while len(self._inflight) > keep:
            step, call = self._inflight[0]
            await call
            self._inflight.popleft()
            await self._finish(step)

    async def _settle_done(self) -> None:
        """Acks what the pushes that already completed (in order) allow, without waiting."""
        while self._inflight and self._inflight[0][1].done():
            step, call = self._inflight.popleft()
            call.result()
            await self._finish(step)

    async def _finish(self, step: _Step) -> None:
        """A step's push is acknowledged: when it ends its fetch, ack the fetch's messages and advance."""
        if step.done is not None:
            for msg in step.done.msgs:
                await msg.ack()
            self.position = max(self.position, step.done.last_seq)

    def _checkpoint_due(self) -> bool:
        return (
            self.config.checkpoint_s > 0
            and self._state_store is not None
            and time.monotonic() - self._last_checkpoint >= self.config.checkpoint_s
        )

    async def _after_step(self, boundary: bool) -> None:
        await self._maybe_publish_dense()
        if boundary:
            await self._maybe_checkpoint()
        self._maybe_log()

    async def _maybe_checkpoint(self) -> None:
        if self._checkpoint_due():
            self._last_checkpoint = time.monotonic()
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


def _pull_parts(prep: Prepared) -> list[PullPart]:
    return [(name, t.fids) for name, t in prep.plan.tables.items() if len(t.fids)]


def _position_of(state: bytes) -> int:
    return int(torch.load(io.BytesIO(state), weights_only=False)["position"])


def _slice(batch: SampleArrays, offsets: np.ndarray, start: int, stop: int) -> SampleArrays:
    """Samples ``start:stop`` of a batch whose sample ``i`` owns fids ``offsets[i]:offsets[i + 1]``."""
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
