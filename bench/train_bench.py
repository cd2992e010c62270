"""Training benchmark: ``make bench-train`` -> bench/results/train.json + a markdown table.

Measures, in one run on this machine, on the same samples (``--requests`` requests of 5 impressions,
a click on 1 in 4, the joiner benchmark's ``request_events``; default model ``ModelConfig()`` or
``--model-config``; ``FRESHET_TRAIN_BATCH`` samples per step):

- ``pipeline_samples_per_s``: the events are published first as a backlog of ``EventBatch`` messages
  (then one impression 10 s later in event time, so that the watermark closes every window); then a
  store shard (``FRESHET_STORE_DATA_DIR`` set, so the trainer's default exactly-once checkpoints run)
  and a trainer are started as processes and, once the trainer's consumer exists, a joiner process.
  Samples divided by the time from the joiner's consumer appearing to the trainer having acknowledged
  the last sample message (it acks after the step's push): joined, trained and pushed to the store.
  ``joiner_samples_per_s`` is the part until the last sample was in the SAMPLES stream,
  ``trainer_tail_s`` what the trainer needed after that.
- ``trainer_only_samples_per_s``: a fresh store shard and a trainer on a new durable consumer
  (``FRESHET_TRAINER_START=first``) train the same samples, already in the SAMPLES stream.
- ``static_torch_samples_per_s``: the same model in this process on ``freshet.models.StaticEmbeddings``
  (``nn.EmbeddingBag``, sparse gradients, ``fid % 2**20`` rows) + ``CtrModel`` + ``freshet.models.loss``:
  sparse Adagrad on the bags as the store's (lr ``FRESHET_STORE_LR``, initial accumulator 0.1), dense
  Adagrad as the trainer's, same batch size, samples featurised beforehand by the joiner's function
  (``batch_example_fids``), not counting that. The best of runs before and after the services, with 1
  torch thread and with torch's default. ``ratio`` = pipeline / static.
- The services keep their own thread settings, as deployed (the trainer's ``FRESHET_TORCH_THREADS``, default 1);
  ``--service-threads N`` sets their
  ``OMP_NUM_THREADS``.
- ``cpu_s``: CPU seconds each process used during each timed run (``/proc``), and how busy the
  machine was (other work on it included), to show where the pipeline's time goes.
- ``*_cpu_budget``: the same as CPU microseconds per sample per service process (NATS included), their total
  against the static run's, and ``cpu_bound_samples_per_s``, the rate that work would reach with every core
  busy: the ratio the machine's CPU allows at best, whatever the hand-offs between the processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
import numpy as np
import torch
from joiner_bench import SampleCounter, consumer_exists, publish_backlog, request_events

from freshet import bus
from freshet.eventlog import EventPublisher
from freshet.events.v1 import events_pb2
from freshet.fids import batch_example_fids
from freshet.model.v1 import model_pb2
from freshet.models import CtrModel, ModelConfig, StaticEmbeddings, loss
from freshet.natsserver import EmbeddedNats, free_port
from services.store.config import StoreConfig
from services.store.optimizers import AdagradConfig
from services.trainer.config import TrainerConfig

RESULTS = Path(__file__).resolve().parent / "results"
BASE_MS_AGO = 600_000  # the backlog's event times start 10 minutes ago, 1 ms per request
FLUSH_AHEAD_MS = 10_000  # event time of the flush impression after the backlog's last request
STATIC_ROWS = 1 << 20
MODEL = "fm"  # FRESHET_MODEL: the subject dense.<model>
_T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f} s] {message}", file=sys.stderr, flush=True)


# -- the samples, featurised in process ---------------------------------------------------------------


def static_samples(requests: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The samples the joiner makes of ``request_events``: (fids int64 [T], lengths int32 [B], labels float32 [B, 4]).

    One sample per impression, in request order; clicked (label 1) when the request has a click on its item.
    """
    users, items, positions, contexts, clicked = [], [], [], [], []
    for i in range(requests):
        events = request_events(i, i)
        clicks = {e.item_id for e in events if isinstance(e, events_pb2.Action)}
        for e in events:
            if isinstance(e, events_pb2.Impression):
                users.append(e.user_id)
                items.append(e.item_id)
                positions.append(e.position)
                contexts.append(tuple(sorted(e.context.items())))
                clicked.append(e.item_id in clicks)
    fids, lengths = batch_example_fids(
        np.array(users, np.int64), np.array(items, np.int64), np.array(positions, np.int64), contexts
    )
    labels = np.zeros((len(items), 4), np.float32)
    labels[:, 0] = clicked
    return fids, lengths, labels


