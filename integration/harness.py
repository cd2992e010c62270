"""Runs the six services in one process for integration tests (same code as the real processes)."""

from __future__ import annotations

import tempfile
from contextlib import AsyncExitStack

import numpy as np

from freshet import bus
from freshet.clients import PredictorClient
from freshet.config import BusConfig
from freshet.events.v1 import events_pb2
from services.joiner.config import JoinerConfig
from services.joiner.service import JoinerService
from services.predictor.config import PredictorConfig
from services.predictor.service import PredictorService
from services.publisher.config import PublisherConfig
from services.publisher.service import PublisherService
from services.store.config import StoreConfig
from services.store.service import StoreService
from services.trainer.config import TrainerConfig
from services.trainer.service import TrainerService
from services.validator.config import ValidatorConfig
from services.validator.service import ValidatorService


class Pipeline:
    """The whole flow: joiner -> trainer -> store -> publisher -> validator -> predictor."""

    def __init__(self, nats_url: str, window_s: float = 0.5) -> None:
        self.bus_config = BusConfig(nats_url=nats_url)
        self.window_s = window_s
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Pipeline:
        enter = self._stack.enter_async_context
        b = self.bus_config
        data_dir = self._stack.enter_context(tempfile.TemporaryDirectory())
        self.store = await enter(StoreService(StoreConfig(port=0, data_dir=data_dir)))
        addr = self.store.address
        self.predictor = await enter(PredictorService(PredictorConfig(port=0), b))
        self.validator = await enter(ValidatorService(ValidatorConfig(), b))
        self.publisher = await enter(PublisherService(PublisherConfig(store_address=addr), b))
        self.trainer = await enter(TrainerService(TrainerConfig(store_address=addr, dense_interval_s=0.1), b))
        self.joiner = await enter(JoinerService(JoinerConfig(window_s=self.window_s), b))
        self.client = await enter(PredictorClient(self.predictor.address))
        self.nc = await bus.connect(b, "test-client")
        self._stack.push_async_callback(self.nc.close)
        self.js = self.nc.jetstream()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def impression(self, request_id: str, user: int, item: int, position: int = 0) -> None:
        imp = events_pb2.Impression(request_id=request_id, user_id=user, item_id=item, position=position)
        imp.event_time_ms = bus.now_ms()
        await bus.publish(
            self.js, "events.impressions.0", imp.SerializeToString(), msg_id=f"i:{request_id}:{item}"
        )

    async def click(self, request_id: str, item: int) -> None:
        act = events_pb2.Action(request_id=request_id, item_id=item, type=events_pb2.ACTION_TYPE_CLICK, value=1)
        act.event_time_ms = bus.now_ms()
        await bus.publish(self.js, "events.actions.0", act.SerializeToString(), msg_id=f"a:{request_id}:{item}")

    async def score(self, user: int, item: int) -> tuple[float, int]:
        scores, version = await self.client.predict("fm", user, np.array([item]))
        return float(scores[0]), version
