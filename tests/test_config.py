"""Tests of environment-driven config: defaults, parsing per type, overrides and error messages."""

from __future__ import annotations

import dataclasses

import pytest

from freshet.config import BusConfig, ConfigError, describe, env_field, from_env


@dataclasses.dataclass(frozen=True)
class _Settings:
    name: str = env_field("T_NAME", "a required name")
    count: int = env_field("T_COUNT", "how many", 3)
    ratio: float = env_field("T_RATIO", "a fraction", 0.5)
    enabled: bool = env_field("T_ENABLED", "switch", False)
    tags: tuple[str, ...] = env_field("T_TAGS", "comma-separated tags", ("a",))


@dataclasses.dataclass(frozen=True)
class _Unsupported:
    sizes: list[int] = env_field("T_SIZES", "a list the parser does not know", None)


def test_unset_optional_fields_take_their_defaults():
    settings = from_env(_Settings, environ={"T_NAME": "x"})

    assert settings == _Settings(name="x", count=3, ratio=0.5, enabled=False, tags=("a",))


def test_bus_config_defaults_match_a_local_nats_server():
    config = from_env(BusConfig, environ={})

    assert config == BusConfig()
    assert config.nats_url == "nats://127.0.0.1:4222"
    assert config.connect_attempts == 10
    assert config.connect_backoff_s == 2.0


def test_each_field_is_parsed_by_its_annotated_type():
    environ = {"T_NAME": "joiner", "T_COUNT": "42", "T_RATIO": "1e-3", "T_ENABLED": "yes", "T_TAGS": "x, y,,z "}

    settings = from_env(_Settings, environ=environ)

    assert settings.name == "joiner"
    assert settings.count == 42 and isinstance(settings.count, int)
    assert settings.ratio == pytest.approx(0.001) and isinstance(settings.ratio, float)
    assert settings.enabled is True
    assert settings.tags == ("x", "y", "z")


def test_empty_tuple_variable_gives_an_empty_tuple():
    assert from_env(_Settings, environ={"T_NAME": "x", "T_TAGS": ""}).tags == ()


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", " yes ", "On"])
def test_truthy_spellings_parse_to_true(raw):
    assert from_env(_Settings, environ={"T_NAME": "x", "T_ENABLED": raw}).enabled is True


@pytest.mark.parametrize("raw", ["0", "false", "No", "OFF", ""])
def test_falsy_spellings_parse_to_false(raw):
    assert from_env(_Settings, environ={"T_NAME": "x", "T_ENABLED": raw}).enabled is False


def test_bus_config_reads_its_documented_variables():
    environ = {
        "FRESHET_NATS_URL": "nats://a:1,nats://b:2",
        "FRESHET_NATS_CONNECT_ATTEMPTS": "3",
        "FRESHET_NATS_CONNECT_BACKOFF_S": "0.25",
    }

    assert from_env(BusConfig, environ=environ) == BusConfig("nats://a:1,nats://b:2", 3, 0.25)


def test_process_environment_is_read_when_no_mapping_is_given(monkeypatch):
    monkeypatch.setenv("T_NAME", "from-os")
    monkeypatch.setenv("T_COUNT", "9")

    settings = from_env(_Settings)

    assert (settings.name, settings.count) == ("from-os", 9)


def test_overrides_win_over_the_environment_and_are_not_parsed():
    environ = {"T_NAME": "env", "T_COUNT": "1"}

    settings = from_env(_Settings, environ=environ, count=7, tags=("p", "q"))

    assert settings.name == "env"
    assert settings.count == 7
    assert settings.tags == ("p", "q")


def test_an_override_satisfies_a_required_field():
    assert from_env(_Settings, environ={}, name="given").name == "given"


def test_missing_required_field_raises_config_error_naming_the_variable():
    with pytest.raises(ConfigError, match="T_NAME") as info:
        from_env(_Settings, environ={"T_COUNT": "2"})

    assert "a required name" in str(info.value)


def test_bad_int_raises_config_error_naming_variable_and_value():
    with pytest.raises(ConfigError, match=r"T_COUNT='12abc' is not a valid int"):
        from_env(_Settings, environ={"T_NAME": "x", "T_COUNT": "12abc"})


def test_bad_float_raises_config_error_naming_variable_and_value():
    with pytest.raises(ConfigError, match=r"T_RATIO='half' is not a valid float"):
        from_env(_Settings, environ={"T_NAME": "x", "T_RATIO": "half"})


def test_unknown_bool_spelling_raises_config_error_naming_variable_and_value():
    with pytest.raises(ConfigError, match=r"T_ENABLED='maybe' is not a valid bool"):
        from_env(_Settings, environ={"T_NAME": "x", "T_ENABLED": "maybe"})


def test_bad_bus_setting_names_its_freshet_variable():
    with pytest.raises(ConfigError, match="FRESHET_NATS_CONNECT_ATTEMPTS='ten'"):
        from_env(BusConfig, environ={"FRESHET_NATS_CONNECT_ATTEMPTS": "ten"})


def test_unsupported_field_type_set_from_the_environment_raises_config_error():
    with pytest.raises(ConfigError, match="T_SIZES: unsupported config type"):
        from_env(_Unsupported, environ={"T_SIZES": "1,2"})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_config_is_frozen():
    settings = from_env(_Settings, environ={"T_NAME": "x"})

    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.count = 4  # type: ignore[misc]


def test_describe_lists_variable_default_and_doc_of_every_field():
    assert describe(_Settings) == [
        ("T_NAME", "(required)", "a required name"),
        ("T_COUNT", "3", "how many"),
        ("T_RATIO", "0.5", "a fraction"),
        ("T_ENABLED", "False", "switch"),
        ("T_TAGS", "('a',)", "comma-separated tags"),
    ]


def test_describe_covers_every_bus_config_field():
    rows = describe(BusConfig)

    assert [row[0] for row in rows] == [
        "FRESHET_NATS_URL",
        "FRESHET_NATS_CONNECT_ATTEMPTS",
        "FRESHET_NATS_CONNECT_BACKOFF_S",
    ]
    assert all(doc for _, _, doc in rows)