def train_static(
    config: ModelConfig,
    fids: np.ndarray,
    lengths: np.ndarray,
    labels: np.ndarray,
    batch: int,
    max_seconds: float = float("inf"),
) -> dict:
    """One pass over the samples (or as many batches as fit in ``max_seconds``) with static EmbeddingBag
    tables; returns samples/s, samples trained, CPU microseconds per sample and their mean loss."""
    store, trainer = StoreConfig(), TrainerConfig(store_address="unused")
    sparse = StaticEmbeddings(config, num_rows=STATIC_ROWS, init_scale=store.init_scale, sparse=True)
    model = CtrModel(config, seed=trainer.seed)
    adagrad = AdagradConfig(learning_rate=store.learning_rate)
    sparse_opt = torch.optim.Adagrad(
        sparse.parameters(), lr=adagrad.learning_rate, initial_accumulator_value=adagrad.initial_accumulator,
        eps=adagrad.eps,
    )  # fmt: skip
    dense = [p for p in model.parameters() if p.requires_grad]
    dense_opt = torch.optim.Adagrad(dense, lr=trainer.dense_lr) if dense else None
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    weights = np.ones(len(lengths), np.float32)
    torch.sparse.check_sparse_tensor_invariants.disable()  # as torch's default; saying so silences its warning
    total_loss, hi, start, cpu_start = 0.0, 0, time.perf_counter(), time.process_time()
    for lo in range(0, len(lengths), batch):
        if time.perf_counter() - start > max_seconds:
            break
        hi = min(lo + batch, len(lengths))
        logits = model(sparse(fids[offsets[lo] : offsets[hi]], lengths[lo:hi]))
        batch_loss = loss(logits, labels[lo:hi], weights[lo:hi], config.tasks)
        sparse_opt.zero_grad()
        if dense_opt is not None:
            dense_opt.zero_grad()
        batch_loss.backward()
        sparse_opt.step()
        if dense_opt is not None:
            dense_opt.step()
        total_loss += float(batch_loss.detach())
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "samples_per_s": hi / elapsed,
        "samples": hi,
        "seconds": elapsed,
        "cpu_us_per_sample": cpu * 1e6 / hi,
        "mean_log_loss": total_loss / hi,
    }


# -- processes and what they used ---------------------------------------------------------------------


class Services:
    """The service processes of a run, each logging to ``<log_dir>/<name>.log``.

    ``check()`` raises, with the log's tail, when one has exited; ``stop()`` sends SIGTERM in reverse
    start order.
    """

    def __init__(
        self, server_url: str, log_dir: str, env: dict[str, str], nice: dict[str, int] | None = None
    ) -> None:
        self.server_url = server_url
        self.env = env
        self.nice = nice or {}  # service name -> niceness it runs at (all its threads)
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, module: str, env: dict[str, str]) -> subprocess.Popen:
        env = {
            **os.environ,
            "FRESHET_NATS_URL": self.server_url,
            "FRESHET_LOG_LEVEL": "WARNING",
            **self.env,
            **env,
        }
        with open(self.log_dir / f"{name}.log", "wb") as log:
            command = [*niced(self.nice.get(name, 0)), sys.executable, "-m", module]
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {self.log_tail(name)}")

    def log_tail(self, name: str) -> str:
        return " | ".join((self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:])

    def stop(self) -> None:
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        self.procs.clear()


def niced(niceness: int) -> list[str]:
    """A command prefix that starts a child at lower priority, all its threads included (``nice`` execs
    it, so the pid stays the child's); empty for 0."""
    return ["nice", "-n", str(niceness)] if niceness else []


def start_store(services: Services, name: str, config: ModelConfig) -> str:
    """A store shard with a RocksDB data dir (the trainer's exactly-once checkpoints need one); its address."""
    port = free_port()
    services.start(
        name,
        "services.store",
        {
            "FRESHET_STORE_PORT": str(port),
            "FRESHET_STORE_TABLES": ",".join(f"{table}:{width}" for table, width in config.tables().items()),
            "FRESHET_STORE_DATA_DIR": str(services.log_dir / f"{name}-data"),
        },
    )
    return f"127.0.0.1:{port}"


