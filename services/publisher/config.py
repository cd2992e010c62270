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
    model_config: str = env_field(
        "FRESHET_MODEL_CONFIG",
        "the model as JSON or @<path> (the trainer's setting): every one of its store tables is streamed",
        "",
    )
    encoding: str = env_field(
        "FRESHET_DELTA_ENCODING",
        "how delta and snapshot rows travel: fp32, fp16, or int8 with a per-row scale",
        "fp32",
    )
    interval_s: float = env_field("FRESHET_PUBLISH_INTERVAL_S", "seconds between delta exports", 0.1)
    max_rows_per_delta: int = env_field(
        "FRESHET_DELTA_MAX_ROWS",
        "rows per delta message and snapshot chunk, lowered per table so a message stays under the "
        "server's max payload (1 MB by default)",
        20_000,
    )
    snapshot_interval_s: float = env_field(
        "FRESHET_SNAPSHOT_INTERVAL_S", "seconds between full snapshots; 0: only on request", 300.0
    )
    snapshot_keep: int = env_field(
        "FRESHET_SNAPSHOT_KEEP", "newest snapshots kept by pruning (the latest approved one is kept too)", 3
    )
    max_lag: int = env_field(
        "FRESHET_PUBLISH_MAX_LAG",
        "publishing waits while the validator's consumer has more than this many messages pending "
        "(rows coalesce meanwhile); 0: never wait",
        1_000,
    )
    validator_durable: str = env_field(
        "FRESHET_VALIDATOR_DURABLE",
        "the validator's durable consumer on the MODEL stream, whose lag is watched",
        "validator",
    )
    retry_backoff_s: float = env_field(
        "FRESHET_PUBLISH_RETRY_BACKOFF_S",
        "longest wait between retries of a failed export or publish (exponential from 50 ms; retried until it succeeds)",
        2.0,
    )
    publish_timeout_s: float = env_field(
        "FRESHET_PUBLISH_TIMEOUT_S",
        "seconds to wait for the MODEL stream's ack of a delta before retrying it",
        2.0,
    )

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"FRESHET_DELTA_ENCODING must be one of {ENCODINGS}, got {self.encoding!r}")
        for env, value in (
            ("FRESHET_PUBLISH_INTERVAL_S", self.interval_s),
            ("FRESHET_PUBLISH_RETRY_BACKOFF_S", self.retry_backoff_s),
            ("FRESHET_PUBLISH_TIMEOUT_S", self.publish_timeout_s),
        ):
            if value <= 0:
                raise ValueError(f"{env} must be > 0, got {value}")
        for env, value in (
            ("FRESHET_DELTA_MAX_ROWS", self.max_rows_per_delta),
            ("FRESHET_SNAPSHOT_KEEP", self.snapshot_keep),
        ):
            if value < 1:
                raise ValueError(f"{env} must be >= 1, got {value}")
        if self.snapshot_interval_s < 0 or self.max_lag < 0:
            raise ValueError("FRESHET_SNAPSHOT_INTERVAL_S and FRESHET_PUBLISH_MAX_LAG must be >= 0")
