"""The trainer: samples -> pull rows -> forward/backward -> push sparse grads -> dense step.

Progressive validation: each batch is scored before the model learns from it. Sample
messages are acknowledged only after their gradients were applied by the store (at least
once; a crash between Push and ack retrains the batch — exactly-once is issue #5's work).
"""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from freshet import bus, telemetry
from freshet.batches import SampleArrays, decode_samples
from freshet.clients import ShardedStoreClient
from freshet.config import BusConfig
from freshet.fm import FactorizationMachine, FMConfig, segment_ids
from freshet.metrics import ProgressiveMetrics
from freshet.model.v1 import model_pb2
from freshet.runtime import NatsMixin, Service
from freshet.tensors import TensorError, to_tensor
from services.trainer.config import TrainerConfig

logger = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)


class Learner:
    """The training step, independent of NATS so it can be tested against a store directly."""

    def __init__(self, config: TrainerConfig, store: ShardedStoreClient) -> None:
        self.config = config
        self.store = store
        self.model = FactorizationMachine(FMConfig(config.factors))
        self.optimizer = torch.optim.Adagrad(self.model.parameters(), lr=config.dense_lr)
        self.metrics = ProgressiveMetrics()
        self.step = 0
        self.samples_trained = 0

    async def learn(self, batch: SampleArrays) -> np.ndarray:
        """Scores the batch, then trains on it; returns the pre-training probabilities float32 [B]."""
        unique, inverse = np.unique(batch.fids, return_inverse=True)
        rows_np = await self.store.pull(self.config.table, unique)
        rows = torch.from_numpy(rows_np.copy()).requires_grad_(True)
        segments = torch.from_numpy(segment_ids(batch.lengths))
        logits = self.model(rows, torch.from_numpy(inverse.astype(np.int64)), segments, len(batch))
        labels = torch.from_numpy(batch.labels.astype(np.float32))
        weights = torch.from_numpy(batch.weights.astype(np.float32))
        # Summed (not averaged) loss: each sample's gradient counts the same whatever the batch size.
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weights
        ).sum()
        self.optimizer.zero_grad()
        loss.backward()
        probs = torch.sigmoid(logits).detach().numpy()
        self.metrics.update(probs, batch.labels)
        await self.store.push(self.config.table, unique, rows.grad.numpy())
        self.optimizer.step()
        self.step += 1
        self.samples_trained += len(batch)
        return probs

    def dense_snapshot(self) -> model_pb2.DenseSnapshot:
        params = {
            name: to_tensor(p.detach().numpy().astype(np.float32)) for name, p in self.model.named_parameters()
        }
        return model_pb2.DenseSnapshot(
            model=self.config.model,
            step=self.step,
            params=params,
            samples_trained=self.samples_trained,
            created_ms=bus.now_ms(),
        )


class TrainerService(NatsMixin, Service):
    """One training worker on a durable consumer of the SAMPLES stream."""

    name = "trainer"

    def __init__(self, config: TrainerConfig, bus_config: BusConfig) -> None:
        super().__init__()
        self.config = config
        self.bus_config = bus_config
        self.store = ShardedStoreClient([a.strip() for a in config.store_address.split(",") if a.strip()])
        self.learner = Learner(config, self.store)
        self._last_dense = 0.0
        self._last_dense_step = -1
        self._last_log = time.monotonic()

    async def _start(self) -> None:
        await self._connect_nats(self.bus_config, "freshet-trainer")
        spec = bus.ConsumerSpec(
            stream=bus.SAMPLES.name,
            durable=self.config.durable,
            filter_subject=self.config.subject,
            max_ack_pending=max(10_000, 4 * self.config.batch_size),
            # A failed step is the store's or the network's fault, never the sample's: retry forever.
            # Samples that cannot be decoded are dead-lettered by the handler instead.
            max_deliver=-1,
        )
        self.loop = bus.PullLoop(
            self.js,
            spec,
            handler=self._on_batch,
            source="samples",
            batch=self.config.batch_size,
            fetch_timeout_s=self.config.fetch_timeout_s,
        )
        self.spawn(self._check_table_then_train(), "trainer-consume")

    async def _check_table_then_train(self) -> None:
        await self._check_table()
        await self.loop.run(self.stopping)

    async def _stop(self) -> None:
        await self._drain_nats()
        await self.store.close()

    async def _check_table(self) -> None:
        """Fails at start-up when the store's table cannot hold this model's rows."""
        want = 1 + self.config.factors
        while True:
            try:
                described = await self.store.describe()
                break
            except grpc.aio.AioRpcError as exc:
                if self.stopping.is_set():
                    return
                logger.warning("store not reachable yet", extra={"code": exc.code().name})
        shards = {d.num_shards for d in described}
        if shards != {len(described)}:
            raise ValueError(
                f"FRESHET_STORE_ADDRESS lists {len(described)} shards, the store says {sorted(shards)}"
            )
        tables = {t.name: t.dim for t in described[0].tables}
        if tables.get(self.config.table) != want:
            raise ValueError(
                f"store table {self.config.table!r} has dim {tables.get(self.config.table)}, the model needs {want} "
                f"(FRESHET_TABLE / FRESHET_FM_FACTORS vs FRESHET_STORE_TABLES); tables: {tables}"
            )

    async def _on_batch(self, msgs: list[Msg]) -> list[bus.Outcome]:
        parts, outcomes, good = [], [], []
        for msg in msgs:
            try:
                parts.append(decode_samples(msg.data))
                good.append(msg)
                outcomes.append(bus.Outcome.ACK)
            except (DecodeError, TensorError, ValueError) as exc:
                await self.loop.reject(msg, f"malformed SampleBatch: {exc}")
                outcomes.append(bus.Outcome.DEFER)
        if parts:
            batch = SampleArrays.concat(parts)
            links = telemetry.links_from(m.headers for m in good)
            with tracer.start_as_current_span("train_batch", links=links, attributes={"samples": len(batch)}):
                await self.learner.learn(batch)
        await self._maybe_publish_dense()
        self._maybe_log()
        return outcomes

    async def _maybe_publish_dense(self) -> None:
        now = time.monotonic()
        if now - self._last_dense < self.config.dense_interval_s or self.learner.step == self._last_dense_step:
            return
        snap = self.learner.dense_snapshot()
        await bus.publish(self.js, f"dense.{self.config.model}", snap.SerializeToString())
        self._last_dense, self._last_dense_step = now, snap.step

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < self.config.log_interval_s:
            return
        self._last_log = now
        auc = self.learner.metrics.window_auc()
        logger.info(
            "training progress",
            extra={
                "step": self.learner.step,
                "samples_trained": self.learner.samples_trained,
                "progressive_auc": None if auc is None else round(auc, 4),
                "log_loss": self.learner.metrics.mean_log_loss(),
            },
        )
