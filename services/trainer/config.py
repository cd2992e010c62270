"""Settings of the trainer service."""

from __future__ import annotations

from dataclasses import dataclass

from freshet.config import env_field
from freshet.models import ModelConfig, model_from_setting

START_MODES = ("resume", "first", "new")


@dataclass(frozen=True)
class TrainerConfig:
    """Trainer settings, each read from the named environment variable."""

    store_address: str = env_field(
        "FRESHET_STORE_ADDRESS", "host:port of each embedding store shard, comma separated, in shard order"
    )
    model: str = env_field("FRESHET_MODEL", "model name: subjects dense.<model>, model.<model>.*", "fm")
    model_config: str = env_field(
        "FRESHET_MODEL_CONFIG",
        "the model as JSON (ModelConfig fields: kind, dim, fields, deep, tasks, ...), or @<path> of a JSON file; "
        "empty: the default model",
        "",
    )
    dense_lr: float = env_field("FRESHET_DENSE_LR", "Adagrad learning rate of the dense parameters", 0.05)
    batch_size: int = env_field("FRESHET_TRAIN_BATCH", "samples per training step at most", 1024)
    pipeline: bool = env_field(
        "FRESHET_TRAIN_PIPELINE",
        "send step k's push, with step k+2's pull in the same call, while step k+1 is computed (a staleness "
        "of one step; acks and checkpoints still wait for the pushes); off: each step reads the rows the "
        "previous step pushed, which matters for small batches on bursty streams",
        True,
    )
    fetch_batch: int = env_field("FRESHET_TRAIN_FETCH", "sample messages fetched at once at most", 64)
    fetch_timeout_s: float = env_field(
        "FRESHET_TRAIN_FETCH_TIMEOUT_S",
        "max wait for a sample message; a step then trains what has arrived (up to FRESHET_TRAIN_FETCH messages)",
        0.05,
    )
    dense_interval_s: float = env_field("FRESHET_DENSE_INTERVAL_S", "seconds between dense snapshots", 1.0)
    dense_interval_steps: int = env_field(
        "FRESHET_DENSE_INTERVAL_STEPS", "also publish a dense snapshot after this many steps (0: by time only)", 0
    )
    checkpoint_s: float = env_field(
        "FRESHET_TRAINER_CHECKPOINT_S",
        "seconds between exactly-once checkpoints (stream position + store checkpoint + dense state); "
        "0: at-least-once (the store needs no data dir)",
        5.0,
    )
    start: str = env_field(
        "FRESHET_TRAINER_START",
        "without a checkpoint: resume (the durable consumer's position; all samples on first start), "
        "first (every sample in the stream), new (only samples arriving from now), or seq:<n>",
        "resume",
    )
    replay: str = env_field(
        "FRESHET_TRAINER_REPLAY",
        "<format>:<path> of a dataset (see freshet replay) to train on before the stream: batch, then online",
        "",
    )
    durable: str = env_field("FRESHET_TRAINER_DURABLE", "durable consumer on the SAMPLES stream", "trainer")
    subject: str = env_field("FRESHET_TRAINER_SUBJECT", "sample subjects this worker trains on", "samples.>")
    log_interval_s: float = env_field("FRESHET_TRAIN_LOG_INTERVAL_S", "seconds between progress logs", 5.0)
    metrics_window: int = env_field("FRESHET_TRAIN_METRICS_WINDOW", "samples in the sliding-window AUC", 10_000)
    seed: int = env_field("FRESHET_TRAIN_SEED", "seed of the dense initialisation", 0)
    torch_threads: int = env_field(
        "FRESHET_TORCH_THREADS",
        "torch intra-op threads (0: torch's default, all cores); small CTR models run fastest on one",
        1,
    )

    def __post_init__(self) -> None:
        if self.start not in START_MODES and not (self.start.startswith("seq:") and self.start[4:].isdigit()):
            raise ValueError(f"FRESHET_TRAINER_START must be one of {START_MODES} or seq:<n>, got {self.start!r}")
        if self.batch_size <= 0 or self.fetch_batch <= 0:
            raise ValueError("FRESHET_TRAIN_BATCH and FRESHET_TRAIN_FETCH must be positive")

    def model_spec(self) -> ModelConfig:
        """The configured model (``FRESHET_MODEL_CONFIG``), or the default one."""
        return model_from_setting(self.model_config)
