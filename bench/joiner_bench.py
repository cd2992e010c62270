"""Joiner benchmark: ``make bench-joiner`` -> bench/results/joiner.json + a markdown table.

- ``events_per_s``: one joiner process (RocksDB state) drains a backlog of impressions and clicks,
  published as clients publish them by default, ``EventColumns`` messages on ``events.columns.<p>``
  (``freshet.eventlog.EventPublisher``, 256 events each), into samples; events divided by the time from
  the joiner's durable consumer existing (so not the process's start-up) until the last sample is in
  the SAMPLES stream. ``single_event_messages_per_s`` is the same with one event per message, for
  comparison.
- ``join_latency_p99_ms``: clients publish requests (5 impressions, a click on about 1 in 4
  impressions) at a sustained ``--rate`` events/s as ``EventColumns``, flushing every few milliseconds;
  for each click, the time from its publish to its sample being stored in the SAMPLES stream (seen
  by a subscriber on ``samples.>``), p50 / p99, plus the rate actually sustained and the joiner
  process's CPU seconds per event over the run (``joiner_cpu_us_per_event``, from /proc).
- ``join_cpu_us_per_event``: the joiner's own work per event measured in-process, without NATS: the
  ``EventColumns`` messages the 20,000 events/s load would publish are decoded, joined, featurised,
  staged and committed on a RocksDB state, one message per step, by the service's own functions; CPU
  time (best of three runs) divided by events. Less sensitive to a busy machine than the latency
  figures. ``join_cpu_us_per_event_steady`` is the same with windows forgotten after 2 s of retention;
  ``join_cpu_us_per_event_rows`` the same load as row-form ``EventBatch`` messages.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
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
from freshet.eventcolumns import encode_event_columns
from freshet.eventlog import EventPublisher, encode_event_batch
from freshet.events.v1 import events_pb2
from freshet.natsserver import EmbeddedNats
from freshet.samples.v1 import samples_pb2
from services.joiner.columnjoin import JoinedColumns
from services.joiner.config import JoinerConfig
from services.joiner.service import PartitionJoin, message_events

RESULTS = Path(__file__).resolve().parent / "results"
ITEMS_PER_REQUEST = 5
JOINER_DURABLE = "joiner-p0"  # JoinerConfig.durable's default, partition 0

Event = events_pb2.Impression | events_pb2.Action


def request_events(i: int, t: int, click_every: int = 4) -> list[Event]:
    """Request ``i``'s events: 5 impressions at ``t``, each followed, on every ``click_every``-th item
    overall, by a click on it 1 ms later."""
    events: list[Event] = []
    for slot in range(ITEMS_PER_REQUEST):
        item = (i * 7 + slot) % 1000
        events.append(
            events_pb2.Impression(
                request_id=f"r{i}",
                user_id=i % 997,
                item_id=item,
                position=slot,
                event_time_ms=t,
                context={"device": "ios" if i % 3 else "web"},
            )
        )
        if (i * ITEMS_PER_REQUEST + slot) % click_every == 0:
            events.append(
                events_pb2.Action(
                    request_id=f"r{i}", item_id=item, type=events_pb2.ACTION_TYPE_CLICK, event_time_ms=t + 1
                )
            )
    return events


def click_sample_ids(events: list[Event]) -> list[str]:
    """The sample ids the clicks among ``events`` complete."""
    return [f"{e.request_id}:{e.item_id}:v1" for e in events if isinstance(e, events_pb2.Action)]


class SampleCounter:
    """Counts samples stored in the SAMPLES stream and when each watched sample id arrived."""

    def __init__(self) -> None:
        self.samples = 0
        self.watch: dict[str, float] = {}  # sample id -> publish time of the event that completes it
        self.latencies_ms: list[float] = []

    async def on_msg(self, msg) -> None:
        arrived = time.monotonic()
        # Only the ids: a full decode would take CPU from the joiner on the shared cores.
        sample_ids = samples_pb2.SampleBatch.FromString(msg.data).sample_ids
        self.samples += len(sample_ids)
        if self.watch:
            for sample_id in sample_ids:
                t0 = self.watch.pop(sample_id, None)
                if t0 is not None:
                    self.latencies_ms.append((arrived - t0) * 1000)

    async def wait_for(self, n: int, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while self.samples < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.samples} of {n} samples after {timeout_s}s")
            await asyncio.sleep(0.005)  # the benchmark's own progress check
        return time.monotonic()


async def publish_backlog(js, requests: int, base_ms: int, batched: bool, first: int = 0) -> tuple[int, int]:
    """Publishes ``requests`` requests' events; returns (events, impressions)."""
    events = impressions = 0
    publisher = EventPublisher(js, 1, f"backlog-{first}", max_events=256)
    pending = []
    for i in range(first, first + requests):
        for event in request_events(i, base_ms + i - first):
            events += 1
            impressions += isinstance(event, events_pb2.Impression)
            if batched:
                await publisher.add(event)
                continue
            kind = "impressions" if isinstance(event, events_pb2.Impression) else "actions"
            pending.append(bus.publish(js, f"events.{kind}.0", event.SerializeToString()))
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending = []
    await asyncio.gather(*pending)
    await publisher.flush()
    return events, impressions


