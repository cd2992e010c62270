"""Serving benchmark: ``make bench-serve`` -> bench/results/serve.json + a markdown table.

Every service runs as its own process on an embedded nats-server (one store shard with a data dir,
trainer, joiner, publisher, validator, predictor, all with their default settings unless
``--env NAME=VALUE`` overrides one), while a load generator process publishes synthetic traffic
(``freshet.synthetic``: requests of impressions, clicks after a delay) as ``EventBatch`` messages at
``--rate`` events/s (default 2,000) for the whole run.

- ``freshness_p50_ms`` / ``freshness_p99_ms``: ``--probes`` times, an impression of a never-seen
  user and item is published, then a click on it; the time from publishing the click to the first
  Predict answer in which that item's score differs from the score of another never-seen item for
  the same user, in the same answer (same version, so only the clicked item's row can make them
  differ; its row exists only once the click's sample is trained, exported, approved and applied).
  The predictor is polled every ``--poll-ms``; probes start after a random pause (0-200 ms), so they
  fall at random points of the publisher's interval.
- ``predict_p50_ms`` / ``predict_p99_ms``: ``--predict-rate`` Predict requests/s (default 200),
  open loop, each with ``--candidates`` items (default 500) drawn from the synthetic catalogue,
  for ``--predict-seconds``, while the background load keeps deltas coming; latency as the client
  sees it (gRPC included). ``versions_seen`` counts the distinct model versions answered.
- ``cpu_s``: CPU seconds each process used during the run, to show where the 2 cores went.

Priorities: on a small shared host the training side (store, trainer, joiner, publisher, validator)
and the load generator run at niceness ``--nice`` (default 10) while the predictor keeps the normal
priority, as an operator co-locating serving with training would run them: a Predict then does not
wait behind a training step for a core. ``--nice 0`` runs everything at equal priority (on 2 cores the
Predict tail then grows several-fold; the freshness hardly changes). The JSON records the setting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from train_bench import Services, cpu_seconds, machine_jiffies, nats_pid, niced, progress, start_store

from freshet import bus
from freshet.clients import PredictorClient
from freshet.config import BusConfig
from freshet.delta import decode_delta
from freshet.demo import wait_serving
from freshet.eventlog import EventPublisher
from freshet.events.v1 import events_pb2
from freshet.fids import SLOT_ITEM, int_fids
from freshet.model.v1 import model_pb2
from freshet.models import ModelConfig
from freshet.natsserver import EmbeddedNats, free_port
from freshet.samples.v1 import samples_pb2
from freshet.synthetic import SyntheticConfig, SyntheticSource

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "fm"
PROBE_USER_BASE = 2_000_000_000  # ids far above the synthetic source's users and items
PROBE_ITEM_BASE = 3_000_000_000


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# -- the background load (a child process running this file with --load) -----------------------------


async def generate_load(nats_url: str, rate: float, seed: int) -> None:
    """Publishes synthetic requests at ``rate`` events/s until killed, flushing batches every 10 ms."""
    nc = await bus.connect(BusConfig(nats_url=nats_url), "freshet-serve-bench-load")
    js = nc.jetstream()
    source = SyntheticSource(SyntheticConfig(seed=seed))
    publisher = EventPublisher(js, 1, f"load-{seed}-{time.time_ns()}")
    pending: list[tuple[float, events_pb2.Action]] = []  # (due monotonic time, click), in due order
    start = time.monotonic()
    events = 0
    while True:
        now = time.monotonic()
        due = int((now - start) * rate)
        while events < due:
            while pending and pending[0][0] <= now:
                await publisher.add(pending.pop(0)[1])
                events += 1
            request = source.next_request(bus.now_ms())
            for impression in request.impressions:
                await publisher.add(impression)
            events += len(request.impressions)
            pending.extend((now + delay_ms / 1000.0, action) for delay_ms, action in request.clicks)
            pending.sort(key=lambda entry: entry[0])
        await publisher.flush()
        await asyncio.sleep(0.01)


# -- where a probe's time goes --------------------------------------------------------------------------


class StageClock:
    """When each watched probe passed each stage, seen by core subscriptions on the pipeline's subjects.

    Stages: ``sample`` (its sample is in the SAMPLES stream: the joiner's part), ``delta`` (a delta with
    its item's row is published: trainer, store and publisher), ``decision`` (that delta is approved:
    validator); the rest of the freshness is the predictor fetching and applying it.
    """

    def __init__(self) -> None:
        self.sample_ids: dict[str, int] = {}  # sample id -> probe
        self.item_fids: dict[int, int] = {}  # the probe item's fid -> probe
        self.delta_probes: dict[tuple[int, int], list[int]] = {}  # (shard, sequence) -> probes in it
        self.at: dict[int, dict[str, float]] = {}  # probe -> stage -> monotonic time

    def watch(self, probe: int, request_id: str, item: int) -> None:
        self.sample_ids[f"{request_id}:{item}:v1"] = probe
        self.item_fids[int(int_fids(SLOT_ITEM, np.array([item]))[0])] = probe
        self.at[probe] = {}

    def _mark(self, probe: int, stage: str, when: float) -> None:
        self.at[probe].setdefault(stage, when)

    async def on_sample(self, msg) -> None:
        when = time.monotonic()
        for sample_id in samples_pb2.SampleBatch.FromString(msg.data).sample_ids:
            if (probe := self.sample_ids.get(sample_id)) is not None:
                self._mark(probe, "sample", when)

    async def on_delta(self, msg) -> None:
        when = time.monotonic()
        delta = decode_delta(msg.data)
        probes = [self.item_fids[f] for f in delta.fids.tolist() if f in self.item_fids]
        for probe in probes:
            self._mark(probe, "delta", when)
        if probes:
            self.delta_probes[(delta.shard, delta.sequence)] = probes

    async def on_decision(self, msg) -> None:
        when = time.monotonic()
        approval = model_pb2.Approval.FromString(msg.data)
        for probe in self.delta_probes.get((approval.shard, approval.sequence), []):
            self._mark(probe, "decision", when)

    def breakdown(self, sent: dict[int, float], visible: dict[int, float]) -> dict[str, float]:
        """Median milliseconds of each stage over the probes that passed every stage."""
        parts: dict[str, list[float]] = {
            "joiner": [],
            "trainer_store_publisher": [],
            "validator": [],
            "predictor": [],
        }
        for probe, seen in visible.items():
            at = self.at.get(probe, {})
            if {"sample", "delta", "decision"} <= at.keys():
                parts["joiner"].append(at["sample"] - sent[probe])
                parts["trainer_store_publisher"].append(at["delta"] - at["sample"])
                parts["validator"].append(at["decision"] - at["delta"])
                parts["predictor"].append(seen - at["decision"])
        return {name: round(1000 * float(np.median(v)), 1) if v else None for name, v in parts.items()}


# -- the measurements -----------------------------------------------------------------------------------


async def probe_freshness(
    publisher: EventPublisher,
    predictor: PredictorClient,
    clock: StageClock,
    k: int,
    poll_s: float,
    timeout_s: float,
) -> tuple[float, float] | None:
    """When probe ``k``'s click was published and when the predictor reflected it; None on timeout."""
    user, item, other = PROBE_USER_BASE + k, PROBE_ITEM_BASE + 2 * k, PROBE_ITEM_BASE + 2 * k + 1
    request_id = f"probe-{k}-{time.time_ns()}"
    clock.watch(k, request_id, item)
    now_ms = bus.now_ms()
    await publisher.add(
        events_pb2.Impression(request_id=request_id, user_id=user, item_id=item, position=0, event_time_ms=now_ms)
    )
    await publisher.flush()
    sent = time.monotonic()
    await publisher.add(
        events_pb2.Action(
            request_id=request_id,
            item_id=item,
            type=events_pb2.ACTION_TYPE_CLICK,
            value=1.0,
            event_time_ms=now_ms + 1,
        )
    )
    await publisher.flush()
    candidates = np.array([item, other], np.int64)
    while time.monotonic() - sent < timeout_s:
        scores, _ = await predictor.predict(MODEL, user, candidates, 0)
        if scores[0] != scores[1]:
            return sent, time.monotonic()
        await asyncio.sleep(poll_s)
    return None


