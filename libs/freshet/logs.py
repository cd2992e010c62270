"""One JSON log formatter for every service.

Structured fields go in ``extra``: ``logger.info("delta published", extra={"sequence": 7})``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object per line, with the record's extra fields."""

    def __init__(self, service: str = "") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.service:
            out["service"] = self.service
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                # An extra field never overwrites a standard one (ts, level, logger, msg, service).
                out[f"extra_{key}" if key in out else key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(service: str = "", level: str | None = None) -> None:
    """Routes the root logger to stderr as JSON; level from ``FRESHET_LOG_LEVEL`` (default INFO)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("FRESHET_LOG_LEVEL", "INFO")).upper())
    for noisy in ("nats", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