async def sustained_load(js, counter: SampleCounter, rate: float, seconds: float, first: int) -> dict:
    """Publishes requests at ``rate`` events/s as one EventColumns every ``flush_s``; watches each click's sample.

    The messages are encoded here rather than through ``EventPublisher`` (same encoding, same subject):
    one message per flush whatever its size, and the generator, which shares the machine's two cores
    with the joiner and NATS, does no more than it must.
    """
    flush_s = 0.005
    start = time.monotonic()
    events, i, n = 0, first, 0
    while (now := time.monotonic()) - start < seconds:
        due = int((now - start) * rate)  # events that should have been published by now
        message: list[Event] = []
        t = bus.now_ms()
        while events + len(message) < due:
            message += request_events(i, t)
            i += 1
        if message:
            events += len(message)
            n += 1
            payload = encode_event_columns(message)
            sent = time.monotonic()
            for sample_id in click_sample_ids(message):
                counter.watch[sample_id] = sent
            await bus.publish(js, "events.columns.0", payload, msg_id=f"live-{first}:{n}")
        await asyncio.sleep(max(0.0, now + flush_s - time.monotonic()))
    elapsed = time.monotonic() - start
    return {"load_events": events, "load_requests": i - first, "sustained_events_per_s": events / elapsed}


async def drain(server_url: str, tmp: str, batched: bool, requests: int) -> dict:
    """A fresh stream, a backlog, one joiner process: events/s until every sample is stored."""
    nc = await nats.connect(server_url)
    js = nc.jetstream()
    for stream in (bus.EVENTS, bus.SAMPLES):
        try:
            await js.delete_stream(stream.name)
        except nats.js.errors.NotFoundError:
            pass
    await bus.declare_streams(js)
    counter = SampleCounter()
    await nc.subscribe("samples.>", cb=counter.on_msg)
    events, impressions = await publish_backlog(js, requests, bus.now_ms() - 600_000, batched)
    proc = start_joiner(server_url, os.path.join(tmp, f"state-{batched}"))
    try:
        started = await joiner_ready(js, proc)
        finished = await counter.wait_for(impressions, timeout_s=600)
    finally:
        stop_joiner(proc)
        await nc.close()
    return {"events": events, "events_per_s": events / (finished - started)}


async def consumer_exists(js, stream: str, durable: str) -> bool:
    try:
        await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        return False
    return True


