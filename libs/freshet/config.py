"""Frozen config dataclasses read from the environment.

Every field names its environment variable and documents itself through field metadata::

    @dataclass(frozen=True)
    class JoinerConfig:
        nats_url: str = env_field("FRESHET_NATS_URL", "NATS server URL", default="nats://127.0.0.1:4222")

A field without a default is required: ``from_env`` fails at start-up with a message naming
the variable. Values are parsed by the field's annotated type (str, int, float, bool, tuple[str, ...]).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A setting is missing or cannot be parsed; the message names the variable."""


def env_field(env: str, doc: str, default: Any = dataclasses.MISSING) -> Any:
    """Declares a config field bound to environment variable ``env``."""
    return dataclasses.field(default=default, metadata={"env": env, "doc": doc})


def _parse(raw: str, kind: Any, env: str) -> Any:
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is str:
            return raw
        if typing.get_origin(kind) is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"{env}={raw!r} is not a valid {getattr(kind, '__name__', kind)}: {exc}") from None
    raise ConfigError(f"{env}: unsupported config type {kind!r}")


def from_env(cls: type[T], environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Builds config ``cls`` from the environment; ``overrides`` win over the environment.

    Raises:
        ConfigError: a required variable is unset or a value does not parse.
    """
    environ = os.environ if environ is None else environ
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{cls.__name__} has no settings {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        env = field.metadata.get("env")
        if field.name in overrides:
            values[field.name] = overrides[field.name]
        elif env and env in environ:
            values[field.name] = _parse(environ[env], hints[field.name], env)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"required setting {env or field.name} is not set ({field.metadata.get('doc', '')})")
    return cls(**values)


def describe(cls: type) -> list[tuple[str, str, str]]:
    """Returns (variable, default, doc) for every field: the source of the READMEs' config tables."""
    rows = []
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "(required)"
        rows.append((field.metadata.get("env", field.name), default, field.metadata.get("doc", "")))
    return rows


@dataclasses.dataclass(frozen=True)
class BusConfig:
    """NATS connection settings shared by every service."""

    nats_url: str = env_field("FRESHET_NATS_URL", "NATS server URL(s), comma separated", "nats://127.0.0.1:4222")
    connect_attempts: int = env_field("FRESHET_NATS_CONNECT_ATTEMPTS", "connection attempts before giving up", 10)
    connect_backoff_s: float = env_field("FRESHET_NATS_CONNECT_BACKOFF_S", "max backoff between attempts", 2.0)
