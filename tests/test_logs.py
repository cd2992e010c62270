"""Tests of the JSON log formatter: one object per line with level, message, logger and extra fields."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from freshet.logs import JsonFormatter, setup_logging


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A private logger writing through JsonFormatter("joiner") into a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("joiner"))
    log = logging.getLogger("freshet.tests.logs")
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log, stream
    log.handlers[:] = []


def _records(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_record_is_one_json_object_with_level_msg_logger_and_service(capture):
    log, stream = capture

    log.warning("applied %d rows", 12)

    (record,) = _records(stream)
    assert record["level"] == "warning"
    assert record["msg"] == "applied 12 rows"
    assert record["logger"] == "freshet.tests.logs"
    assert record["service"] == "joiner"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"])


def test_extra_fields_become_top_level_keys(capture):
    log, stream = capture

    log.info("delta published", extra={"sequence": 7, "table": "fm", "ratio": 0.5, "tags": ["a"]})

    record = _records(stream)[0]
    assert (record["sequence"], record["table"], record["ratio"], record["tags"]) == (7, "fm", 0.5, ["a"])


def test_record_attributes_other_than_the_extras_are_left_out(capture):
    log, stream = capture

    log.info("plain")

    assert set(_records(stream)[0]) == {"ts", "level", "logger", "msg", "service"}


def test_extra_values_json_cannot_encode_are_written_as_strings(capture):
    log, stream = capture

    log.info("odd", extra={"where": frozenset({3}), "blob": b"\x00"})

    record = _records(stream)[0]
    assert record["where"] == "frozenset({3})"
    assert record["blob"] == "b'\\x00'"


def test_exception_text_is_included_and_the_record_stays_on_one_line(capture):
    log, stream = capture

    try:
        raise KeyError("missing-table")
    except KeyError:
        log.exception("lookup failed", extra={"table": "fm"})

    assert len(stream.getvalue().splitlines()) == 1
    record = _records(stream)[0]
    assert record["level"] == "error"
    assert record["table"] == "fm"
    assert record["exc"].startswith("Traceback (most recent call last):")
    assert "KeyError: 'missing-table'" in record["exc"]


def test_formatter_without_service_omits_the_service_key():
    record = logging.LogRecord("svc", logging.DEBUG, __file__, 1, "hello %s", ("world",), None)

    out = json.loads(JsonFormatter().format(record))

    assert "service" not in out
    assert (out["level"], out["msg"], out["logger"]) == ("debug", "hello world", "svc")


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("nats").level, logging.getLogger("grpc").level)
    yield
    root.handlers[:], level, nats_level, grpc_level = saved
    root.setLevel(level)
    logging.getLogger("nats").setLevel(nats_level)
    logging.getLogger("grpc").setLevel(grpc_level)


def test_setup_logging_routes_the_root_logger_through_one_json_handler(restore_root_logger, monkeypatch):
    monkeypatch.setenv("FRESHET_LOG_LEVEL", "debug")

    setup_logging("trainer")

    root = logging.getLogger()
    assert len(root.handlers) == 1
    assert isinstance(root.handlers[0].formatter, JsonFormatter)
    assert root.handlers[0].formatter.service == "trainer"
    assert root.level == logging.DEBUG
    assert logging.getLogger("nats").level == logging.WARNING


def test_setup_logging_explicit_level_wins_over_the_environment(restore_root_logger, monkeypatch):
    monkeypatch.setenv("FRESHET_LOG_LEVEL", "debug")

    setup_logging("trainer", level="error")

    assert logging.getLogger().level == logging.ERROR
