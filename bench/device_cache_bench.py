"""Device cache timings: the same table pulled through a CPU cache and a CUDA cache (when present).

Writes bench/results/device_cache.json and prints a table. On a machine without CUDA only the
CPU row is measured. Pull keys/s include the index probe on the CPU, the gather on the device and
the copy of the hits back to host memory (the store answers over gRPC from host memory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_bench import power_law_queries, timed_rate, warmed_table  # noqa: E402

from services.store.optimizers import RowwiseAdagradConfig  # noqa: E402
from services.store.tables import TableSpec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def measure(device: str, ids: np.ndarray, ranked: np.ndarray, dim: int, cache_rows: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    spec = TableSpec(
        "c", dim, optimizer=RowwiseAdagradConfig(), device_cache_rows=cache_rows, initial_rows=len(ids)
    )
    table = warmed_table(spec, ranked, rng, device)
    row = {"device": str(table.cache.device)}
    for batch in (2000, 65536):
        queries = power_law_queries(ranked, batch * 100, 1.2, rng)
        batches = [queries[i : i + batch] for i in range(0, len(queries), batch)]
        table.stats.clear()
        row[f"pull_keys_per_s_{batch}"] = timed_rate(table.pull, batches)
        row[f"cache_hit_rate_{batch}"] = table.stats["cache_hits"] / table.stats["pull_keys"]
    # The cache must serve exactly the host's values, also after pushes (write-through).
    probe = power_law_queries(ranked, 5000, 1.2, rng)
    table.push(probe, np.full((len(probe), dim), 0.1, np.float32))
    host_only = np.empty((len(probe), dim), np.float32)
    table.host.find_gather(probe, host_only)
    row["cache_matches_host"] = bool(np.array_equal(table.pull(probe), host_only))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--cache-rows", type=int, default=65536)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(0, 2**62, args.ids, dtype=np.int64))
    ranked = ids[rng.permutation(len(ids))]
    rows = [measure("cpu", ids, ranked, args.dim, args.cache_rows, 1)]
    if torch.cuda.is_available():
        rows.append(measure("cuda", ids, ranked, args.dim, args.cache_rows, 1))
        rows[-1]["gpu"] = torch.cuda.get_device_name()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "device_cache.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| device | pull 2,000 keys | pull 65,536 keys | cache hit rate | cache == host |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.get('gpu', r['device'])} | {r['pull_keys_per_s_2000'] / 1e6:.1f} M keys/s"
            f" | {r['pull_keys_per_s_65536'] / 1e6:.1f} M keys/s | {r['cache_hit_rate_2000']:.1%}"
            f" | {r['cache_matches_host']} |"
        )
    return 0 if all(r["cache_matches_host"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
