"""The validator's quality gate, without NATS: a shadow replica, a clean reference window and the last good version.

- The **shadow** is a ``Replica`` holding exactly the approved state: every delta the gate approves
  is applied to it, and a rollback resets it to the last good copy.
- The **reference window** (``ReferenceWindow``) holds the newest ``FRESHET_VALIDATOR_WINDOW``
  samples that looked clean when they arrived; new samples wait in a pending batch and are admitted
  (every ``FRESHET_VALIDATOR_REFRESH_S``) only when their label rate and the last good version's AUC
  on them agree with the long-run picture. Otherwise the window is *frozen*: poisoned input never
  becomes the yardstick that poisoned deltas are measured with.
- The **last good version** is a copy of the shadow, its version (the MODEL stream sequence of its
  last approval) and its scores on the window; it is refreshed from the shadow every
  ``FRESHET_VALIDATOR_GOOD_INTERVAL_S`` while candidates stay healthy.

A candidate delta is judged as shadow + delta: finite values, bounded values and row norms, and,
once the window holds ``FRESHET_VALIDATOR_MIN_CLASS`` positives and negatives, its AUC and log loss
on the window against the last good version's on the same window. Scoring is one batched forward
pass over the window; a delta that touches none of the window's fids and carries no dense
parameters scores exactly as the shadow does, so that score is reused.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from freshet.batches import SampleArrays
from freshet.delta import Delta
from freshet.metrics import auc, log_loss
from freshet.models import BatchPlan, ModelConfig, plan, pool
from freshet.replica import Replica
from services.validator.config import ValidatorConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Examples:
    """Click-labelled examples in the lengths + values layout: example ``i`` owns a run of ``lengths[i]`` fids."""

    fids: np.ndarray  # int64 [T]
    lengths: np.ndarray  # int64 [B]
    labels: np.ndarray  # float32 [B], the click label

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def positives(self) -> int:
        return int((self.labels > 0.5).sum())

    @staticmethod
    def empty() -> Examples:
        return Examples(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

    @staticmethod
    def of_samples(batch: SampleArrays) -> Examples:
        """The first labels of a decoded batch; label updates (version > 1) repeat a click label, so they are left out."""
        lengths = batch.lengths.astype(np.int64)
        first = batch.versions <= 1
        if first.all():
            return Examples(batch.fids.astype(np.int64), lengths, batch.labels.astype(np.float32))
        return Examples(
            batch.fids[np.repeat(first, lengths)].astype(np.int64),
            lengths[first],
            batch.labels[first].astype(np.float32),
        )

    @staticmethod
    def concat(parts: Sequence[Examples]) -> Examples:
        if not parts:
            return Examples.empty()
        return Examples(
            np.concatenate([p.fids for p in parts]),
            np.concatenate([p.lengths for p in parts]),
            np.concatenate([p.labels for p in parts]),
        )

    def tail(self, n: int) -> Examples:
        """The last ``n`` examples."""
        if n >= len(self):
            return self
        skip = len(self) - n
        start = int(self.lengths[:skip].sum())
        return Examples(self.fids[start:], self.lengths[skip:], self.labels[skip:])


@dataclass(frozen=True)
class Scores:
    """How one model version scores a set of examples."""

    auc: float | None  # None: one class only
    log_loss: float
    finite: bool


def score_replica(
    replica: Replica, batch: BatchPlan, overlay: Delta | None = None, model: torch.nn.Module | None = None
) -> np.ndarray:
    """Click probabilities float32 [B] of a planned batch under ``replica`` with ``overlay``'s rows on top.

    Args:
        replica: the rows and dense network scored.
        batch: ``plan`` of the examples with the replica's model config.
        overlay: a candidate delta whose rows replace the replica's for its table (not applied).
        model: the dense network to use instead of the replica's (a candidate's dense parameters).
    """
    rows = {}
    for name, table in batch.tables.items():
        values = replica.tables[name].lookup(table.fids)
        if overlay is not None and overlay.table == name and len(overlay.fids):
            order = np.argsort(overlay.fids, kind="stable")
            ordered = overlay.fids[order]
            at = np.minimum(np.searchsorted(ordered, table.fids), len(ordered) - 1)
            hit = ordered[at] == table.fids
            values[hit] = overlay.values[order[at[hit]]]
        rows[name] = torch.from_numpy(values)
    with torch.no_grad():
        logits = (model or replica.model)(pool(batch, rows))
    return torch.sigmoid(logits[:, 0]).numpy()


def measure(probs: np.ndarray, labels: np.ndarray) -> Scores:
    finite = bool(np.isfinite(probs).all())
    if not finite:
        return Scores(None, float("inf"), False)
    return Scores(auc(probs, labels), log_loss(probs, labels), True)


def dense_misfit(replica: Replica, dense: dict[str, np.ndarray]) -> str | None:
    """Why dense parameters do not fit the replica's network, or None."""
    own = replica.model.state_dict()
    unknown = sorted(set(dense) - set(own))
    wrong = sorted(k for k in dense if k in own and tuple(own[k].shape) != tuple(np.shape(dense[k])))
    if unknown or wrong:
        return f"dense parameters do not fit the model ({replica.config.kind}): unknown {unknown}, wrong shape {wrong}"
    return None