def start_trainer(services: Services, name: str, store: str, config: ModelConfig, batch: int) -> None:
    """A trainer on durable consumer ``name``, from the first sample in the stream."""
    services.start(
        name,
        "services.trainer",
        {
            "FRESHET_STORE_ADDRESS": store,
            "FRESHET_MODEL": MODEL,
            "FRESHET_MODEL_CONFIG": config.to_json(),
            "FRESHET_TRAIN_BATCH": str(batch),
            "FRESHET_DENSE_INTERVAL_S": "0.2",
            "FRESHET_TRAINER_DURABLE": name,
            "FRESHET_TRAINER_START": "first",
        },
    )


def start_joiner(services: Services) -> None:
    """A joiner with the joiner benchmark's settings (1 s window, RocksDB state), but a long idle timeout.

    With the default short one, a pause of the joiner's input longer than it (a slow fetch on a busy
    machine) counts as idleness and moves the watermark on by the pause; a backlog packs many requests
    into each millisecond of event time, so the impressions behind the pause then arrive late and are
    dropped, and the run never sees every sample.
    """
    services.start(
        "joiner",
        "services.joiner",
        {
            "FRESHET_JOINER_STATE_DIR": str(services.log_dir / "joiner-state"),
            "FRESHET_JOIN_WINDOW_S": "1.0",
            "FRESHET_JOIN_ALLOWED_LATENESS_S": "0.1",
            "FRESHET_JOIN_IDLE_TIMEOUT_S": "60",
        },
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux ``/proc``); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nats_pid(server: EmbeddedNats) -> int:
    return server._proc.pid  # EmbeddedNats keeps its child private; the benchmark only reads its CPU time


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return 0, 0
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class CpuMeter:
    """CPU seconds used by named processes (and this one) between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {**pids, "bench": os.getpid()}

    def start(self) -> None:
        self._wall = time.monotonic()
        self._cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._jiffies = machine_jiffies()

    def stop(self) -> dict:
        wall = time.monotonic() - self._wall
        used = {name: round(cpu_seconds(pid) - self._cpu[name], 2) for name, pid in self.pids.items()}
        busy, total = (b - a for a, b in zip(self._jiffies, machine_jiffies(), strict=True))
        return {"wall_s": round(wall, 2), "cpu_s": used, "machine_busy": round(busy / total, 3) if total else None}


# -- the runs -----------------------------------------------------------------------------------------


async def wait_until(check, services: Services, what: str, timeout_s: float = 600, poll_s: float = 0.01) -> float:
    """The time ``await check()`` first holds (polled: the benchmark's own progress check)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        services.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s}s")
        await asyncio.sleep(poll_s)
    return time.monotonic()


async def acked_up_to(js, durable: str, seq: int) -> bool:
    """Whether the trainer on ``durable`` has acknowledged (trained and pushed) every SAMPLES message to ``seq``."""
    info = await js.consumer_info(bus.SAMPLES.name, durable)
    return bool(info.ack_floor) and info.ack_floor.stream_seq >= seq


async def last_dense_samples(js) -> int | None:
    """samples_trained of the last dense snapshot on ``dense.<model>``."""
    try:
        raw = await js.get_last_msg(bus.DENSE.name, f"dense.{MODEL}")
    except nats.js.errors.NotFoundError:
        return None
    return model_pb2.DenseSnapshot.FromString(raw.data).samples_trained


async def run_pipeline(
    js, server: EmbeddedNats, tmp: str, env: dict, requests: int, config: ModelConfig, batch: int
) -> dict:
    """Backlog, then store + trainer, then the joiner: samples/s from the joiner's start to the last ack."""
    base_ms = bus.now_ms() - BASE_MS_AGO
    events, impressions = await publish_backlog(js, requests, base_ms, batched=True)
    # One impression after the backlog in event time moves the watermark past every window of it, so the
    # last windows close on event time (with a long idle timeout: see start_joiner); it is not counted.
    flush = EventPublisher(js, 1, "flush")
    await flush.add(events_pb2.Impression(request_id="flush", event_time_ms=base_ms + requests + FLUSH_AHEAD_MS))
    await flush.flush()
    progress(f"backlog of {events:,} events published; starting store and trainer")
    services = Services(server.url, os.path.join(tmp, "pipeline"), env)
    try:
        start_trainer(services, "trainer", start_store(services, "store", config), config, batch)
        await wait_until(lambda: consumer_exists(js, bus.SAMPLES.name, "trainer"), services, "trainer ready", 120)
        counter = SampleCounter()
        # An ordered consumer (flow-controlled, gap-checked) rather than a plain subscription: no sample
        # message may go uncounted however busy this process is.
        sub = await js.subscribe("samples.>", ordered_consumer=True, cb=counter.on_msg)
        progress("trainer ready; starting the joiner")
        start_joiner(services)
        meter = CpuMeter({**{name: p.pid for name, p in services.procs.items()}, "nats": nats_pid(server)})
        started = await wait_until(
            lambda: consumer_exists(js, bus.EVENTS.name, "joiner-p0"), services, "joiner ready", 120, 0.005
        )
        meter.start()

        async def all_joined() -> bool:
            return counter.samples >= impressions

        joined = await wait_until(
            all_joined, services, f"{impressions:,} samples joined ({counter.samples:,} so far)"
        )
        last_seq = (await js.stream_info(bus.SAMPLES.name)).state.last_seq
        trained = await wait_until(lambda: acked_up_to(js, "trainer", last_seq), services, "samples trained")
        cpu = meter.stop()
        progress(f"pipeline: {impressions / (trained - started):,.0f} samples/s")
        await sub.unsubscribe()
        await asyncio.sleep(0.5)  # one more dense interval: the last snapshot, if the trainer publishes it
        dense_samples = await last_dense_samples(js)
    finally:
        services.stop()
    if counter.samples != impressions:
        raise RuntimeError(f"{counter.samples} samples for {impressions} impressions")
    return {
        "events": events,
        "samples": impressions,
        "sample_messages": last_seq,
        "pipeline_samples_per_s": impressions / (trained - started),
        "pipeline_seconds": trained - started,
        "joiner_samples_per_s": impressions / (joined - started),
        "trainer_tail_s": trained - joined,
        "last_dense_snapshot_samples_trained": dense_samples,
        "pipeline_cpu": cpu,
    }


async def run_trainer_only(
    js, server: EmbeddedNats, tmp: str, env: dict, last_seq: int, samples: int, config: ModelConfig, batch: int
) -> dict:
    """A fresh store shard and a trainer on the samples already in the SAMPLES stream."""
    services = Services(server.url, os.path.join(tmp, "trainer-only"), env)
    try:
        start_trainer(services, "trainer-only", start_store(services, "store", config), config, batch)
        meter = CpuMeter({**{name: p.pid for name, p in services.procs.items()}, "nats": nats_pid(server)})
        started = await wait_until(
            lambda: consumer_exists(js, bus.SAMPLES.name, "trainer-only"), services, "trainer ready", 120, 0.005
        )
        meter.start()
        trained = await wait_until(lambda: acked_up_to(js, "trainer-only", last_seq), services, "samples trained")
        cpu = meter.stop()
        progress(f"trainer only: {samples / (trained - started):,.0f} samples/s")
    finally:
        services.stop()
    return {"trainer_only_samples_per_s": samples / (trained - started), "trainer_only_cpu": cpu}


async def nats_error(exc: Exception) -> None:
    progress(f"NATS error: {exc!r}")


def static_runs(config: ModelConfig, samples: tuple, batch: int, when: str) -> list[dict]:
    """The static baseline with 1 torch thread, and with torch's default when that is more (for at most
    a few seconds: on a busy 2-core machine the threads wait for each other and it can be 10x slower)."""
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            limit = float("inf") if n == 1 else 3.0
            runs.append({"when": when, "threads": n, **train_static(config, *samples, batch, limit)})
    finally:
        torch.set_num_threads(threads)
    return runs


async def run(requests: int, config: ModelConfig, batch: int, service_threads: int | None) -> dict:
    # torch in the services keeps its default thread count unless told (OMP_NUM_THREADS)
    env = {} if service_threads is None else {"OMP_NUM_THREADS": str(service_threads)}
    samples = static_samples(requests)
    progress(f"{len(samples[1]):,} samples featurised")
    runs = static_runs(config, samples, batch, "before the services")
    progress(f"static torch: {[round(r['samples_per_s']) for r in runs]} samples/s")
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(store_dir=os.path.join(tmp, "js")) as server:
        nc = await nats.connect(server.url, error_cb=nats_error)
        try:
            js = nc.jetstream()
            await bus.declare_streams(js)
            pipeline = await run_pipeline(js, server, tmp, env, requests, config, batch)
            if pipeline["samples"] != len(samples[1]):
                raise RuntimeError(
                    f"the joiner made {pipeline['samples']} samples, the static run {len(samples[1])}"
                )
            only = await run_trainer_only(
                js, server, tmp, env, pipeline["sample_messages"], pipeline["samples"], config, batch
            )
        finally:
            await nc.close()
    runs += static_runs(config, samples, batch, "after the services")
    static = max(runs, key=lambda r: r["samples_per_s"])
    static_cpu = min(r["cpu_us_per_sample"] for r in runs)  # the model's work itself, without threads waiting
    return {
        "model_config": json.loads(config.to_json()),
        "batch_size": batch,
        "requests": requests,
        "service_torch_threads": service_threads,
        **pipeline,
        **only,
        "static_torch_samples_per_s": static["samples_per_s"],
        "static_torch_threads": static["threads"],
        "static_torch_runs": runs,
        "ratio": pipeline["pipeline_samples_per_s"] / static["samples_per_s"],
        "trainer_only_ratio": only["trainer_only_samples_per_s"] / static["samples_per_s"],
        "pipeline_cpu_budget": cpu_budget(pipeline["pipeline_cpu"], pipeline["samples"], static_cpu),
        "trainer_only_cpu_budget": cpu_budget(only["trainer_only_cpu"], pipeline["samples"], static_cpu),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
    }


def cpu_budget(cpu: dict, samples: int, static_us_per_sample: float) -> dict:
    """CPU microseconds per sample of each process of a timed run (this benchmark's own process left out: it
    only counts), their total, the static run's, and the rate the run's work would reach with every core
    of the machine busy: how far CPU alone bounds the pipeline, against the time lost waiting."""
    used = {name: seconds * 1e6 / samples for name, seconds in cpu["cpu_s"].items() if name != "bench"}
    total = sum(used.values())
    cores = os.cpu_count() or 1
    return {
        "us_per_sample": {name: round(us, 2) for name, us in used.items()},
        "total_us_per_sample": round(total, 2),
        "static_us_per_sample": round(static_us_per_sample, 2),
        "cpu_bound_samples_per_s": round(cores * 1e6 / total) if total else None,
    }


def budget_line(budget: dict) -> str:
    parts = ", ".join(f"{name} {us:.1f}" for name, us in budget["us_per_sample"].items())
    return (
        f"{parts}; total {budget['total_us_per_sample']:.1f} µs/sample (static torch"
        f" at least {budget['static_us_per_sample']:.1f}); with all {os.cpu_count()} cores busy at most"
        f" {budget['cpu_bound_samples_per_s']:,} samples/s"
    )


def cpu_line(cpu: dict) -> str:
    parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in cpu["cpu_s"].items())
    return f"{parts} (CPU s in {cpu['wall_s']:.1f} s; machine {cpu['machine_busy']:.0%} busy)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60_000, help="requests of 5 impressions each")
    parser.add_argument("--model-config", default="", help="ModelConfig as JSON; empty: ModelConfig()")
    parser.add_argument(
        "--service-threads", type=int, default=None, help="OMP_NUM_THREADS of the services; default: torch's"
    )
    parser.add_argument(
        "--batch", type=int, default=TrainerConfig(store_address="unused").batch_size, help="samples per step"
    )
    args = parser.parse_args()
    config = ModelConfig.from_json(args.model_config) if args.model_config else ModelConfig()
    report = asyncio.run(run(args.requests, config, args.batch, args.service_threads))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(report, indent=2) + "\n")
    n = report["samples"]
    table = "\n".join(
        [
            f"model {config.to_json()}, batch {report['batch_size']}, {n:,} samples ({report['events']:,} events)",
            "",
            "| measure | samples/s | vs static |",
            "|---|---|---|",
            f"| pipeline: joiner → trainer → store, 3 processes, events backlog → last sample trained"
            f" | {report['pipeline_samples_per_s']:,.0f} | {report['ratio']:.2f} (target ≥ 0.5) |",
            f"| joiner part: backlog → last sample in the SAMPLES stream (the trainer then needed"
            f" {report['trainer_tail_s']:.2f} s more) | {report['joiner_samples_per_s']:,.0f} | |",
            f"| trainer + store only, samples already in the stream | {report['trainer_only_samples_per_s']:,.0f}"
            f" | {report['trainer_only_ratio']:.2f} |",
            f"| static torch: EmbeddingBag + same model, one process, {report['static_torch_threads']} thread(s)"
            f" | {report['static_torch_samples_per_s']:,.0f} | 1.00 |",
            "",
            f"CPU, pipeline: {cpu_line(report['pipeline_cpu'])}",
            f"CPU, trainer only: {cpu_line(report['trainer_only_cpu'])}",
            f"CPU per sample, pipeline: {budget_line(report['pipeline_cpu_budget'])}",
            f"CPU per sample, trainer only: {budget_line(report['trainer_only_cpu_budget'])}",
        ]
    )
    (RESULTS / "train.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
