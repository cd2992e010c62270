"""Settings of the embedding store service (one shard per process)."""

from __future__ import annotations

from dataclasses import dataclass

from freshet.config import env_field


@dataclass(frozen=True)
class StoreConfig:
    """Embedding store settings, each read from the named environment variable."""

    host: str = env_field("FRESHET_STORE_HOST", "interface the gRPC server binds", "127.0.0.1")
    port: int = env_field("FRESHET_STORE_PORT", "gRPC port; 0 picks a free one", 50051)
    tables: tuple[str, ...] = env_field(
        "FRESHET_STORE_TABLES", "tables as name:dim (Adagrad, no admission), comma separated", ("fm:9",)
    )
    tables_file: str = env_field(
        "FRESHET_STORE_TABLES_FILE",
        "JSON list of table specs (optimizer, slot policies, capacity); replaces FRESHET_STORE_TABLES",
        "",
    )
    learning_rate: float = env_field("FRESHET_STORE_LR", "Adagrad learning rate of name:dim tables", 0.1)
    init_scale: float = env_field("FRESHET_STORE_INIT_SCALE", "new rows start uniform in +-scale", 0.01)
    device_cache_rows: int = env_field(
        "FRESHET_STORE_DEVICE_CACHE_ROWS", "hottest rows mirrored in the device cache of name:dim tables", 16384
    )
    data_dir: str = env_field(
        "FRESHET_STORE_DATA_DIR",
        "RocksDB directory (cold rows + checkpoints); empty keeps rows in memory only",
        "",
    )
    shard: int = env_field("FRESHET_STORE_SHARD", "this process's shard number", 0)
    num_shards: int = env_field("FRESHET_STORE_NUM_SHARDS", "shards in the store (fids split by hash)", 1)
    checkpoint_interval_s: float = env_field(
        "FRESHET_STORE_CHECKPOINT_INTERVAL_S",
        "seconds between automatic checkpoints (with a data dir; 0: off)",
        30.0,
    )
    maintain_interval_s: float = env_field(
        "FRESHET_STORE_MAINTAIN_INTERVAL_S",
        "seconds between passes of TTL eviction, demotion and cache refresh",
        5.0,
    )
    max_fids_per_request: int = env_field(
        "FRESHET_STORE_MAX_FIDS", "larger Pull/Push requests get RESOURCE_EXHAUSTED", 1_000_000
    )
    export_limit: int = env_field("FRESHET_STORE_EXPORT_LIMIT", "default rows per Export page", 20_000)
    port_file: str = env_field("FRESHET_STORE_PORT_FILE", "if set, the bound port is written there", "")