def check_structure(delta: Delta, replica: Replica, config: ValidatorConfig) -> tuple[str | None, bool, dict]:
    """Checks one delta (or snapshot chunk) on its own: shape, finiteness and norms.

    Returns:
        (why it must not be served or None, whether that is a degradation rather than a malformed
        delta, metrics: max_abs and max_row_norm).
    """
    metrics: dict[str, float] = {"rows": float(len(delta.fids))}
    table = replica.tables.get(delta.table)
    if len(delta.fids) and table is None:
        return f"delta for table {delta.table!r}; this model's tables are {sorted(replica.tables)}", False, metrics
    if len(delta.fids) and delta.values.shape[1] != table.width:
        return (
            f"delta rows have {delta.values.shape[1]} floats, table {delta.table!r} has {table.width}",
            False,
            metrics,
        )
    if delta.dense and (misfit := dense_misfit(replica, delta.dense)):
        return misfit, False, metrics
    arrays = {"values": delta.values, **{f"dense {k}": v for k, v in delta.dense.items()}}
    max_abs = 0.0
    for name, array in arrays.items():
        if not array.size:
            continue
        finite = np.isfinite(array)
        if not finite.all():
            metrics["non_finite"] = float((~finite).sum())
            return f"{name}: {int((~finite).sum())} non-finite values", True, metrics
        max_abs = max(max_abs, float(np.abs(array).max()))
    metrics["max_abs"] = max_abs
    if max_abs > config.max_abs_value:
        return f"max |value| {max_abs:.3g} exceeds {config.max_abs_value:.3g}", True, metrics
    if len(delta.fids):
        norm = float(np.sqrt(np.einsum("ij,ij->i", delta.values, delta.values, dtype=np.float64)).max())
        metrics["max_row_norm"] = norm
        if norm > config.max_row_norm:
            return f"max row norm {norm:.3g} exceeds {config.max_row_norm:.3g}", True, metrics
    return None, False, metrics


