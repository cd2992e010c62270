"""The publisher streams every table of the model it is given, and refuses settings it cannot honour.

Building the service opens gRPC channels, which need a running event loop: those tests are async."""

from __future__ import annotations

import pytest

from freshet.config import BusConfig
from services.publisher.config import PublisherConfig
from services.publisher.service import PublisherService


async def test_a_model_with_several_tables_streams_each_of_them_on_every_shard():
    config = PublisherConfig(
        store_address="127.0.0.1:1,127.0.0.1:2",
        model_config='{"kind": "deepfm", "dim": 8, "slot_dims": {"1": 16}}',
    )
    service = PublisherService(config, BusConfig())
    assert service.tables == {"fm": 9, "fm_17": 17}
    assert [s.cursors for s in service.shards] == [{"fm": 0, "fm_17": 0}] * 2


async def test_the_default_model_streams_the_default_table():
    service = PublisherService(PublisherConfig(store_address="127.0.0.1:1"), BusConfig())
    assert list(service.tables) == ["fm"]
    assert service.cursor == 0


async def test_a_table_prefix_names_the_streamed_tables():
    config = PublisherConfig(store_address="127.0.0.1:1", model_config='{"kind": "lr", "table_prefix": "ctr"}')
    assert list(PublisherService(config, BusConfig()).tables) == ["ctr"]


def test_an_unknown_delta_encoding_is_a_configuration_error():
    with pytest.raises(ValueError, match="FRESHET_DELTA_ENCODING must be one of"):
        PublisherConfig(store_address="127.0.0.1:1", encoding="bf16")


def test_no_store_shard_is_a_configuration_error():
    with pytest.raises(ValueError, match="FRESHET_STORE_ADDRESS names no store shard"):
        PublisherService(PublisherConfig(store_address=" , "), BusConfig())


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("snapshot_keep", 0, "FRESHET_SNAPSHOT_KEEP must be >= 1"),
        ("max_rows_per_delta", 0, "FRESHET_DELTA_MAX_ROWS must be >= 1"),
        ("interval_s", 0.0, "FRESHET_PUBLISH_INTERVAL_S must be > 0"),
        ("max_lag", -1, "FRESHET_PUBLISH_MAX_LAG must be >= 0"),
    ],
)
def test_out_of_range_settings_are_configuration_errors_naming_them(setting, value, message):
    with pytest.raises(ValueError, match=message):
        PublisherConfig(store_address="127.0.0.1:1", **{setting: value})
