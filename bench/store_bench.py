"""Embedding store benchmark: ``make bench-store`` -> bench/results/store.json + a markdown table.

Measures, in one run on this machine:
- in-process lookup keys/s (``TieredTable.pull``) on power-law fids (alpha 1.2), 2,000- and
  65,536-key batches, every key present in the host tier;
- Push rows/s (rowwise Adagrad, 2,000 distinct fids per push);
- gRPC Pull keys/s through ``ShardedStoreClient`` against 2 shard processes;
- bytes per row in host memory (training, fp32 value + optimizer state + header + index) against
  the target 1.25 x (dim x 4 B + optimizer state) + 24 B, and of the predictor's replica (serving);
- tier hit rates with a host tier holding 20 % of the ids (the rest in RocksDB);
- Redis MGET of the same rows (dim x 4 bytes each) on the same host when a redis-server answers
  on 127.0.0.1:6379, as the baseline.
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

import numpy as np

from freshet.clients import ShardedStoreClient
from freshet.natsserver import free_port
from freshet.replica import RowMap
from services.store.optimizers import RowwiseAdagradConfig
from services.store.tables import TableSpec
from services.store.tiered import TieredTable

RESULTS = Path(__file__).resolve().parent / "results"


def power_law_queries(ranked_ids: np.ndarray, n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """n fids drawn with P(k-th of ``ranked_ids``) ~ k^-alpha: the ranking (which ids are hot) is fixed."""
    ranks = np.empty(0, np.int64)
    while len(ranks) < n:
        draw = rng.zipf(alpha, 2 * n)
        ranks = np.concatenate([ranks, draw[draw <= len(ranked_ids)] - 1])
    return ranked_ids[ranks[:n]]


def arrival_order(ranked_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ids in the order they first appear in a power-law stream (then the never-seen ones):
    the order in which a live table creates its rows."""
    stream = power_law_queries(ranked_ids, 4 * len(ranked_ids), 1.2, rng)
    _, first = np.unique(stream, return_index=True)
    seen = stream[np.sort(first)]
    unseen = np.setdiff1d(ranked_ids, seen)
    return np.concatenate([seen, unseen[rng.permutation(len(unseen))]])


