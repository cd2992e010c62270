"""``freshet demo``: the whole pipeline as separate processes, fed by the synthetic source.

Starts an embedded nats-server (unless ``NATS_URL`` is set), the six services as child
processes, then publishes synthetic impressions and clicks like a real client would. Each
request is first scored by the predictor, so the live AUC is that of the *served* model on
traffic it has not been trained on yet. Prints progress every few seconds and a summary at
the end, stops every process with SIGTERM and exits 0 when every service stopped cleanly.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.js.errors import NotFoundError

from freshet import bus
from freshet.batches import SampleReader
from freshet.clients import PredictorClient
from freshet.config import BusConfig
from freshet.metrics import auc
from freshet.model.v1 import model_pb2
from freshet.natsserver import EmbeddedNats, free_port
from freshet.synthetic import SyntheticConfig, SyntheticSource

logger = logging.getLogger(__name__)

SERVICES = ("store", "predictor", "validator", "publisher", "trainer", "joiner")
STORE_SHARDS = 2


@dataclass
class DemoStats:
    """What the demo observed, for the progress lines and the summary."""

    requests: int = 0
    impressions: int = 0
    clicks: int = 0
    predict_errors: int = 0
    served_version: int = 0
    scores: deque = field(default_factory=lambda: deque(maxlen=5000))
    labels: deque = field(default_factory=lambda: deque(maxlen=5000))
    first_auc: float | None = None

    def live_auc(self) -> float | None:
        return auc(np.array(self.scores), np.array(self.labels))


class Processes:
    """The service child processes, each logging JSON to its own file."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self._files: list = []

    def start(self, name: str, service: str | None = None, **env: str) -> None:
        """Starts ``services.<service>`` (default: ``name``) with extra environment variables."""
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self._files.append(log)
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{service or name}"],
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def crashed(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is not None]

    def stop(self, grace_s: float = 5.0) -> dict[str, tuple[int, float]]:
        """SIGTERM in reverse start order; returns {name: (exit code, seconds to exit)}."""
        result = {}
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            start = time.monotonic()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            result[name] = (proc.returncode, time.monotonic() - start)
        for f in self._files:
            f.close()
        return result


async def wait_serving(address: str, timeout_s: float = 30.0) -> None:
    """Waits until a gRPC server's health check says SERVING (a predictor says NOT_SERVING while it catches up)."""
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            left = max(0.1, deadline - time.monotonic())
            resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=left, wait_for_ready=True)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{address} is not serving after {timeout_s} s: {resp.status}")
            await asyncio.sleep(0.05)


async def feed(
    js, predictor: PredictorClient, source: SyntheticSource, seconds: float, rate: float, stats: DemoStats
) -> None:
    """Publishes ``rate`` requests/s for ``seconds``: impressions now, clicks after their delay."""
    clicks: list[tuple[float, int, object]] = []  # (due monotonic time, tie-breaker, Action)
    start = time.monotonic()
    last_progress = start
    last_events = 0
    n = 0
    while (now := time.monotonic()) - start < seconds:
        while clicks and clicks[0][0] <= now:
            _, _, action = heapq.heappop(clicks)
            await bus.publish(
                js,
                "events.actions.0",
                action.SerializeToString(),
                msg_id=f"a:{action.request_id}:{action.item_id}",
            )
            stats.clicks += 1
        req = source.next_request(bus.now_ms())
        try:
            # Each impression is scored at the position it is shown at, as the trainer sees it.
            answers = await asyncio.gather(
                *(
                    predictor.predict("fm", req.user_id, np.array([imp.item_id]), imp.position, dict(imp.context))
                    for imp in req.impressions
                )
            )
            versions = {version for _, version in answers}
            stats.served_version = max(versions)
            if min(versions) > 0:
                stats.scores.extend(float(scores[0]) for scores, _ in answers)
                stats.labels.extend(float(c) for c in req.clicked)
        except grpc.aio.AioRpcError:
            stats.predict_errors += 1
        for imp in req.impressions:
            await bus.publish(
                js, "events.impressions.0", imp.SerializeToString(), msg_id=f"i:{imp.request_id}:{imp.item_id}"
            )
        for delay_ms, action in req.clicks:
            n += 1
            heapq.heappush(clicks, (now + delay_ms / 1000.0, n, action))
        stats.requests += 1
        stats.impressions += len(req.impressions)
        if now - last_progress >= 5.0:
            events = stats.impressions + stats.clicks
            live = stats.live_auc()
            if stats.first_auc is None and live is not None and len(stats.labels) >= 2000:
                stats.first_auc = live
            print(
                f"[{now - start:5.1f}s] events/s {(events - last_events) / (now - last_progress):7.1f}"
                f" | impressions {stats.impressions:7d} clicks {stats.clicks:5d}"
                f" | served version {stats.served_version:5d}"
                f" | live AUC {'   n/a' if live is None else f'{live:.4f}'}",
                flush=True,
            )
            last_progress, last_events = now, events
        await asyncio.sleep(max(0.0, start + stats.requests / rate - time.monotonic()))


