"""Settings of the embedding store service."""

from __future__ import annotations

from dataclasses import dataclass

from freshet.config import env_field


@dataclass(frozen=True)
class StoreConfig:
    """Embedding store settings, each read from the named environment variable."""

    host: str = env_field("FRESHET_STORE_HOST", "interface the gRPC server binds", "127.0.0.1")
    port: int = env_field("FRESHET_STORE_PORT", "gRPC port; 0 picks a free one", 50051)
    tables: tuple[str, ...] = env_field("FRESHET_STORE_TABLES", "tables as name:dim, comma separated", ("fm:9",))
    learning_rate: float = env_field("FRESHET_STORE_LR", "Adagrad learning rate", 0.2)
    init_scale: float = env_field("FRESHET_STORE_INIT_SCALE", "new rows start uniform in +-scale", 0.01)
    max_fids_per_request: int = env_field(
        "FRESHET_STORE_MAX_FIDS", "larger Pull/Push requests get RESOURCE_EXHAUSTED", 1_000_000
    )
    export_limit: int = env_field("FRESHET_STORE_EXPORT_LIMIT", "default rows per Export page", 20_000)
    port_file: str = env_field("FRESHET_STORE_PORT_FILE", "if set, the bound port is written there", "")
