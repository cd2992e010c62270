"""Settings of the predictor service."""

from __future__ import annotations

from dataclasses import dataclass

from freshet.config import env_field


@dataclass(frozen=True)
class PredictorConfig:
    """Predictor settings, each read from the named environment variable."""

    host: str = env_field("FRESHET_PREDICTOR_HOST", "interface the gRPC server binds", "127.0.0.1")
    port: int = env_field("FRESHET_PREDICTOR_PORT", "gRPC port; 0 picks a free one", 50052)
    model: str = env_field("FRESHET_MODEL", "model served: follows model.<model>.decision", "fm")
    torch_threads: int = env_field(
        "FRESHET_TORCH_THREADS", "torch intra-op threads for scoring (0: torch's default, all cores)", 1
    )
    replica_dtype: str = env_field(
        "FRESHET_REPLICA_DTYPE", "how the replica holds rows: fp32, fp16, or int8 with a per-row scale", "fp32"
    )
    model_config: str = env_field(
        "FRESHET_MODEL_CONFIG",
        "the model as JSON or @<path> (the trainer's setting); empty: the default model",
        "",
    )
    max_candidates: int = env_field(
        "FRESHET_PREDICT_MAX_CANDIDATES", "larger Predict requests get RESOURCE_EXHAUSTED", 2_000
    )
    max_request_bytes: int = env_field(
        "FRESHET_PREDICT_MAX_REQUEST_BYTES",
        "larger Predict requests (serialized) get RESOURCE_EXHAUSTED from gRPC; also caps responses",
        1 << 20,
    )
    resync_request_timeout_s: float = env_field(
        "FRESHET_RESYNC_REQUEST_TIMEOUT_S", "gap repair: how long a snapshot request waits for the publisher", 30.0
    )
    resync_approval_wait_s: float = env_field(
        "FRESHET_RESYNC_APPROVAL_WAIT_S",
        "gap repair: how long to wait for the validator to approve the requested snapshot",
        30.0,
    )
    resync_retry_max_s: float = env_field(
        "FRESHET_RESYNC_RETRY_MAX_S", "gap repair: longest pause between attempts (they never stop)", 5.0
    )
    port_file: str = env_field("FRESHET_PREDICTOR_PORT_FILE", "if set, the bound port is written there", "")
