"""Lifecycle shared by every service: ``async with`` components, signals, ordered shutdown.

A service subclasses ``Service`` and implements ``_start`` / ``_stop``. ``run_service`` wires
logging, tracing and SIGTERM/SIGINT to an ``asyncio.Event``; on the event the service shuts
down in the order health NOT_SERVING -> drain NATS -> stop gRPC with grace -> flush state.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from freshet import bus, telemetry
from freshet.config import BusConfig, ConfigError
from freshet.logs import setup_logging

logger = logging.getLogger(__name__)


class Service:
    """Base of every long-lived component: ``async with`` support and a safe-to-repeat ``shutdown``.

    Subclasses set up connections in ``_start`` and launch background work with ``spawn``;
    ``_stop`` runs after the background tasks have been asked to stop.
    """

    name = "service"

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._started = False
        self._stopped = False
        self.failed: BaseException | None = None

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self._start()
        logger.info("service started", extra={"service": self.name})

    async def shutdown(self) -> None:
        """Stops background tasks, then the service's resources. Safe to call twice."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        self.stopping.set()
        await self._before_drain()
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=3.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._stop()
        logger.info("service stopped", extra={"service": self.name})

    def spawn(self, coro, name: str) -> asyncio.Task:
        """Runs ``coro`` in the background; a crash is logged and stops the service."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._on_task_done)
        self._tasks.append(task)
        return task

    def _on_task_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self.fail(task.exception(), "background task crashed", task=task.get_name())

    def fail(self, exc: BaseException, message: str, **extra: object) -> None:
        """Logs ``exc`` and stops the service; its process then exits with status 1 (``run_service``)."""
        self.failed = exc
        logger.error(message, extra=extra, exc_info=exc)
        self.stopping.set()

    async def _start(self) -> None:
        raise NotImplementedError

    async def _before_drain(self) -> None:
        """Hook run first on shutdown (e.g. set health NOT_SERVING)."""

    async def _stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self):
        try:
            await self.start()
        except BaseException:
            await self.shutdown()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()


class NatsMixin:
    """Holds a NATS connection and its JetStream context for a ``Service``."""

    nc = None
    js = None

    async def _connect_nats(self, config: BusConfig, name: str) -> None:
        self.nc = await bus.connect(config, name)
        self.js = self.nc.jetstream()
        await bus.declare_streams(self.js)

    async def _drain_nats(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), timeout=3.0)
            except (TimeoutError, Exception):  # noqa: BLE001 - a failed drain still closes below
                await self.nc.close()


class GrpcServer:
    """A grpc.aio server on ``host:port`` (port 0 picks a free one) with grpc.health.v1 registered."""

    def __init__(self, host: str, port: int, max_message_bytes: int = 64 << 20) -> None:
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {host}:{port}")
        self.address = f"{host}:{self.port}"

    async def start(self, services: list[str]) -> None:
        await self.server.start()
        for svc in ["", *services]:
            await self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)

    def write_port_file(self, path: str) -> None:
        """Writes the bound port to ``path`` (when set) for launchers that started us on port 0."""
        if path:
            Path(path).write_text(str(self.port))

    async def not_serving(self) -> None:
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace_s: float = 1.0) -> None:
        await self.server.stop(grace_s)


def run_service(name: str, factory: Callable[[], Service]) -> int:
    """Entry point of ``python -m services.<name>``: runs the service until SIGTERM/SIGINT.

    Returns the process exit code: 0 after a clean stop, 1 when a background task crashed.
    """
    setup_logging(name)
    telemetry.setup_tracing(name)
    telemetry.setup_metrics(name)
    # Streaming services allocate many short-lived objects per event: Python's default thresholds run
    # a collection every 700 allocations and walk every long-lived object (join state caches, tables)
    # in frequent full collections. Fewer, larger young collections cost ~10 % less CPU in the joiner.
    gc.set_threshold(50_000, 50, 100)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            service = factory()
        except (ConfigError, ValueError) as exc:
            logger.error("bad configuration", extra={"service": name, "error": str(exc)})
            return 2
        async with service:
            stopped = asyncio.create_task(service.stopping.wait())
            signalled = asyncio.create_task(stop.wait())
            await asyncio.wait([stopped, signalled], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            signalled.cancel()
            logger.info("shutting down", extra={"service": name, "signalled": stop.is_set()})
        return 1 if service.failed else 0

    return asyncio.run(main())