async def measure_predict(
    predictor: PredictorClient, rate: float, seconds: float, candidates: int, n_items: int, seed: int
) -> tuple[list[float], set[int], int]:
    """Open-loop Predict at ``rate``/s for ``seconds``: latencies (ms), versions answered, errors."""
    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    versions: set[int] = set()
    errors = 0

    async def one(user: int, items: np.ndarray) -> None:
        nonlocal errors
        start = time.monotonic()
        try:
            _, version = await predictor.predict(MODEL, user, items, 0)
        except Exception:  # noqa: BLE001 - counted and reported, the benchmark goes on
            errors += 1
            return
        latencies.append((time.monotonic() - start) * 1000.0)
        versions.add(version)

    tasks = []
    start = time.monotonic()
    total = int(rate * seconds)
    for i in range(total):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        items = rng.integers(0, n_items, candidates, dtype=np.int64)
        tasks.append(asyncio.create_task(one(int(rng.integers(0, 10_000)), items)))
    await asyncio.gather(*tasks)
    return latencies, versions, errors


def check(services: Services, load: subprocess.Popen | None) -> None:
    """Raises when a service or the load generator has exited."""
    services.check()
    if load is not None and load.poll() is not None:
        raise RuntimeError(f"the load generator exited with {load.returncode}")


