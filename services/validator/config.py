"""Settings of the validator service."""

from __future__ import annotations

from dataclasses import dataclass

from freshet.config import env_field


@dataclass(frozen=True)
class ValidatorConfig:
    """Validator settings, each read from the named environment variable."""

    max_abs_value: float = env_field(
        "FRESHET_VALIDATOR_MAX_ABS", "reject deltas with any absolute value above this (norm explosion)", 1e4
    )
    durable: str = env_field("FRESHET_VALIDATOR_DURABLE", "durable consumer on the MODEL stream", "validator")
    subject: str = env_field("FRESHET_VALIDATOR_SUBJECT", "delta subjects to gate", "model.*.delta.>")
