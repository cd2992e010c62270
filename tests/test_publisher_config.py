"""The publisher refuses a model it cannot serve completely, instead of streaming part of it."""

from __future__ import annotations

import pytest

from freshet.config import BusConfig
from services.publisher.config import PublisherConfig
from services.publisher.service import PublisherService


def test_a_model_with_several_tables_is_a_configuration_error_naming_them():
    config = PublisherConfig(
        store_address="127.0.0.1:1", model_config='{"kind": "deepfm", "dim": 8, "slot_dims": {"1": 16}}'
    )
    with pytest.raises(ValueError, match=r"has tables \['fm', 'fm_17'\]"):
        PublisherService(config, BusConfig())


def test_the_default_model_streams_the_default_table():
    service = PublisherService(PublisherConfig(store_address="127.0.0.1:1"), BusConfig())
    assert service.config.table == "fm"


def test_an_unknown_delta_encoding_is_a_configuration_error():
    with pytest.raises(ValueError, match="FRESHET_DELTA_ENCODING must be one of"):
        PublisherConfig(store_address="127.0.0.1:1", encoding="bf16")
