"""Joiner benchmark: ``make bench-joiner`` -> bench/results/joiner.json + a markdown table.

- ``events_per_s``: one joiner process (RocksDB state) drains a backlog of impressions and
  clicks (one event per message) into samples; events divided by the time until the last sample
  is in the SAMPLES stream.
- ``join_latency_p99_ms``: with the joiner caught up, clicks arrive at a steady rate next to their
  impressions; for each click, the time from its publish to its sample being stored in the SAMPLES
  stream (seen by a subscriber on ``samples.>``), p50 / p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
import numpy as np

from freshet import bus
from freshet.batches import decode_samples
from freshet.events.v1 import events_pb2
from freshet.natsserver import EmbeddedNats

RESULTS = Path(__file__).resolve().parent / "results"


def impression(i: int, t: int) -> bytes:
    return events_pb2.Impression(
        request_id=f"r{i}", user_id=i % 997, item_id=i % 50, event_time_ms=t
    ).SerializeToString()


def click(i: int, t: int) -> bytes:
    return events_pb2.Action(
        request_id=f"r{i}", item_id=i % 50, type=events_pb2.ACTION_TYPE_CLICK, event_time_ms=t
    ).SerializeToString()


async def publish_backlog(js, n_impressions: int, base: int) -> int:
    pending, events = [], 0
    for i in range(n_impressions):
        pending.append(js.publish("events.impressions.0", impression(i, base + i), headers={bus.MSG_ID: f"i{i}"}))
        events += 1
        if i % 2 == 0:
            pending.append(js.publish("events.actions.0", click(i, base + i + 20), headers={bus.MSG_ID: f"a{i}"}))
            events += 1
        if len(pending) >= 1000:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    return events


async def wait_for_samples(js, n: int, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (await js.stream_info(bus.SAMPLES.name)).state.messages >= n:
            return time.monotonic()
        await asyncio.sleep(0.02)  # polling stream state: the benchmark's own progress check
    raise TimeoutError(f"fewer than {n} samples after {timeout_s}s")


async def measure_latency(nc, js, rate: float, seconds: float, first: int) -> list[float]:
    """Publishes impression+click pairs at ``rate`` events/s; returns click publish -> sample stored, ms."""
    sent: dict[str, float] = {}
    latencies: list[float] = []

    async def on_sample(msg) -> None:
        arrived = time.monotonic()
        for sample_id in decode_samples(msg.data).sample_ids:
            t0 = sent.pop(sample_id, None)
            if t0 is not None:
                latencies.append((arrived - t0) * 1000)

    sub = await nc.subscribe("samples.>", cb=on_sample)
    start = time.monotonic()
    i = first
    while time.monotonic() - start < seconds:
        now = bus.now_ms()
        await js.publish("events.impressions.0", impression(i, now), headers={bus.MSG_ID: f"i{i}"})
        sent[f"r{i}:{i % 50}:v1"] = time.monotonic()
        await js.publish("events.actions.0", click(i, now + 1), headers={bus.MSG_ID: f"a{i}"})
        i += 1
        await asyncio.sleep(max(0.0, start + (i - first) * 2 / rate - time.monotonic()))
    await asyncio.sleep(1.0)  # let the last samples arrive
    await sub.unsubscribe()
    return latencies


async def run(n_impressions: int, rate: float, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(store_dir=os.path.join(tmp, "js")) as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await bus.declare_streams(js)
        events = await publish_backlog(js, n_impressions, bus.now_ms() - 600_000)
        env = {
            **os.environ,
            "FRESHET_NATS_URL": server.url,
            "FRESHET_JOINER_STATE_DIR": os.path.join(tmp, "state"),
            "FRESHET_JOIN_WINDOW_S": "1.0",
            "FRESHET_JOIN_ALLOWED_LATENESS_S": "0.1",
            "FRESHET_JOIN_IDLE_TIMEOUT_S": "0.5",
            "FRESHET_LOG_LEVEL": "WARNING",
        }
        proc = await asyncio.to_thread(subprocess.Popen, [sys.executable, "-m", "services.joiner"], env=env)
        try:
            started = time.monotonic()
            finished = await wait_for_samples(js, n_impressions, timeout_s=600)
            throughput = events / (finished - started)
            latencies = await measure_latency(nc, js, rate, seconds, n_impressions)
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 20)
            await nc.close()
    lat = np.array(latencies)
    return {
        "events": events,
        "events_per_s": throughput,
        "latency_rate_events_per_s": rate,
        "latency_samples": len(lat),
        "join_latency_p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "join_latency_p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=20_000, help="backlog impressions (+ a click on half)")
    parser.add_argument("--rate", type=float, default=2_000.0, help="events/s during the latency run")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    report = asyncio.run(run(args.impressions, args.rate, args.seconds))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "joiner.json").write_text(json.dumps(report, indent=2) + "\n")
    p50, p99 = report["join_latency_p50_ms"], report["join_latency_p99_ms"]
    table = "\n".join(
        [
            "| measure | value | target |",
            "|---|---|---|",
            f"| events/s, one joiner, backlog of {report['events']:,} single-event messages"
            f" | {report['events_per_s']:,.0f} | ≥ 20,000 |",
            f"| join latency p50 at {args.rate:,.0f} events/s | {p50:.1f} ms | |",
            f"| join latency p99 at {args.rate:,.0f} events/s | {p99:.1f} ms | ≤ 50 ms |",
        ]
    )
    (RESULTS / "joiner.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
