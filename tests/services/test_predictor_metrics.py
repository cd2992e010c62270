"""The predictor's OpenTelemetry gauges read the follower's served version and counters."""

from __future__ import annotations

from types import SimpleNamespace

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from freshet.follower import FollowerStats
from freshet.models import ModelConfig
from freshet.replica import Replica
from services.predictor.service import register_metrics


def test_gauges_report_the_served_version_position_rows_and_every_follower_counter():
    follower = SimpleNamespace(
        version=42, position=45, replica=Replica(ModelConfig()), stats=FollowerStats(gaps=2)
    )
    reader = InMemoryMetricReader()
    register_metrics(MeterProvider(metric_readers=[reader]).get_meter("test"), follower)
    follower.stats.rollbacks = 1  # read when collected, not when registered

    (scope,) = reader.get_metrics_data().resource_metrics[0].scope_metrics
    values = {m.name.removeprefix("freshet.predictor."): m.data.data_points[0].value for m in scope.metrics}

    assert values["version"] == 42 and values["decision_position"] == 45 and values["rows"] == 0
    assert values["gaps"] == 2 and values["rollbacks"] == 1 and values["resyncs"] == 0
    assert set(FollowerStats.__dataclass_fields__) <= set(values)
