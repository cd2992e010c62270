"""The trainer's pushes on a real nats-server, store (gRPC, RocksDB) and JetStream consumer: acks, the stream
position and checkpoints follow pushes that completed, never pushes still under way, and pulls wait for the
pushes they must see (all of them unpipelined, all but the one just before pipelined)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from freshet import bus
from freshet.batches import Sample, encode_samples
from freshet.clients import PullPart, PushPart, ShardedStoreClient
from freshet.config import BusConfig
from freshet.fids import example_fids
from freshet.testing import assert_eventually
from services.store.config import StoreConfig
from services.store.service import StoreService
from services.trainer.config import TrainerConfig
from services.trainer.service import TrainerService

BATCH = 8


class RecordingStore(ShardedStoreClient):
    """A store client that can hold calls carrying pushes at a gate, and records what each call saw.

    ``under_way`` counts the calls with pushes sent and not answered yet; ``pulls_sent_beside`` records,
    for every call with pulls, how many calls with pushes were under way besides it when it was sent.
    """

    def __init__(self, addresses: list[str]) -> None:
        super().__init__(addresses)
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = 0  # calls with pushes waiting at the closed gate
        self.under_way = 0
        self.pulls_sent_beside: list[int] = []
        self.most_under_way = 0

    async def push_pull(self, pushes: list[PushPart], pulls: list[PullPart]) -> list[np.ndarray]:
        if pushes and not self.gate.is_set():
            self.held += 1
            await self.gate.wait()
            self.held -= 1
        if pulls:
            self.pulls_sent_beside.append(self.under_way)
        if not pushes:
            return await super().push_pull(pushes, pulls)
        self.under_way += 1
        self.most_under_way = max(self.most_under_way, self.under_way)
        try:
            return await super().push_pull(pushes, pulls)
        finally:
            self.under_way -= 1


def _message(seq: int) -> bytes:
    """One step's worth of samples (BATCH), all with user ``seq``'s fids."""
    samples = [
        Sample(
            sample_id=f"m{seq}-{i}:{i}",
            fids=example_fids(seq, np.array([i]), 0)[0],
            label=float(i % 2),
            user_id=seq,
            item_id=i,
        )
        for i in range(BATCH)
    ]
    return encode_samples(samples)


async def _publish(js, first: int, count: int) -> int:
    """Publishes messages ``first .. first + count - 1``; returns the last one's stream sequence."""
    for seq in range(first, first + count):
        ack = await js.publish("samples.0", _message(seq))
    return ack.seq


async def _trainer(nats_url: str, store: StoreService, **config) -> tuple[TrainerService, RecordingStore]:
    trainer = TrainerService(
        TrainerConfig(store_address=store.address, batch_size=BATCH, start="first", **config),
        BusConfig(nats_url=nats_url),
    )
    recording = RecordingStore([store.address])
    await trainer.store.close()
    trainer.store = trainer.learner.store = recording
    return trainer, recording


def _checkpoint_tags(store: StoreService) -> set[str]:
    return {t.checkpoint_info.tag for t in store.tables.values()}


async def test_a_step_whose_push_is_under_way_is_neither_acked_nor_covered_by_a_checkpoint(nats_url, js, tmp_path):
    await bus.declare_streams(js)
    config = StoreConfig(port=0, data_dir=str(tmp_path / "store"))
    async with StoreService(config) as store:
        trainer, recording = await _trainer(nats_url, store, checkpoint_s=0.01, fetch_batch=1)
        spec = bus.ConsumerSpec(
            stream=bus.SAMPLES.name, durable=trainer.config.durable, filter_subject="samples.>"
        )
        async with trainer:
            trained = await _publish(js, 1, 3)
            await assert_eventually(
                lambda: _checkpoint_tags(store) == {f"trainer@{trained}"}, message="3 messages checkpointed"
            )
            recording.gate.clear()
            held = await _publish(js, 4, 1)

            # Step 4 is computed (its samples scored and learnt by the dense part), its push is held
            # before it reaches the store, and the trainer waits for it (checkpoints are due all the time).
            await assert_eventually(
                lambda: recording.held == 1 and trainer.learner.samples_trained == 4 * BATCH,
                message="step 4 computed, its push held",
            )
            assert trainer.position == trained
            assert await bus.ack_floor(js, spec) == trained
            assert _checkpoint_tags(store) == {f"trainer@{trained}"}
            user_fid = example_fids(4, np.array([0]), 0)[:1, 0]  # only message 4's samples have it
            assert store.tables["fm"].host.find(user_fid).tolist() == [-1]  # no row: the push did not land

            recording.gate.set()
            await assert_eventually(
                lambda: _checkpoint_tags(store) == {f"trainer@{held}"}, message="step 4 pushed and checkpointed"
            )
            assert trainer.position == held
            assert await bus.ack_floor(js, spec) == held


@pytest.mark.parametrize("pipeline", [False, True])
async def test_pulls_wait_for_the_pushes_they_must_read(nats_url, js, pipeline):
    await bus.declare_streams(js)
    async with StoreService(StoreConfig(port=0)) as store:
        trainer, recording = await _trainer(nats_url, store, checkpoint_s=0, pipeline=pipeline, fetch_batch=4)
        async with trainer:
            last = await _publish(js, 1, 40)
            await assert_eventually(lambda: trainer.position == last, message="40 messages trained")
        assert trainer.learner.samples_trained == 40 * BATCH
        if pipeline:  # a pull may pass the one push before it (the store serves it first anyway)
            assert max(recording.pulls_sent_beside) <= 1
            assert recording.most_under_way <= 2
        else:  # strictly sequential: every pull is sent once every earlier push was answered
            assert recording.pulls_sent_beside == [0] * len(recording.pulls_sent_beside)
            assert recording.most_under_way == 1
