"""Exactly once across kill -9: a joiner process killed at several points emits every sample once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import nats

from freshet import bus
from freshet.events.v1 import events_pb2
from freshet.testing import SampleReader, assert_eventually, start_service

IMPRESSIONS = 12_000
CLICK_EVERY = 3  # two thirds of the impressions get a click: 12,000 + 8,000 = 20,000 events


async def publish_events(js, base_ms: int) -> dict[str, float]:
    """Publishes the impressions and clicks; returns the expected label of every sample id."""
    expected, pending = {}, []
    for i in range(IMPRESSIONS):
        request, item = f"r{i}", i % 50
        imp = events_pb2.Impression(request_id=request, user_id=i % 997, item_id=item, event_time_ms=base_ms + i)
        pending.append(bus.publish(js, "events.impressions.0", imp.SerializeToString(), msg_id=f"i{i}"))
        clicked = i % CLICK_EVERY != 0
        if clicked:
            act = events_pb2.Action(
                request_id=request, item_id=item, type=events_pb2.ACTION_TYPE_CLICK, event_time_ms=base_ms + i + 50
            )
            pending.append(bus.publish(js, "events.actions.0", act.SerializeToString(), msg_id=f"a{i}"))
        expected[f"{request}:{item}:v1"] = 1.0 if clicked else 0.0
        if len(pending) >= 500:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    return expected


async def test_joiner_killed_with_sigkill_three_times_emits_every_sample_exactly_once(nats_url, tmp_path):
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await bus.declare_streams(js)
    expected = await publish_events(js, base_ms=bus.now_ms())
    env = {
        **os.environ,
        "FRESHET_NATS_URL": nats_url,
        "FRESHET_JOINER_STATE_DIR": str(tmp_path / "join-state"),
        "FRESHET_JOIN_WINDOW_S": "0.5",
        "FRESHET_JOIN_ALLOWED_LATENESS_S": "0.2",
        "FRESHET_JOIN_IDLE_TIMEOUT_S": "0.3",
        "FRESHET_JOINER_FETCH_BATCH": "256",
    }

    def start() -> subprocess.Popen:
        return start_service("joiner", env, tmp_path / "joiner.log")

    reader = SampleReader(js)

    async def at_least(n: int) -> bool:
        return await reader.read() >= n

    try:
        for threshold in (1_500, 5_000, 9_000):
            proc = start()
            await assert_eventually(
                lambda t=threshold: at_least(t), timeout_s=60, interval_s=0.01, message=f"{threshold} samples"
            )
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        proc = start()
        await assert_eventually(lambda: at_least(len(expected)), timeout_s=90, message="all samples")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        await reader.read()
        assert len(reader.ids) == len(set(reader.ids))  # no sample twice
        assert reader.labels == expected
    finally:
        if proc.poll() is None:
            proc.kill()
        await nc.close()