def warmed_table(spec: TableSpec, ranked: np.ndarray, rng: np.random.Generator, device: str | None = None):
    """A table holding every id (rows created in arrival order) after 100 batches of warm-up
    traffic, which teach it which rows are hot; the device cache is then refreshed from them."""
    table = TieredTable(spec, device=device)
    for chunk in np.array_split(arrival_order(ranked, rng), max(1, len(ranked) // 65536)):
        table.push(chunk, np.zeros((len(chunk), spec.dim), np.float32))
    for _ in range(100):
        table.pull(power_law_queries(ranked, 2000, 1.2, rng))
    table.refresh_cache()
    return table


def timed_rate(fn, batches: list[np.ndarray], min_seconds: float = 1.0) -> float:
    """Keys per second of ``fn`` over the batches, repeated until at least ``min_seconds``."""
    fn(batches[0])  # warm up (numba compilation, caches)
    keys, start = 0, time.perf_counter()
    while True:
        for b in batches:
            fn(b)
            keys += len(b)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return keys / elapsed


def bench_in_process(n_ids: int, dim: int, cache_rows: int, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    spec = TableSpec(
        "bench",
        dim,
        optimizer=RowwiseAdagradConfig(learning_rate=0.05),
        device_cache_rows=cache_rows,
        initial_rows=n_ids,
    )
    ids = np.unique(rng.integers(0, 2**62, n_ids, dtype=np.int64))
    ranked = ids[rng.permutation(len(ids))]  # which ids are hot is fixed for the whole run
    table = warmed_table(spec, ranked, rng)
    out = {"ids": len(ids), "dim": dim, "device_cache_rows": cache_rows, "device": str(table.cache.device)}
    for batch in (2000, 65536):
        queries = power_law_queries(ranked, batch * 200, 1.2, rng)
        batches = [queries[i : i + batch] for i in range(0, len(queries), batch)]
        table.stats.clear()
        out[f"lookup_keys_per_s_{batch}"] = timed_rate(table.pull, batches)
        out[f"cache_hit_rate_{batch}"] = table.stats["cache_hits"] / table.stats["pull_keys"]
        # The same lookups with the host tier alone (no device cache in front).
        cache, table.cache = table.cache, None
        out[f"host_only_lookup_keys_per_s_{batch}"] = timed_rate(table.pull, batches)
        table.cache = cache
    push_batches = [rng.choice(ids, 2000, replace=False) for _ in range(50)]
    grads = rng.normal(0, 0.01, (2000, dim)).astype(np.float32)
    out["push_rows_per_s"] = timed_rate(lambda b: table.push(b, grads), push_batches)
    state_bytes = 4 * table.state_width
    out["bytes_per_row_training"] = table.bytes_per_row()
    out["bytes_per_row_target"] = 1.25 * (dim * 4 + state_bytes) + 24
    out["device_cache_bytes_per_row"] = table.cache.nbytes() / len(ids)
    replica = RowMap(dim)
    replica.put(ids, rng.normal(0, 0.1, (len(ids), dim)).astype(np.float32))
    out["bytes_per_row_serving_fp32"] = replica.nbytes() / len(ids)
    return out, ranked


def bench_tiers(n_ids: int, dim: int, rng: np.random.Generator, tmp: str) -> dict:
    """Training-like traffic (pull, then push the same fids) with a host tier holding 20 % of the ids."""
    spec = TableSpec("tiers", dim, optimizer=RowwiseAdagradConfig(), host_capacity=n_ids // 5)
    table = TieredTable(spec, data_dir=os.path.join(tmp, "tiers"))
    ids = np.unique(rng.integers(0, 2**62, n_ids, dtype=np.int64))
    ranked = ids[rng.permutation(len(ids))]
    for chunk in np.array_split(ids, max(1, len(ids) // 20000)):
        table.push(chunk, np.zeros((len(chunk), dim), np.float32))
    grads = np.full((2000, dim), 1e-3, np.float32)

    def step(batch: np.ndarray) -> None:
        table.pull(batch)
        table.push(batch, grads[: len(batch)])

    for _ in range(200):  # let demotion and promotion settle on the hot set
        step(power_law_queries(ranked, 2000, 1.2, rng))
    table.stats.clear()
    start = time.perf_counter()
    for _ in range(200):
        step(power_law_queries(ranked, 2000, 1.2, rng))
    elapsed = time.perf_counter() - start
    s = table.stats
    total = s["pull_keys"]
    result = {
        "ids": len(ids),
        "host_capacity": spec.host_capacity,
        "host_hit_rate": s["host_hits"] / total,
        "cold_hit_rate": s["cold_hits"] / total,
        "initial_read_rate": s["initial_reads"] / total,
        "promoted_rows": s["promoted"],
        "demoted_rows": s["demoted"],
        "train_steps_per_s": 200 / elapsed,
    }
    table.close()
    return result


def start_shards(dim: int, ports: list[int]) -> list[subprocess.Popen]:
    procs = []
    for shard, port in enumerate(ports):
        env = {
            **os.environ,
            "FRESHET_STORE_PORT": str(port),
            "FRESHET_STORE_TABLES": f"bench:{dim}",
            "FRESHET_STORE_SHARD": str(shard),
            "FRESHET_STORE_NUM_SHARDS": "2",
            "FRESHET_LOG_LEVEL": "WARNING",
        }
        procs.append(subprocess.Popen([sys.executable, "-m", "services.store"], env=env))
    return procs


async def pull_concurrently(client: ShardedStoreClient, batches: list[np.ndarray], inflight: int) -> None:
    """Pulls every batch with at most ``inflight`` requests outstanding."""
    sem = asyncio.Semaphore(inflight)

    async def one(batch: np.ndarray) -> None:
        async with sem:
            await client.pull("bench", batch)

    await asyncio.gather(*(one(b) for b in batches))


async def bench_grpc(ids: np.ndarray, dim: int, rng: np.random.Generator) -> dict:
    ports = [free_port(), free_port()]
    procs = await asyncio.to_thread(start_shards, dim, ports)
    client = ShardedStoreClient([f"127.0.0.1:{p}" for p in ports], timeout_s=60)
    try:
        for chunk in np.array_split(ids, max(1, len(ids) // 65536)):
            await client.push("bench", chunk, np.zeros((len(chunk), dim), np.float32))
        result = {}
        for batch, inflight in ((2000, 8), (65536, 4)):
            queries = power_law_queries(ids, batch * 100, 1.2, rng)
            batches = [queries[i : i + batch] for i in range(0, len(queries), batch)]
            await client.pull("bench", batches[0])
            start = time.perf_counter()
            await pull_concurrently(client, batches, inflight)
            result[f"grpc_pull_keys_per_s_{batch}"] = sum(map(len, batches)) / (time.perf_counter() - start)
        return result
    finally:
        await client.close()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=10)


def bench_redis(ids: np.ndarray, dim: int, rng: np.random.Generator) -> dict | None:
    try:
        import redis
    except ImportError:
        return None
    client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        return None
    n = min(len(ids), 500_000)
    subset = ids[:n]
    value = np.zeros(dim, np.float32).tobytes()
    prefix = "freshet-bench:"
    pipe = client.pipeline(transaction=False)
    for i, fid in enumerate(subset.tolist()):
        pipe.set(f"{prefix}{fid}", value)
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    try:
        queries = power_law_queries(subset, 2000 * 100, 1.2, rng)
        batches = [[f"{prefix}{f}" for f in queries[i : i + 2000].tolist()] for i in range(0, len(queries), 2000)]

        def mget(keys):
            raw = client.mget(keys)
            np.frombuffer(b"".join(raw), np.float32)

        rate = timed_rate(mget, batches)
        return {"redis_mget_keys_per_s": rate, "redis_ids": n}
    finally:
        for i in range(0, n, 10_000):
            client.delete(*[f"{prefix}{f}" for f in subset[i : i + 10_000].tolist()])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=2_000_000, help="distinct fids in the in-process table")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--tier-ids", type=int, default=300_000, help="distinct fids in the tiered test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-rows", type=int, default=65536, help="device cache rows (hottest ids)")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        local, ids = bench_in_process(args.ids, args.dim, args.cache_rows, rng)
        tiers = bench_tiers(args.tier_ids, args.dim, rng, tmp)
        grpc_figures = asyncio.run(bench_grpc(ids[: min(len(ids), 1_000_000)], args.dim, rng))
    redis_figures = bench_redis(ids, args.dim, rng)
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {
            "ids": local["ids"],
            "dim": args.dim,
            "alpha": 1.2,
            "optimizer": "rowwise_adagrad",
            "device_cache_rows": args.cache_rows,
            "device": local["device"],
        },
        "cache_hit_rate": local["cache_hit_rate_2000"],
        "lookup_keys_per_s": local["lookup_keys_per_s_2000"],
        "lookup_keys_per_s_65536": local["lookup_keys_per_s_65536"],
        "host_only_lookup_keys_per_s": local["host_only_lookup_keys_per_s_2000"],
        "host_only_lookup_keys_per_s_65536": local["host_only_lookup_keys_per_s_65536"],
        "push_rows_per_s": local["push_rows_per_s"],
        "grpc_pull_keys_per_s": grpc_figures["grpc_pull_keys_per_s_65536"],
        "grpc_pull_keys_per_s_2000": grpc_figures["grpc_pull_keys_per_s_2000"],
        "redis_mget_keys_per_s": redis_figures["redis_mget_keys_per_s"] if redis_figures else None,
        "bytes_per_row_training": local["bytes_per_row_training"],
        "bytes_per_row_target": local["bytes_per_row_target"],
        "bytes_per_row_serving_fp32": local["bytes_per_row_serving_fp32"],
        "tiers": tiers,
    }
    if redis_figures:
        report["lookup_vs_redis"] = report["lookup_keys_per_s"] / report["redis_mget_keys_per_s"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "store.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [
        (
            "in-process lookup (device cache + host), 2,000 keys",
            f"{report['lookup_keys_per_s'] / 1e6:.1f} M keys/s",
            "≥ 20 M",
        ),
        (
            "in-process lookup, host tier alone, 2,000 keys",
            f"{report['host_only_lookup_keys_per_s'] / 1e6:.1f} M keys/s",
            "≥ 20 M",
        ),
        (
            "device cache hit rate",
            f"{report['cache_hit_rate']:.1%} ({args.cache_rows:,} rows, {local['device']})",
            "",
        ),
        (
            "in-process lookup (device cache + host), 65,536 keys",
            f"{report['lookup_keys_per_s_65536'] / 1e6:.1f} M keys/s",
            "",
        ),
        ("Push (rowwise Adagrad, 2,000 rows)", f"{report['push_rows_per_s'] / 1e6:.2f} M rows/s", ""),
        ("gRPC Pull, 2 shards, 65,536 keys", f"{report['grpc_pull_keys_per_s'] / 1e6:.2f} M keys/s", "≥ 2 M"),
        ("gRPC Pull, 2 shards, 2,000 keys", f"{report['grpc_pull_keys_per_s_2000'] / 1e6:.2f} M keys/s", ""),
        (
            "Redis MGET, 2,000 keys",
            "n/a (no redis)" if not redis_figures else f"{report['redis_mget_keys_per_s'] / 1e6:.2f} M keys/s",
            "",
        ),
        ("lookup / Redis MGET", f"{report.get('lookup_vs_redis', float('nan')):.1f}x", "≥ 10x"),
        (
            "bytes per row, training",
            f"{report['bytes_per_row_training']:.1f} B",
            f"≤ {report['bytes_per_row_target']:.1f} B",
        ),
        ("bytes per row, serving replica (fp32)", f"{report['bytes_per_row_serving_fp32']:.1f} B", ""),
        (
            f"host hit rate (host holds {tiers['host_capacity']:,} of {tiers['ids']:,} ids)",
            f"{tiers['host_hit_rate']:.1%} (RocksDB {tiers['cold_hit_rate']:.1%})",
            "",
        ),
        ("training steps/s with tiers (pull + push 2,000 keys)", f"{tiers['train_steps_per_s']:.0f}", ""),
    ]
    table = "| measure | value | target |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    (RESULTS / "store.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
