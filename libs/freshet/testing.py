"""Helpers for freshet's own tests: bounded waiting on a condition instead of bare sleeps."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from freshet.batches import SampleReader  # noqa: F401 - tests read samples through it


async def assert_eventually(
    condition: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05, message: str = ""
) -> Any:
    """Polls ``condition`` (sync or async) until it returns a truthy value, which is returned.

    Raises:
        AssertionError: the condition stayed falsy for ``timeout_s``; the last value or
            exception is in the message.
    """
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = condition()
            if inspect.isawaitable(last):
                last = await last
            if last:
                return last
        except AssertionError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout_s}s: {message} (last: {last!r})")
        await asyncio.sleep(interval_s)


async def code_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    """Awaits a gRPC call that must fail; returns its status code and details.

    Raises:
        AssertionError: the call succeeded.
    """
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("the gRPC call succeeded; an error status was expected")


def data_dir() -> Path:
    """Where tests find the public datasets (never shipped: their licences forbid it).

    ``$FRESHET_DATA_DIR`` when set; else ``shared/data`` beside the checkout, else the workplace's
    ``/work/shared/data``. Tests skip what is not there.
    """
    if env := os.environ.get("FRESHET_DATA_DIR"):
        return Path(env)
    beside = Path(__file__).resolve().parents[3] / "shared" / "data"
    return beside if beside.is_dir() else Path("/work/shared/data")


def start_service(service: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Runs ``python -m services.<service>`` as a real process with env, appending its output to log."""
    out = open(log, "ab")  # noqa: SIM115 - the child writes it; closed when the child's copy is
    try:
        return subprocess.Popen([sys.executable, "-m", f"services.{service}"], env=env, stdout=out, stderr=out)
    finally:
        out.close()
