"""Settings of the publisher service."""

from __future__ import annotations

from dataclasses import dataclass

from freshet.config import env_field
from freshet.delta import ENCODINGS


@dataclass(frozen=True)
class PublisherConfig:
    """Publisher settings, each read from the named environment variable."""

    store_address: str = env_field(
        "FRESHET_STORE_ADDRESS", "host:port of each embedding store shard, comma separated, in shard order"
    )
    model: str = env_field("FRESHET_MODEL", "model name: subjects dense.<model>, model.<model>.*", "fm")
    table: str = env_field("FRESHET_TABLE", "embedding store table of the model's rows", "fm")
    model_config: str = env_field(
        "FRESHET_MODEL_CONFIG",
        "the model as JSON or @<path> (the trainer's setting); checked against FRESHET_TABLE",
        "",
    )
    encoding: str = env_field(
        "FRESHET_DELTA_ENCODING", "how delta rows travel: fp32, fp16, or int8 with a per-row scale", "fp32"
    )
    interval_s: float = env_field("FRESHET_PUBLISH_INTERVAL_S", "seconds between delta exports", 0.1)
    max_rows_per_delta: int = env_field(
        "FRESHET_DELTA_MAX_ROWS", "rows per delta message (keeps messages under NATS' 1 MB payload)", 20_000
    )

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"FRESHET_DELTA_ENCODING must be one of {ENCODINGS}, got {self.encoding!r}")
