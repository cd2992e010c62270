"""The validator's gate: shadow + candidate scored on a clean reference window against the last good version."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from freshet.batches import SampleArrays
from freshet.delta import Delta
from freshet.models import ModelConfig, plan
from freshet.replica import Replica
from freshet.synthetic import SyntheticSource
from services.validator.config import ValidatorConfig
from services.validator.gate import Examples, Gate, check_structure, score_replica
from tests.validator_data import CONFIG, flipped, synthetic_samples, train_delta


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def source() -> SyntheticSource:
    return SyntheticSource(CONFIG)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_gate(clock: Clock, **overrides) -> Gate:
    settings = {"window": 4000, "check_samples": 500, "good_interval_s": 10.0, **overrides}
    return Gate(ModelConfig(), ValidatorConfig(**settings), clock=clock)


def fill_window(gate: Gate, source: SyntheticSource, requests: int = 800) -> None:
    gate.observe(synthetic_samples(requests, source, start_ms=1_000_000))
    assert gate.refresh_window()


@pytest.fixture
def trained(source, clock) -> Gate:
    """A gate whose shadow and last good version (version 7) learnt from clean samples, with a full window."""
    gate = make_gate(clock)
    replica = Replica(ModelConfig())
    replica.apply(train_delta(replica, synthetic_samples(1000, source)))
    gate.reset(replica, 7)
    fill_window(gate, source)
    assert gate.window.scoreable and gate.good_scores().auc > 0.65
    return gate


def next_delta(gate: Gate, samples: SampleArrays, sequence: int = 2, steps: int = 20) -> Delta:
    return train_delta(gate.shadow, samples, steps=steps, sequence=sequence)


def test_clean_candidate_is_approved_with_its_measurements(trained, source):
    delta = next_delta(trained, synthetic_samples(200, source, 50_000))
    verdict = trained.evaluate_delta(delta)
    assert verdict.approve, verdict.reason
    assert verdict.metrics["auc"] >= verdict.metrics["good_auc"] - 0.05
    assert {"log_loss", "good_log_loss", "max_abs", "max_row_norm", "window", "score_ms"} <= set(verdict.metrics)
    trained.commit(delta, verdict, version=9)
    assert trained.version == 9 and trained.shadow.shard_sequences[0] == 2
    np.testing.assert_array_equal(trained.shadow.tables["fm"].lookup(delta.fids), delta.values)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_are_rejected_as_a_degradation_opening_a_rollback(trained, source, bad):
    delta = next_delta(trained, synthetic_samples(50, source, 60_000))
    delta.values[3, 1] = bad
    verdict = trained.evaluate_delta(delta)
    assert not verdict.approve and verdict.degraded
    assert "non-finite" in verdict.reason and verdict.metrics["non_finite"] == 1
    assert verdict.rollback_version == 7


def _dense_delta(params: dict[str, np.ndarray]) -> Delta:
    """A dense-parameter delta (shard -1, no rows) carrying ``params``."""
    return Delta("fm", "", -1, 1, 0, 1, np.zeros(0, np.int64), np.zeros((0, 9), np.float32), params)


def test_non_finite_dense_parameters_are_rejected(trained):
    delta = _dense_delta({"bias": np.array([np.nan], np.float32)})
    verdict = trained.evaluate_delta(delta)
    assert not verdict.approve and "dense bias: 1 non-finite" in verdict.reason


def test_dense_parameters_that_do_not_fit_are_rejected_without_a_rollback(trained):
    delta = _dense_delta({"nope": np.ones(2, np.float32)})
    verdict = trained.evaluate_delta(delta)
    assert not verdict.approve and not verdict.degraded and verdict.rollback_version is None
    assert "do not fit" in verdict.reason


def test_value_explosion_is_rejected(trained, source):
    delta = next_delta(trained, synthetic_samples(50, source, 60_000))
    delta.values[0, 0] = 2e4
    verdict = trained.evaluate_delta(delta)
    assert not verdict.approve and verdict.degraded and "max |value|" in verdict.reason


def test_row_norm_explosion_is_rejected_below_the_value_bound():
    config = ValidatorConfig(max_abs_value=1e4, max_row_norm=1e3)
    values = np.zeros((4, 9), np.float32)
    values[2] = 500.0  # every value within bounds, the row's norm 1500 is not
    delta = Delta("fm", "fm", 0, 1, 0, 1, np.arange(4, dtype=np.int64), values)
    reason, degraded, metrics = check_structure(delta, Replica(ModelConfig()), config)
    assert degraded and "row norm 1.5e+03" in reason and metrics["max_row_norm"] == pytest.approx(1500.0)


def test_rows_of_the_wrong_width_are_rejected_as_malformed(trained):
    delta = Delta("fm", "fm", 0, 2, 1, 2, np.arange(3, dtype=np.int64), np.zeros((3, 5), np.float32))
    verdict = trained.evaluate_delta(delta)
    assert not verdict.approve and not verdict.degraded and "5 floats" in verdict.reason


def test_flipped_label_training_drops_auc_and_rolls_back_to_the_last_good_copy(trained, source, clock):
    # Healthy approvals after the last good version (7) move the shadow on to version 9 ...
    good = next_delta(trained, synthetic_samples(200, source, 50_000))
    trained.commit(good, trained.evaluate_delta(good), version=9)
    assert trained.version == 9 and trained.good_version == 7
    # ... then a delta trained on flipped labels arrives.
    poisoned = train_delta(trained.shadow, flipped(synthetic_samples(400, source, 70_000)), steps=40, sequence=3)
    verdict = trained.evaluate_delta(poisoned)
    assert not verdict.approve and verdict.degraded
    assert verdict.metrics["auc"] < verdict.metrics["good_auc"] - 0.05, verdict.metrics
    assert "AUC" in verdict.reason and verdict.rollback_version == 7
    trained.commit(poisoned, verdict, version=10)
    assert trained.degraded and trained.version == 7 and trained.rollbacks == 1
    fids = trained.window.examples.fids
    np.testing.assert_array_equal(trained.shadow.tables["fm"].lookup(fids), trained.good.tables["fm"].lookup(fids))
    # Still poisoned: rejected again, but one rollback per episode.
    again = trained.evaluate_delta(dataclasses.replace(poisoned, sequence=4))
    assert not again.approve and again.rollback_version is None


def test_candidates_are_approved_again_after_enough_healthy_ones_in_a_row(trained, source):
    poisoned = train_delta(trained.shadow, flipped(synthetic_samples(400, source, 70_000)), steps=40, sequence=2)
    trained.commit(poisoned, trained.evaluate_delta(poisoned), version=8)
    assert trained.degraded and trained.rollbacks == 1
    verdicts = []
    for i, sequence in enumerate((3, 4, 5)):
        healthy = next_delta(trained, synthetic_samples(100, source, 80_000 + 1000 * i), sequence=sequence)
        verdicts.append(trained.evaluate_delta(healthy))
        trained.commit(healthy, verdicts[-1], version=10 + i)
    assert [v.approve for v in verdicts] == [False, False, True], [v.reason for v in verdicts]
    assert verdicts[0].recovering and "1 of 3 healthy" in verdicts[0].reason and not verdicts[0].degraded
    assert not trained.degraded and trained.version == 12 and trained.shadow.shard_sequences[0] == 5


def test_one_rollback_per_episode_even_when_healthy_and_poisoned_candidates_alternate(trained, source):
    bias = trained.shadow.model.state_dict()["bias"].numpy()
    for i in range(3):
        poisoned = train_delta(trained.shadow, flipped(synthetic_samples(400, source, 70_000 + i)), steps=40)
        poisoned = dataclasses.replace(poisoned, sequence=2 + i)
        verdict = trained.evaluate_delta(poisoned)
        assert not verdict.approve and verdict.degraded
        trained.commit(poisoned, verdict, version=20 + 2 * i)
        dense = Delta(
            "fm", "", -1, 1 + i, 0, 0, np.zeros(0, np.int64), np.zeros((0, 9), np.float32), {"bias": bias}
        )
        verdict = trained.evaluate_delta(dense)
        assert verdict.recovering and not verdict.approve
        trained.commit(dense, verdict, version=21 + 2 * i)
    assert trained.rollbacks == 1 and trained.version == 7


def test_one_healthy_candidate_ends_the_episode_when_recovery_needs_one(source, clock):
    gate = make_gate(clock, recover_candidates=1)
    replica = Replica(ModelConfig())
    replica.apply(train_delta(replica, synthetic_samples(1000, source)))
    gate.reset(replica, 7)
    fill_window(gate, source)
    poisoned = train_delta(gate.shadow, flipped(synthetic_samples(400, source, 70_000)), steps=40, sequence=2)
    gate.commit(poisoned, gate.evaluate_delta(poisoned), version=8)
    healthy = next_delta(gate, synthetic_samples(100, source, 80_000), sequence=3)
    assert gate.evaluate_delta(healthy).approve


def test_a_quiet_shadow_is_promoted_once_the_interval_passed(trained, source, clock):
    delta = next_delta(trained, synthetic_samples(200, source, 50_000))
    trained.commit(delta, trained.evaluate_delta(delta), version=9)
    assert not trained.maybe_promote() and trained.good_version == 7
    clock.now += 11
    assert trained.maybe_promote() and trained.good_version == 9
    assert not trained.maybe_promote()  # nothing new since


def test_log_loss_explosion_is_a_degradation_even_when_ranking_survives(trained):
    # A dense bias of +8 keeps every ranking (AUC unchanged) but predicts ~1.0 for everything.
    delta = Delta(
        "fm",
        "",
        -1,
        1,
        0,
        1,
        np.zeros(0, np.int64),
        np.zeros((0, 9), np.float32),
        {"bias": np.array([8.0], np.float32)},
    )
    verdict = trained.evaluate_delta(delta)
    assert not verdict.approve and "log loss" in verdict.reason
    assert verdict.metrics["auc"] == pytest.approx(verdict.metrics["good_auc"], abs=1e-3)


def test_last_good_version_is_promoted_after_the_interval_while_healthy(trained, source, clock):
    delta = next_delta(trained, synthetic_samples(200, source, 50_000))
    trained.commit(delta, trained.evaluate_delta(delta), version=9)
    assert trained.good_version == 7  # within the interval
    clock.now += 11
    delta = next_delta(trained, synthetic_samples(200, source, 90_000), sequence=3)
    verdict = trained.evaluate_delta(delta)
    trained.commit(delta, verdict, version=12)
    assert trained.good_version == 12
    np.testing.assert_array_equal(trained.good.tables["fm"].lookup(delta.fids), delta.values)
    assert trained.good_scores().auc == pytest.approx(verdict.metrics["auc"])


def test_a_delta_outside_the_window_scores_as_the_shadow(trained):
    far = np.arange(10**15, 10**15 + 5, dtype=np.int64)  # fids no window sample has
    delta = Delta("fm", "fm", 0, 2, 1, 2, far, np.full((5, 9), 0.3, np.float32))
    verdict = trained.evaluate_delta(delta)
    assert verdict.approve and verdict.metrics["auc"] == pytest.approx(trained.shadow_scores().auc)


def test_window_freezes_under_a_label_rate_burst_and_thaws_on_clean_samples(source, clock):
    gate = make_gate(clock)
    fill_window(gate, source)
    generation, rate = gate.window.generation, gate.window.label_rate
    gate.observe(flipped(synthetic_samples(200, source, 2_000_000)))
    assert not gate.refresh_window()
    assert gate.window.frozen and "label rate" in gate.window.freeze_reason
    assert gate.window.generation == generation and gate.window.frozen_samples == 1000
    assert gate.window.label_rate == rate  # the burst never reaches the long-run rate either
    gate.observe(synthetic_samples(200, source, 3_000_000))
    assert gate.refresh_window() and not gate.window.frozen


def test_window_freezes_when_the_last_good_version_scores_new_samples_badly(trained, source):
    # Same label rate, labels moved onto the samples the last good version thinks least likely.
    samples = synthetic_samples(200, source, 2_000_000)
    examples = Examples.of_samples(samples)
    scores = score_replica(trained.good, plan(examples.fids, examples.lengths, trained.model_config))
    labels = np.zeros_like(samples.labels)
    labels[np.argsort(scores)[: int(samples.labels.sum())]] = 1.0
    inverted = SampleArrays(**{**samples.__dict__, "labels": labels})
    generation = trained.window.generation
    trained.observe(inverted)
    assert not trained.refresh_window()
    assert trained.window.frozen and "AUC" in trained.window.freeze_reason
    assert trained.window.generation == generation


def test_pending_samples_wait_until_enough_arrived(source, clock):
    gate = make_gate(clock, check_samples=2000)
    gate.observe(synthetic_samples(100, source))
    assert not gate.refresh_window() and len(gate.window) == 0 and gate.window.pending == 500


def test_window_keeps_the_newest_samples(source, clock):
    gate = make_gate(clock, window=1000, check_samples=100)
    first, second = synthetic_samples(150, source), synthetic_samples(100, source, 500_000)
    gate.observe(first)
    gate.refresh_window()
    gate.observe(second)
    gate.refresh_window()
    assert len(gate.window) == 1000
    np.testing.assert_array_equal(gate.window.examples.labels[-500:], second.labels)


def test_label_updates_are_left_out_of_the_window(source):
    samples = synthetic_samples(10, source)
    versions = np.ones(len(samples), np.int32)
    versions[::2] = 2
    examples = Examples.of_samples(SampleArrays(**{**samples.__dict__, "versions": versions}))
    assert len(examples) == 25 and int(examples.lengths.sum()) == len(examples.fids)
    np.testing.assert_array_equal(examples.labels, samples.labels[1::2])


@pytest.mark.parametrize("setting", [{"window": 0}, {"recover_candidates": 0}, {"max_auc_drop": 1.5}])
def test_config_refuses_settings_that_cannot_work(setting):
    with pytest.raises(ValueError, match="FRESHET_VALIDATOR_"):
        ValidatorConfig(**setting)