async def joiner_ready(js, proc: subprocess.Popen, timeout_s: float = 120) -> float:
    """The time the joiner's durable consumer on EVENTS first exists (polled every 5 ms).

    Python start-up and imports take 1.5-2 s, about as long as the joiner takes to drain the whole backlog:
    the drain is timed from here.

    Raises:
        RuntimeError: the joiner process exited first (its exit code in the message).
        TimeoutError: no consumer within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if await consumer_exists(js, bus.EVENTS.name, JOINER_DURABLE):
            return time.monotonic()
        if (code := proc.poll()) is not None:
            raise RuntimeError(f"joiner exited with code {code} before its consumer {JOINER_DURABLE} existed")
        if time.monotonic() > deadline:
            raise TimeoutError(f"joiner consumer {JOINER_DURABLE}: not within {timeout_s}s")
        await asyncio.sleep(0.005)  # the benchmark's own progress check


def load_payloads(
    events: int, rate: float = 20_000, flush_ms: int = 5, base_ms: int = 1_700_000_000_000, columnar: bool = True
) -> list[bytes]:
    """The messages ``sustained_load`` publishes for ``events`` events at ``rate`` (event times advancing with
    the flushes): ``EventColumns``, or with ``columnar=False`` the same events as ``EventBatch`` messages."""
    encode = encode_event_columns if columnar else encode_event_batch
    payloads, i, published, t = [], 0, 0, base_ms
    per_message = int(rate * flush_ms / 1000)
    while published < events:
        message: list[Event] = []
        while len(message) < per_message:
            message += request_events(i, t)
            i += 1
        published += len(message)
        payloads.append(encode(message))
        t += flush_ms
    return payloads


def join_cpu(events: int, repeats: int = 3, *, columnar: bool = True, **settings) -> float:
    """CPU µs per event of the joiner's work on one message per step (decode, join, stage, commit), in-process.

    The messages are ``load_payloads``: ``EventColumns`` on ``events.columns.0``, or with ``columnar=False``
    ``EventBatch`` on ``events.batch.0``. ``settings`` override ``JoinerConfig`` fields. The garbage collector
    is tuned as ``run_service`` tunes it in the service process.
    """
    payloads = load_payloads(events, columnar=columnar)
    subject = "events.columns.0" if columnar else "events.batch.0"
    settings = dict(window_s=1.0, allowed_lateness_s=0.1, idle_timeout_s=0.5) | settings
    thresholds = gc.get_threshold()
    gc.set_threshold(50_000, 50, 100)
    best = float("inf")
    try:
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                part = PartitionJoin(0, JoinerConfig(state_dir=tmp, **settings))
                n = 0
                start = time.process_time()
                for data in payloads:
                    columns, _ = message_events(subject, data)
                    n += len(columns)
                    produced = [part.join_events(columns), part.join.advance(bus.now_ms())]
                    for seq, _, _ in part.stage(JoinedColumns.concat(produced)):
                        part.join.output_delivered(seq)  # as the delivery worker does once JetStream acknowledged
                best = min(best, time.process_time() - start)
                part.join.close()
            gc.collect()
    finally:
        gc.set_threshold(*thresholds)
    return best / n * 1e6


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (None where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_joiner(server_url: str, state_dir: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "FRESHET_NATS_URL": server_url,
        "FRESHET_JOINER_STATE_DIR": state_dir,
        "FRESHET_JOIN_WINDOW_S": "1.0",
        "FRESHET_JOIN_ALLOWED_LATENESS_S": "0.1",
        "FRESHET_JOIN_IDLE_TIMEOUT_S": "0.5",
        "FRESHET_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen([sys.executable, "-m", "services.joiner"], env=env)


def stop_joiner(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)


async def latency_at(server_url: str, tmp: str, rate: float, seconds: float) -> dict:
    """A fresh joiner, caught up, under ``rate`` events/s for ``seconds``: click -> sample latency."""
    nc = await nats.connect(server_url)
    js = nc.jetstream()
    counter = SampleCounter()
    await nc.subscribe("samples.>", cb=counter.on_msg)
    proc = start_joiner(server_url, os.path.join(tmp, f"state-live-{rate:.0f}"))
    first = int(rate) * 10**4  # request ids of this run only
    try:
        await publish_backlog(js, 10, bus.now_ms(), batched=True, first=first)  # warm-up: joiner up
        await counter.wait_for(1, timeout_s=60)
        cpu_before = process_cpu_s(proc.pid)
        load = await sustained_load(js, counter, rate, seconds, first=first + 100)
        cpu_after = process_cpu_s(proc.pid)
        deadline = time.monotonic() + 30
        while counter.watch and time.monotonic() < deadline:  # noqa: ASYNC110 - polling the last clicks
            await asyncio.sleep(0.01)
    finally:
        stop_joiner(proc)
        await nc.close()
    lat = np.array(counter.latencies_ms)
    return {
        "target_events_per_s": rate,
        **load,
        "latency_samples": len(lat),
        "latency_missing": len(counter.watch),
        "join_latency_p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "join_latency_p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "joiner_cpu_us_per_event": (
            (cpu_after - cpu_before) / load["load_events"] * 1e6 if cpu_before is not None else None
        ),
    }


async def run(requests: int, single_requests: int, rates: list[float], seconds: float, cpu_events: int) -> dict:
    cpu = {
        "join_cpu_events": cpu_events,
        "join_cpu_us_per_event": join_cpu(cpu_events),
        # Steady state within the run: windows forgotten after 2 s, so forgetting, freeing slots and
        # segment clean-up all happen.
        "join_cpu_us_per_event_steady": join_cpu(cpu_events, retention_s=2.0),
        # What a client publishing row-form EventBatch messages (columnar=False) costs the joiner.
        "join_cpu_us_per_event_rows": join_cpu(cpu_events, columnar=False),
    }
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(store_dir=os.path.join(tmp, "js")) as server:
        single = await drain(server.url, tmp, batched=False, requests=single_requests)
        batched = await drain(server.url, tmp, batched=True, requests=requests)
        runs = [await latency_at(server.url, tmp, rate, seconds) for rate in rates]
    target = next((r for r in runs if r["target_events_per_s"] >= 20_000), runs[-1])
    return {
        "events": batched["events"],
        "events_per_s": batched["events_per_s"],
        "single_event_messages_per_s": single["events_per_s"],
        "join_latency_p50_ms": target["join_latency_p50_ms"],
        "join_latency_p99_ms": target["join_latency_p99_ms"],
        "joiner_cpu_us_per_event": target["joiner_cpu_us_per_event"],
        **cpu,
        "latency_runs": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60_000, help="backlog requests (5 impressions each)")
    parser.add_argument("--single-requests", type=int, default=4_000, help="backlog with one event per message")
    parser.add_argument(
        "--rates", default="5000,10000,15000,20000", help="events/s of the latency runs, comma separated"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each latency run")
    parser.add_argument("--cpu-events", type=int, default=100_000, help="events of the in-process CPU measure")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    report = asyncio.run(run(args.requests, args.single_requests, rates, args.seconds, args.cpu_events))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "joiner.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "| measure | value | target |",
        "|---|---|---|",
        f"| events/s, one joiner, backlog of {report['events']:,} events in EventColumns messages"
        f" | {report['events_per_s']:,.0f} | ≥ 20,000 |",
        f"| events/s, same with one event per message | {report['single_event_messages_per_s']:,.0f} | |",
        f"| CPU µs per event of the join in-process (decode, join, stage, commit) | "
        f"{report['join_cpu_us_per_event']:.1f} | |",
        f"| same, steady state (2 s retention) | {report['join_cpu_us_per_event_steady']:.1f} | |",
        f"| same, EventBatch (row-form) messages | {report['join_cpu_us_per_event_rows']:.1f} | |",
    ]
    for r in report["latency_runs"]:
        p50, p99, cpu = r["join_latency_p50_ms"], r["join_latency_p99_ms"], r["joiner_cpu_us_per_event"]
        lines.append(
            f"| join latency p50 / p99 at {r['sustained_events_per_s']:,.0f} events/s sustained"
            f" (clicks lost: {r['latency_missing']}) | {p50:.1f} / {p99:.1f} ms | p99 ≤ 50 ms at 20,000 |"
        )
        if cpu is not None:
            lines.append(
                f"| joiner process CPU µs per event at {r['sustained_events_per_s']:,.0f} events/s"
                f" (share of a core) | {cpu:.1f} ({cpu * r['sustained_events_per_s'] / 1e4:.0f} %) | |"
            )
    table = "\n".join(lines)
    (RESULTS / "joiner.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
