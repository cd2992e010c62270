"""Settings of the trainer service."""

from __future__ import annotations

from dataclasses import dataclass

from freshet.config import env_field


@dataclass(frozen=True)
class TrainerConfig:
    """Trainer settings, each read from the named environment variable."""

    store_address: str = env_field(
        "FRESHET_STORE_ADDRESS", "host:port of each embedding store shard, comma separated, in shard order"
    )
    model: str = env_field("FRESHET_MODEL", "model name: subjects dense.<model>, model.<model>.*", "fm")
    table: str = env_field("FRESHET_TABLE", "embedding store table of the model's rows", "fm")
    factors: int = env_field("FRESHET_FM_FACTORS", "FM factor dim k (0 = logistic regression); rows are 1+k", 8)
    dense_lr: float = env_field("FRESHET_DENSE_LR", "Adagrad learning rate of the dense parameters", 0.1)
    batch_size: int = env_field("FRESHET_TRAIN_BATCH", "max sample messages per training step", 512)
    fetch_timeout_s: float = env_field("FRESHET_TRAIN_FETCH_TIMEOUT_S", "max wait to fill a batch", 0.05)
    dense_interval_s: float = env_field("FRESHET_DENSE_INTERVAL_S", "seconds between dense snapshots", 1.0)
    durable: str = env_field("FRESHET_TRAINER_DURABLE", "durable consumer on the SAMPLES stream", "trainer")
    subject: str = env_field("FRESHET_TRAINER_SUBJECT", "sample subjects this worker trains on", "samples.>")
    log_interval_s: float = env_field("FRESHET_TRAIN_LOG_INTERVAL_S", "seconds between progress logs", 5.0)