async def pipeline_counts(js) -> dict[str, int]:
    """Counts read back from JetStream: samples joined and trained, deltas, approvals."""
    try:  # trained first: windows still closing keep adding samples while this counts
        dense = model_pb2.DenseSnapshot.FromString((await js.get_last_msg(bus.DENSE.name, "dense.fm")).data)
        trained = dense.samples_trained
    except NotFoundError:
        trained = 0
    joined = SampleReader(js, bus.SAMPLES.name)  # a sample message holds many samples
    await joined.read()
    model = await js.stream_info(bus.MODEL.name, subjects_filter="model.>")
    subjects = model.state.subjects or {}
    dead = await js.stream_info(bus.DEADLETTER.name)
    return {
        "samples_joined": len(joined.ids),
        "samples_trained": trained,
        "deltas_published": sum(n for subject, n in subjects.items() if subject.startswith("model.fm.delta.")),
        "decisions": subjects.get("model.fm.decision", 0),
        "dead_lettered": dead.state.messages,
    }


async def run_demo(seconds: float, rate: float, seed: int, workdir: Path) -> int:
    """Runs the demo; returns the process exit code."""
    log_dir = workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        nats_url = os.environ.get("NATS_URL")
        if not nats_url:
            server = stack.enter_context(EmbeddedNats(store_dir=str(workdir / "jetstream")))
            nats_url = server.url
            print(f"embedded nats-server with JetStream on {nats_url}")
        else:
            print(f"using NATS at {nats_url}")
        store_ports = [free_port() for _ in range(STORE_SHARDS)]
        predictor_port = free_port()
        env = {
            **os.environ,
            "FRESHET_NATS_URL": nats_url,
            "FRESHET_STORE_ADDRESS": ",".join(f"127.0.0.1:{p}" for p in store_ports),
            "FRESHET_STORE_NUM_SHARDS": str(STORE_SHARDS),
            "FRESHET_PREDICTOR_PORT": str(predictor_port),
            "FRESHET_JOIN_WINDOW_S": os.environ.get("FRESHET_JOIN_WINDOW_S", "2.0"),
            "FRESHET_JOINER_STATE_DIR": str(workdir / "joiner"),
        }
        procs = Processes(log_dir, env)
        exit_code = 1
        try:
            for shard, port in enumerate(store_ports):
                procs.start(
                    f"store-{shard}",
                    "store",
                    FRESHET_STORE_SHARD=str(shard),
                    FRESHET_STORE_PORT=str(port),
                    FRESHET_STORE_DATA_DIR=str(workdir / "store" / f"shard-{shard}"),
                )
            for name in SERVICES[1:]:
                procs.start(name)
            print(f"started {STORE_SHARDS} store shards, {', '.join(SERVICES[1:])} (logs in {log_dir})")
            async with AsyncExitStack() as astack:
                for port in store_ports:
                    await wait_serving(f"127.0.0.1:{port}")
                await wait_serving(f"127.0.0.1:{predictor_port}")
                nc = await bus.connect(BusConfig(nats_url=nats_url), "freshet-demo")
                astack.push_async_callback(nc.close)
                js = nc.jetstream()
                await bus.declare_streams(js)
                predictor = await astack.enter_async_context(PredictorClient(f"127.0.0.1:{predictor_port}"))
                stats = DemoStats()
                source = SyntheticSource(SyntheticConfig(seed=seed))
                print(f"feeding synthetic traffic for {seconds:.0f}s at {rate:.0f} requests/s")
                await feed(js, predictor, source, seconds, rate, stats)
                if crashed := procs.crashed():
                    print(f"services exited during the demo: {crashed}; see their logs")
                await asyncio.sleep(1.5)  # let in-flight samples and deltas land before counting
                counts = await pipeline_counts(js)
            stopped = procs.stop()
            exit_code = print_summary(stats, counts, stopped, log_dir)
        finally:
            procs.stop()
        return exit_code


def print_summary(
    stats: DemoStats, counts: dict[str, int], stopped: dict[str, tuple[int, float]], log_dir: Path
) -> int:
    live = stats.live_auc()
    print("\n=== freshet demo summary ===")
    rows = [
        ("requests", stats.requests),
        ("impressions published", stats.impressions),
        ("clicks published", stats.clicks),
        ("observed CTR", f"{stats.clicks / max(stats.impressions, 1):.2%}"),
        *counts.items(),
        ("served model version", stats.served_version),
        ("live AUC, first 2k scored", "n/a" if stats.first_auc is None else f"{stats.first_auc:.4f}"),
        ("live AUC, last 5k scored", "n/a" if live is None else f"{live:.4f}"),
        ("predict errors", stats.predict_errors),
    ]
    for key, value in rows:
        print(f"  {key:28s} {value}")
    print("  shutdown (exit code, seconds):")
    bad = []
    for name, (code, secs) in stopped.items():
        print(f"    {name:10s} {code:4d} {secs:5.2f}s")
        if code != 0 or secs > 5.0:
            bad.append(name)
    if bad:
        print(f"services that did not stop cleanly: {bad} (logs in {log_dir})")
        return 1
    if counts["samples_trained"] == 0 or stats.served_version == 0:
        print("the pipeline did not train or serve anything; see the logs")
        return 1
    return 0