def start_services(
    services: Services, store: str, extra_env: dict[str, str], work: Path, predictor_port: int
) -> None:
    common = {"FRESHET_STORE_ADDRESS": store, "FRESHET_MODEL": MODEL, **extra_env}
    services.start("trainer", "services.trainer", common)
    services.start("joiner", "services.joiner", {"FRESHET_JOINER_STATE_DIR": str(work / "joiner-state"), **common})
    services.start("publisher", "services.publisher", common)
    services.start("validator", "services.validator", common)
    services.start("predictor", "services.predictor", {"FRESHET_PREDICTOR_PORT": str(predictor_port), **common})


async def run(args: argparse.Namespace, extra_env: dict[str, str]) -> dict:
    with (
        tempfile.TemporaryDirectory(prefix="freshet-serve-bench-") as tmp,
        EmbeddedNats(store_dir=os.path.join(tmp, "js")) as server,
    ):
        work = Path(tmp)
        nc = await bus.connect(BusConfig(nats_url=server.url), "freshet-serve-bench")
        js = nc.jetstream()
        await bus.declare_streams(js)
        background = ("store", "trainer", "joiner", "publisher", "validator")
        services = Services(server.url, str(work / "logs"), extra_env, {name: args.nice for name in background})
        load = None
        try:
            store = start_store(services, "store", ModelConfig())
            predictor_port = free_port()
            start_services(services, store, extra_env, work, predictor_port)
            await wait_serving(store)
            await wait_serving(f"127.0.0.1:{predictor_port}", timeout_s=60)
            progress("services up; starting the background load")
            load = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once
                [
                    *niced(args.nice),
                    sys.executable,
                    __file__,
                    "--load",
                    server.url,
                    "--rate",
                    str(args.rate),
                    "--seed",
                    str(args.seed),
                ]
            )
            pids = {name: proc.pid for name, proc in services.procs.items()}
            pids.update(nats=nats_pid(server), load=load.pid)
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            jiffies_before = machine_jiffies()
            async with PredictorClient(f"127.0.0.1:{predictor_port}") as predictor:
                deadline = time.monotonic() + 120
                while (await predictor.predict(MODEL, 1, np.array([1]), 0))[1] == 0:
                    check(services, load)
                    if time.monotonic() > deadline:
                        raise RuntimeError("the predictor served no model version within 120 s")
                    await asyncio.sleep(0.1)
                progress(f"serving; warming up {args.warmup_s:.0f} s")
                await asyncio.sleep(args.warmup_s)
                probe_publisher = EventPublisher(js, 1, f"probe-{time.time_ns()}")
                clock = StageClock()
                watching = [
                    await nc.subscribe(subject, cb=handler)
                    for subject, handler in (
                        ("samples.>", clock.on_sample),
                        (f"model.{MODEL}.delta.*", clock.on_delta),
                        (f"model.{MODEL}.decision", clock.on_decision),
                    )
                ]
                freshness: list[float] = []
                sent: dict[int, float] = {}
                visible: dict[int, float] = {}
                timeouts = 0
                gaps = np.random.default_rng(args.seed).uniform(0.0, 0.2, args.probes)
                for k in range(args.probes):
                    check(services, load)
                    # A random pause: back-to-back probes would start just after the publisher's last
                    # export and so always wait a whole publish interval.
                    await asyncio.sleep(gaps[k])
                    result = await probe_freshness(
                        probe_publisher, predictor, clock, k, args.poll_ms / 1000.0, args.probe_timeout_s
                    )
                    if result is None:
                        timeouts += 1
                    else:
                        sent[k], visible[k] = result
                        freshness.append(1000.0 * (result[1] - result[0]))
                    if (k + 1) % 10 == 0:
                        progress(
                            f"probe {k + 1}/{args.probes}: freshness p50 {percentile(freshness, 50):.0f} ms,"
                            f" p99 {percentile(freshness, 99):.0f} ms, timeouts {timeouts}"
                        )
                for sub in watching:  # decoding every delta here would delay the Predict client's own timing
                    await sub.unsubscribe()
                progress(
                    f"Predict: {args.candidates} candidates at {args.predict_rate:.0f}/s for {args.predict_seconds} s"
                )
                latencies, versions, errors = await measure_predict(
                    predictor,
                    args.predict_rate,
                    args.predict_seconds,
                    args.candidates,
                    SyntheticConfig().n_items,
                    args.seed,
                )
                check(services, load)
            cpu = {name: round(cpu_seconds(pid) - cpu_before[name], 2) for name, pid in pids.items()}
            busy, total = (a - b for a, b in zip(machine_jiffies(), jiffies_before, strict=True))
        finally:
            if load is not None:
                load.kill()
                load.wait()
            services.stop()
            await nc.close()
    return {
        "freshness_p50_ms": round(percentile(freshness, 50), 1),
        "freshness_p99_ms": round(percentile(freshness, 99), 1),
        "freshness_max_ms": round(max(freshness), 1) if freshness else None,
        "freshness_probes": len(freshness),
        "freshness_timeouts": timeouts,
        "freshness_median_stage_ms": clock.breakdown(sent, visible),
        "predict_p50_ms": round(percentile(latencies, 50), 2),
        "predict_p99_ms": round(percentile(latencies, 99), 2),
        "predict_requests": len(latencies),
        "predict_errors": errors,
        "versions_seen": len(versions),
        "background_events_per_s": args.rate,
        "candidates": args.candidates,
        "predict_rate": args.predict_rate,
        "cpu_s": cpu,
        "machine_busy": round(busy / max(total, 1), 3),
        "env": extra_env,
        "training_side_niceness": args.nice,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def table(result: dict) -> str:
    rows = [
        ("freshness p50 (ms)", result["freshness_p50_ms"], "≤ 100"),
        ("freshness p99 (ms)", result["freshness_p99_ms"], "≤ 500"),
        ("freshness probes / timeouts", f"{result['freshness_probes']} / {result['freshness_timeouts']}", ""),
        (f"predict p50 (ms), {result['candidates']} candidates", result["predict_p50_ms"], ""),
        (f"predict p99 (ms), {result['candidates']} candidates", result["predict_p99_ms"], "≤ 10"),
        ("predict requests / errors", f"{result['predict_requests']} / {result['predict_errors']}", ""),
        ("model versions answered during Predict", result["versions_seen"], "> 1"),
        ("background load (events/s)", result["background_events_per_s"], "≥ 2,000"),
        ("niceness of the training side and load", result["training_side_niceness"], ""),
    ]
    lines = ["| measure | result | target |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    stages = ", ".join(f"{name} {ms}" for name, ms in result["freshness_median_stage_ms"].items())
    cpu = ", ".join(f"{name} {secs:.1f}" for name, secs in result["cpu_s"].items())
    return "\n".join(lines) + (
        f"\n\nMedian ms per stage of a probe: {stages}.\n"
        f"CPU seconds during the run: {cpu}; machine busy {result['machine_busy']:.0%}.\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", metavar="NATS_URL", help=argparse.SUPPRESS)  # internal: be the load generator
    parser.add_argument("--rate", type=float, default=2000.0, help="background events/s")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--poll-ms", type=float, default=2.0)
    parser.add_argument("--probe-timeout-s", type=float, default=10.0)
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--predict-rate", type=float, default=200.0)
    parser.add_argument("--predict-seconds", type=float, default=20.0)
    parser.add_argument(
        "--nice",
        type=int,
        default=10,
        help="niceness of the training side (store, trainer, joiner, publisher, validator) and the load generator;"
        " the predictor, nats-server and this process keep theirs (0: all equal)",
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="setting for every service"
    )
    args = parser.parse_args()
    if args.load:
        asyncio.run(generate_load(args.load, args.rate, args.seed))
        return 0
    extra_env = dict(item.split("=", 1) for item in args.env)
    result = asyncio.run(run(args, extra_env))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = table(result)
    (RESULTS / "serve.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