class ReferenceWindow:
    """The newest samples that looked clean, plus the long-run label rate of everything admitted.

    New samples wait in a pending batch. ``refresh`` checks a pending batch of at least
    ``check_samples`` and either admits it (the window keeps its newest ``window`` samples) or drops
    it and *freezes* the window when:

    - its label rate departs from the long-run rate by more than ``freeze_rate_rel`` of
      min(rate, 1 - rate) and by more than ``freeze_z`` standard errors (a flipped-label burst turns
      a 4 % click rate into 96 %); or
    - the last good version's AUC on it is more than ``freeze_auc_drop`` below its AUC on the window
      (labels flipped without changing their rate).

    The window thaws as soon as a pending batch passes both checks again. Until the long run holds
    ``check_samples`` samples, batches are admitted unchecked: the window must start on clean data.
    """

    def __init__(self, config: ValidatorConfig) -> None:
        self.config = config
        self.examples = Examples.empty()
        self.generation = 0  # bumped whenever the window's contents change
        self._pending: list[Examples] = []
        self._pending_n = 0
        self._long_pos = 0.0
        self._long_n = 0.0
        self.frozen = False
        self.freeze_reason = ""
        self.freezes = 0
        self.frozen_samples = 0
        self.admitted = 0

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def label_rate(self) -> float | None:
        """The long-run click rate of admitted samples (exponentially decayed), None before any."""
        return self._long_pos / self._long_n if self._long_n else None

    @property
    def pending(self) -> int:
        return self._pending_n

    def offer(self, examples: Examples) -> None:
        """Queues new samples for the next ``refresh``; at most a window's worth wait (the newest)."""
        if not len(examples):
            return
        self._pending.append(examples)
        self._pending_n += len(examples)
        while self._pending_n - len(self._pending[0]) >= self.config.window:
            self._pending_n -= len(self._pending.pop(0))

    def suspicion(
        self, pending: Examples, auc_on_pending: float | None, auc_on_window: float | None
    ) -> str | None:
        """Why ``pending`` must not enter the window, or None."""
        cfg = self.config
        if self._long_n >= cfg.check_samples:
            rate = self._long_pos / self._long_n
            new = pending.positives / len(pending)
            floor = 0.5 / self._long_n  # a long run without positives still has a finite standard error
            spread = min(max(rate, floor), max(1.0 - rate, floor))
            stderr = math.sqrt(spread * (1.0 - spread) / len(pending))
            departure = abs(new - rate)
            if departure > cfg.freeze_rate_rel * spread and departure > cfg.freeze_z * stderr:
                return f"label rate {new:.4f} of {len(pending)} new samples departs from the long-run {rate:.4f}"
        if auc_on_pending is not None and auc_on_window is not None:
            if auc_on_pending < auc_on_window - cfg.freeze_auc_drop:
                return (
                    f"the last good version's AUC on {len(pending)} new samples is {auc_on_pending:.4f}, "
                    f"{auc_on_window:.4f} on the window"
                )
        return None

    def refresh(self, good_auc: Callable[[Examples], tuple[float | None, float | None]]) -> bool:
        """Checks the pending batch and admits it or freezes; returns whether the window changed.

        Args:
            good_auc: (AUC of the last good version on the given examples, its AUC on the window);
                either None when it cannot be measured.
        """
        if self._pending_n < self.config.check_samples:
            return False
        pending = Examples.concat(self._pending)
        self._pending, self._pending_n = [], 0
        reason = None
        if self._long_n >= self.config.check_samples:
            reason = self.suspicion(pending, *self._class_guarded(pending, good_auc))
        if reason is not None:
            if not self.frozen:
                self.freezes += 1
                logger.warning("reference window frozen", extra={"reason": reason, "window": len(self)})
            self.frozen, self.freeze_reason = True, reason
            self.frozen_samples += len(pending)
            return False
        if self.frozen:
            logger.info("reference window thawed", extra={"frozen_samples": self.frozen_samples})
        self.frozen, self.freeze_reason = False, ""
        self.examples = Examples.concat([self.examples, pending]).tail(self.config.window)
        decay = 0.5 ** (len(pending) / self.config.long_run_samples)
        self._long_pos = self._long_pos * decay + pending.positives
        self._long_n = self._long_n * decay + len(pending)
        self.admitted += len(pending)
        self.generation += 1
        return True

    def _class_guarded(self, pending: Examples, good_auc) -> tuple[float | None, float | None]:
        # An AUC over a handful of positives is noise: only compare when both sets have enough of each class.
        need = self.config.min_class
        if min(pending.positives, len(pending) - pending.positives) < need or not self.scoreable:
            return None, None
        return good_auc(pending)

    @property
    def scoreable(self) -> bool:
        """Whether the window holds enough positives and negatives for an AUC."""
        pos = self.examples.positives
        return min(pos, len(self.examples) - pos) >= self.config.min_class


@dataclass
class Verdict:
    """The gate's judgement of one candidate."""

    approve: bool
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    degraded: bool = False  # a quality or norm failure, not merely a malformed candidate
    rollback_version: int | None = None  # first failure of an episode: roll back to this version
    generation: int = -1  # the reference window's generation it was scored on
    recovering: bool = False  # healthy, but held back until enough healthy candidates in a row


