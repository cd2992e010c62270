"""Settings of the validator service."""

from __future__ import annotations

from dataclasses import dataclass

from freshet.config import env_field


@dataclass(frozen=True)
class ValidatorConfig:
    """Validator settings, each read from the named environment variable."""

    model: str = env_field(
        "FRESHET_MODEL",
        "model gated: candidates on model.<model>.delta.> and model.<model>.snapshot.candidate",
        "fm",
    )
    model_config: str = env_field(
        "FRESHET_MODEL_CONFIG",
        "the model as JSON or @<path> (the trainer's setting): the shadow replica's network; empty: the default",
        "",
    )
    durable: str = env_field("FRESHET_VALIDATOR_DURABLE", "durable consumer on the MODEL stream", "validator")
    samples_subject: str = env_field(
        "FRESHET_VALIDATOR_SAMPLES", "sample subjects the reference window reads (new messages only)", "samples.>"
    )
    max_abs_value: float = env_field(
        "FRESHET_VALIDATOR_MAX_ABS", "reject deltas with any absolute value above this (norm explosion)", 1e4
    )
    max_row_norm: float = env_field(
        "FRESHET_VALIDATOR_MAX_ROW_NORM",
        "reject deltas with a row whose L2 norm is above this (norm explosion)",
        1e3,
    )
    window: int = env_field(
        "FRESHET_VALIDATOR_WINDOW", "samples in the reference window candidates are scored on", 5000
    )
    min_class: int = env_field(
        "FRESHET_VALIDATOR_MIN_CLASS",
        "positives and negatives each needed before AUC is measured (before: structural checks only)",
        20,
    )
    max_auc_drop: float = env_field(
        "FRESHET_VALIDATOR_MAX_AUC_DROP",
        "degraded: AUC on the window below the last good version's minus this",
        0.05,
    )
    max_logloss_ratio: float = env_field(
        "FRESHET_VALIDATOR_MAX_LOGLOSS_RATIO",
        "degraded: log loss on the window above the last good version's times this (0: no log-loss rule)",
        1.5,
    )
    recover_candidates: int = env_field(
        "FRESHET_VALIDATOR_RECOVER",
        "after a degradation, healthy candidates in a row needed before approving again (the last of them is approved)",
        3,
    )
    good_interval_s: float = env_field(
        "FRESHET_VALIDATOR_GOOD_INTERVAL_S", "seconds between promotions of the shadow to last good version", 5.0
    )
    refresh_s: float = env_field(
        "FRESHET_VALIDATOR_REFRESH_S", "seconds between admissions of new samples into the reference window", 0.5
    )
    check_samples: int = env_field(
        "FRESHET_VALIDATOR_CHECK_SAMPLES",
        "new samples gathered before they are checked for admission into the reference window",
        256,
    )
    freeze_rate_rel: float = env_field(
        "FRESHET_VALIDATOR_FREEZE_RATE_REL",
        "freeze the window when new samples' label rate departs from the long-run rate r by more than this "
        "fraction of min(r, 1 - r) (and by FRESHET_VALIDATOR_FREEZE_Z standard errors)",
        0.5,
    )
    freeze_z: float = env_field(
        "FRESHET_VALIDATOR_FREEZE_Z", "standard errors a label-rate departure must also exceed to freeze", 5.0
    )
    freeze_auc_drop: float = env_field(
        "FRESHET_VALIDATOR_FREEZE_AUC_DROP",
        "freeze the window when the last good version's AUC on new samples is this much below its AUC on the window",
        0.15,
    )
    long_run_samples: int = env_field(
        "FRESHET_VALIDATOR_LONG_RUN", "half-life, in admitted samples, of the long-run label rate", 50_000
    )
    rebuild_timeout_s: float = env_field(
        "FRESHET_VALIDATOR_REBUILD_TIMEOUT_S",
        "on start, how long booting the shadow from the latest approved snapshot may take before the "
        "decision stream is replayed from its start instead",
        30.0,
    )
    torch_threads: int = env_field("FRESHET_TORCH_THREADS", "torch intra-op threads for scoring (0: all)", 1)

    def __post_init__(self) -> None:
        sizes = (self.window, self.check_samples, self.min_class, self.long_run_samples, self.recover_candidates)
        if min(sizes) <= 0:
            raise ValueError(
                f"FRESHET_VALIDATOR_WINDOW, _CHECK_SAMPLES, _MIN_CLASS, _LONG_RUN and _RECOVER must be positive, got {sizes}"
            )
        if not 0 < self.max_auc_drop < 1:
            raise ValueError(f"FRESHET_VALIDATOR_MAX_AUC_DROP must be in (0, 1), got {self.max_auc_drop}")
