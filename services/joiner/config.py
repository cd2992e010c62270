"""Settings of the joiner service."""

from __future__ import annotations

from dataclasses import dataclass

from freshet.config import env_field
from services.joiner.eventjoin import JoinConfig


@dataclass(frozen=True)
class JoinerConfig:
    """Joiner settings, each read from the named environment variable."""

    window_s: float = env_field(
        "FRESHET_JOIN_WINDOW_S", "event-time seconds an impression waits for actions before it is a negative", 5.0
    )
    allowed_lateness_s: float = env_field(
        "FRESHET_JOIN_ALLOWED_LATENESS_S", "how far the watermark stays behind the latest event time", 1.0
    )
    idle_timeout_s: float = env_field(
        "FRESHET_JOIN_IDLE_TIMEOUT_S", "without events for this long, the watermark follows processing time", 1.0
    )
    late_policy: str = env_field(
        "FRESHET_JOIN_LATE_POLICY", "late actions: drop, or correct (emit a correction)", "drop"
    )
    negative_rate: float = env_field(
        "FRESHET_JOIN_NEGATIVE_RATE", "share of negatives kept (weighted 1/rate), in (0, 1]", 1.0
    )
    seed: int = env_field("FRESHET_JOIN_SEED", "seed of the negative down-sampling hash", 0)
    retention_s: float = env_field(
        "FRESHET_JOIN_RETENTION_S", "how long closed keys are remembered to recognise duplicates", 60.0
    )
    state_dir: str = env_field(
        "FRESHET_JOINER_STATE_DIR", "RocksDB directory of the join state; empty keeps it in memory", ""
    )
    sync_writes: bool = env_field(
        "FRESHET_JOINER_SYNC_WRITES",
        "fsync the join state's log on every commit, so a commit also survives an OS crash or power loss "
        "(off: it survives the joiner's own crash, kill -9 included)",
        False,
    )
    partitions: int = env_field(
        "FRESHET_PARTITIONS", "event partitions: events.<kind>.<0..n-1>, samples.<0..n-1>", 1
    )
    owned_partitions: tuple[str, ...] = env_field(
        "FRESHET_JOINER_PARTITIONS", "partitions this instance joins, comma separated; empty: all", ()
    )
    durable: str = env_field(
        "FRESHET_JOINER_DURABLE",
        "durable consumer name prefix on EVENTS (one per partition: <name>-p<n>)",
        "joiner",
    )
    fetch_batch: int = env_field("FRESHET_JOINER_FETCH_BATCH", "messages fetched per pull at most", 512)
    fetch_timeout_s: float = env_field(
        "FRESHET_JOINER_FETCH_TIMEOUT_S",
        "longest wait of a pull for more messages once one arrived (bounds the join latency it adds)",
        0.01,
    )
    step_events: int = env_field(
        "FRESHET_JOINER_STEP_EVENTS",
        "events per join step (whole messages: a step ends with the message that reaches it); each step's "
        "samples are committed and published while the rest of a fetch is joined",
        8192,
    )
    publish_window: int = env_field(
        "FRESHET_JOINER_PUBLISH_WINDOW",
        "sample messages per partition published and not yet acknowledged by JetStream at most",
        8,
    )
    publish_timeout_s: float = env_field(
        "FRESHET_JOINER_PUBLISH_TIMEOUT_S",
        "how long a sample message's acknowledgement may take before it is published again (same id)",
        5.0,
    )
    samples_per_message: int = env_field(
        "FRESHET_JOINER_SAMPLES_PER_MESSAGE", "samples per SampleBatch message at most (keep it under 1 MB)", 2048
    )
    tick_s: float = env_field("FRESHET_JOINER_TICK_S", "seconds between watermark advances without events", 0.1)
    gc_freeze_s: float = env_field(
        "FRESHET_JOINER_GC_FREEZE_S",
        "seconds between young garbage collections that freeze what survives (bounds GC pauses); 0: off",
        0.25,
    )

    def join_config(self) -> JoinConfig:
        return JoinConfig(
            window_ms=int(self.window_s * 1000),
            allowed_lateness_ms=int(self.allowed_lateness_s * 1000),
            idle_timeout_ms=max(1, int(self.idle_timeout_s * 1000)),
            late_policy=self.late_policy,
            negative_rate=self.negative_rate,
            seed=self.seed,
            retention_ms=int(self.retention_s * 1000),
        )