class Gate:
    """Judges candidates against the last good version and keeps the shadow, the window and the last good copy.

    The service calls ``evaluate_delta`` (no state change), publishes the decision, then ``commit``
    with the decision's stream sequence, so the gate's versions are the decision stream's.
    """

    def __init__(
        self, model_config: ModelConfig, config: ValidatorConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.model_config = model_config
        self.config = config
        self.clock = clock
        self.window = ReferenceWindow(config)
        self.shadow = Replica(model_config)
        self.version = 0
        self.degraded = False  # in a degradation episode: from the first failure until candidates recover
        self.healthy_streak = 0  # healthy candidates in a row within the episode
        self.rollbacks = 0
        self.reset(self.shadow, 0)

    def reset(self, shadow: Replica, version: int) -> None:
        """Takes ``shadow`` at ``version`` as the approved state and as the last good version (start, restart)."""
        self.shadow, self.version = shadow, version
        self._promote()

    def _promote(self) -> None:
        self.good = copy.deepcopy(self.shadow)
        self.good_version = self.version
        self.good_at = self.clock()
        self._good_scores: tuple[int, Scores] | None = None
        self._shadow_scores: tuple[tuple[int, int], Scores] | None = None
        logger.info("last good version", extra={"version": self.good_version})

    # -- samples ---------------------------------------------------------------------------------

    def observe(self, batch: SampleArrays) -> None:
        """Offers newly arrived samples to the reference window (admitted at the next ``refresh_window``)."""
        self.window.offer(Examples.of_samples(batch))

    def refresh_window(self) -> bool:
        """Admits or freezes the pending samples; returns whether the window changed."""

        def good_auc(pending: Examples) -> tuple[float | None, float | None]:
            probs = score_replica(self.good, plan(pending.fids, pending.lengths, self.model_config))
            return measure(probs, pending.labels).auc, self.good_scores().auc

        return self.window.refresh(good_auc)

    def _plan(self) -> BatchPlan:
        cached = getattr(self, "_plan_cache", None)
        if cached is None or cached[0] != self.window.generation:
            ex = self.window.examples
            self._plan_cache = (self.window.generation, plan(ex.fids, ex.lengths, self.model_config))
        return self._plan_cache[1]

    def good_scores(self) -> Scores:
        """The last good version's scores on the current window (cached per window generation)."""
        if self._good_scores is None or self._good_scores[0] != self.window.generation:
            probs = score_replica(self.good, self._plan())
            self._good_scores = (self.window.generation, measure(probs, self.window.examples.labels))
        return self._good_scores[1]

    def _scores(self, replica: Replica, overlay: Delta | None = None) -> Scores:
        model = None
        if overlay is not None and overlay.dense:
            model = copy.deepcopy(replica.model)
            model.load_state_dict(
                {k: torch.from_numpy(np.array(v, np.float32)) for k, v in overlay.dense.items()}, strict=False
            )
        return measure(score_replica(replica, self._plan(), overlay, model), self.window.examples.labels)

    def _touches_window(self, delta: Delta) -> bool:
        if delta.dense:
            return True
        table = self._plan().tables.get(delta.table)
        return table is not None and bool(np.isin(delta.fids, table.fids, assume_unique=False).any())

    def shadow_scores(self) -> Scores:
        key = (self.window.generation, self.version)
        if self._shadow_scores is None or self._shadow_scores[0] != key:
            self._shadow_scores = (key, self._scores(self.shadow))
        return self._shadow_scores[1]

    # -- judging ---------------------------------------------------------------------------------

    def evaluate_delta(self, delta: Delta) -> Verdict:
        """Judges shadow + delta; changes nothing (see ``commit``)."""
        started = time.perf_counter()
        reason, degraded, metrics = check_structure(delta, self.shadow, self.config)
        if reason is None:
            touches = self.window.scoreable and self._touches_window(delta)
            scores = self._scores(self.shadow, delta) if touches else None
            reason = self._judge(scores, metrics)
            degraded = reason is not None
        metrics["score_ms"] = (time.perf_counter() - started) * 1e3
        return self._verdict(reason, degraded, metrics)

    def evaluate_replica(self, replica: Replica, metrics: dict[str, float] | None = None) -> Verdict:
        """Judges a whole replica (a snapshot) against the last good version; never opens a rollback."""
        started = time.perf_counter()
        metrics = dict(metrics or {})
        reason = self._judge(self._scores(replica), metrics)
        metrics["score_ms"] = (time.perf_counter() - started) * 1e3
        return Verdict(reason is None, reason or "", metrics, degraded=reason is not None)

    def _judge(self, scores: Scores | None, metrics: dict[str, float]) -> str | None:
        """Compares a candidate's scores (None: the same as the shadow's) with the last good version's."""
        window = self.window
        metrics.update(
            window=float(len(window)), frozen=float(window.frozen), good_version=float(self.good_version)
        )
        if window.label_rate is not None:
            metrics["label_rate"] = window.label_rate
        if not window.scoreable:
            return None  # too few positives or negatives yet for an AUC: structural checks only
        if scores is None:
            scores = self.shadow_scores()
        good = self.good_scores()
        metrics.update(log_loss=scores.log_loss, good_log_loss=good.log_loss)
        if scores.auc is not None:
            metrics["auc"] = scores.auc
        if good.auc is not None:
            metrics["good_auc"] = good.auc
        if not scores.finite:
            return "non-finite scores on the reference window"
        cfg = self.config
        if scores.auc is not None and good.auc is not None and scores.auc < good.auc - cfg.max_auc_drop:
            return (
                f"AUC {scores.auc:.4f} on the reference window is more than {cfg.max_auc_drop} below "
                f"the last good version's {good.auc:.4f} (version {self.good_version})"
            )
        if cfg.max_logloss_ratio > 0 and scores.log_loss > good.log_loss * cfg.max_logloss_ratio:
            return (
                f"log loss {scores.log_loss:.4f} on the reference window is more than {cfg.max_logloss_ratio}x "
                f"the last good version's {good.log_loss:.4f} (version {self.good_version})"
            )
        return None

    def _verdict(self, reason: str | None, degraded: bool, metrics: dict[str, float]) -> Verdict:
        verdict = Verdict(reason is None, reason or "", metrics, degraded, generation=self.window.generation)
        if degraded and not self.degraded:
            verdict.rollback_version = self.good_version
        need = self.config.recover_candidates
        if verdict.approve and self.degraded and self.healthy_streak + 1 < need:
            # One healthy candidate between poisoned ones (say, a dense delta barely moved by the burst)
            # does not end the episode: approving it would make predictors flap between versions.
            streak = self.healthy_streak + 1
            metrics["healthy_streak"] = float(streak)
            verdict.approve, verdict.recovering = False, True
            verdict.reason = f"recovering from a degradation: {streak} of {need} healthy candidates in a row"
        return verdict

    def commit(self, delta: Delta, verdict: Verdict, version: int) -> None:
        """Records a published decision: an approval is applied to the shadow at ``version``; the first
        degradation of an episode resets the shadow to the last good copy (the ROLLBACK was published)."""
        if verdict.approve:
            self.shadow.apply(delta)
            self.version = self.shadow.version = version
            if self.degraded:
                logger.info("candidates healthy again: approving", extra={"version": version})
            self.degraded, self.healthy_streak = False, 0
            if "auc" in verdict.metrics and verdict.generation == self.window.generation:
                # The candidate's scores are now the shadow's: no need to score it again.
                scores = Scores(verdict.metrics["auc"], verdict.metrics["log_loss"], True)
                self._shadow_scores = ((self.window.generation, version), scores)
            self.maybe_promote()
            return
        if verdict.recovering:
            self.healthy_streak += 1
            return
        if verdict.rollback_version is not None:
            self.rollbacks += 1
            self.shadow = copy.deepcopy(self.good)
            self.version = self.good_version
            self._shadow_scores = None
        if verdict.degraded:
            self.degraded = True
            self.healthy_streak = 0

    def maybe_promote(self) -> bool:
        """Makes the shadow the last good version when it moved on, candidates are healthy and
        ``good_interval_s`` passed since the last promotion; returns whether it did.

        Called after each approval and periodically, so a quiet stream still gets its last good version.
        """
        if self.degraded or self.version == self.good_version:
            return False
        if self.clock() - self.good_at < self.config.good_interval_s:
            return False
        if self.window.scoreable:
            now, good = self.shadow_scores().auc, self.good_scores().auc
            # Promotion needs the shadow within half the allowed drop, so slow drift cannot ratchet the
            # yardstick down by the full allowance every interval.
            if now is not None and good is not None and now < good - self.config.max_auc_drop / 2:
                return False
        self._promote()
        return True
