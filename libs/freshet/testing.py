"""Helpers for freshet's own tests: bounded waiting on a condition instead of bare sleeps."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc


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


class SampleReader:
    """Reads the SAMPLES stream incrementally (a sample message may hold many samples).

    ``await reader.read()`` decodes the messages stored since the previous call; ``ids`` (every
    sample id read, in stream order, duplicates kept), ``labels`` (sample id -> click label) and
    ``batches`` (one decoded ``SampleArrays`` per message) hold everything read so far.
    """

    def __init__(self, js, stream: str = "SAMPLES") -> None:
        self.js = js
        self.stream = stream
        self.next_seq = 1
        self.batches: list = []  # decoded SampleArrays, one per message, in stream order
        self.ids: list[str] = []
        self.labels: dict[str, float] = {}

    async def read(self) -> int:
        """Decodes new messages; returns the number of samples read so far."""
        from freshet.batches import decode_samples

        info = await self.js.stream_info(self.stream)
        for seq in range(max(self.next_seq, info.state.first_seq), info.state.last_seq + 1):
            batch = decode_samples((await self.js.get_msg(self.stream, seq)).data)
            self.batches.append(batch)
            self.ids.extend(batch.sample_ids)
            self.labels.update(zip(batch.sample_ids, batch.labels.tolist(), strict=True))
        self.next_seq = max(self.next_seq, info.state.last_seq + 1)
        return len(self.ids)
