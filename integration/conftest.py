"""Fixtures for integration tests: a real nats-server with JetStream per test."""

from __future__ import annotations

import pytest

from freshet import bus
from freshet.config import BusConfig
from freshet.natsserver import EmbeddedNats


@pytest.fixture
def nats_server(tmp_path):
    """A fresh nats-server on a free loopback port with its store in the test's tmp dir."""
    with EmbeddedNats(store_dir=str(tmp_path / "jetstream")) as server:
        yield server


@pytest.fixture
def nats_url(nats_server) -> str:
    return nats_server.url


@pytest.fixture
async def pipeline(nats_url):
    """All six services in this process on a fresh nats-server: yields a ``Pipeline``."""
    from integration.harness import Pipeline

    async with Pipeline(nats_url) as running:
        yield running


@pytest.fixture
async def js(nats_url):
    """A JetStream context on the test's server with every freshet stream declared."""
    nc = await bus.connect(BusConfig(nats_url=nats_url), "test-publisher")
    js = nc.jetstream()
    await bus.declare_streams(js)
    yield js
    await nc.close()
