"""Settings of the joiner service."""

from __future__ import annotations

from dataclasses import dataclass

from freshet.config import env_field


@dataclass(frozen=True)
class JoinerConfig:
    """Joiner settings, each read from the named environment variable."""

    window_s: float = env_field(
        "FRESHET_JOIN_WINDOW_S", "seconds an impression waits for a click before it becomes a negative", 5.0
    )
    partitions: int = env_field("FRESHET_PARTITIONS", "sample subjects samples.<0..n-1>", 1)
    durable: str = env_field("FRESHET_JOINER_DURABLE", "durable consumer name on the EVENTS stream", "joiner")
    subject: str = env_field("FRESHET_JOINER_SUBJECT", "event subjects this instance consumes", "events.>")
    fetch_batch: int = env_field("FRESHET_JOINER_FETCH_BATCH", "messages fetched per pull", 256)
    max_pending: int = env_field(
        "FRESHET_JOINER_MAX_PENDING", "un-acked events held in the window (consumer max_ack_pending)", 100_000
    )
