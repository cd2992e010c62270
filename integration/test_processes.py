"""Every service runs as its own process and exits cleanly within 5 s of SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from freshet.natsserver import free_port
from freshet.testing import assert_eventually


def spawn(name: str, env: dict[str, str], tmp_path) -> subprocess.Popen:
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-m", f"services.{name}"], env=env, stdout=log, stderr=subprocess.STDOUT
    )


async def healthy(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.aio.AioRpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("service", ["store", "predictor", "validator", "publisher", "trainer", "joiner"])
async def test_service_process_exits_cleanly_within_5s_of_sigterm(service, nats_url, tmp_path):
    store_port, predictor_port = free_port(), free_port()
    ready_file = tmp_path / "port"
    env = {
        **os.environ,
        "FRESHET_NATS_URL": nats_url,
        "FRESHET_STORE_PORT": str(store_port),
        "FRESHET_STORE_ADDRESS": f"127.0.0.1:{store_port}",
        "FRESHET_PREDICTOR_PORT": str(predictor_port),
        "FRESHET_STORE_PORT_FILE": str(ready_file),
        "FRESHET_PREDICTOR_PORT_FILE": str(ready_file),
    }
    log_path = tmp_path / f"{service}.log"
    proc = spawn(service, env, tmp_path)
    try:
        if service in ("store", "predictor"):
            port = store_port if service == "store" else predictor_port
            await assert_eventually(lambda: healthy(f"127.0.0.1:{port}"), timeout_s=20)
        else:
            await assert_eventually(lambda: b"service started" in log_path.read_bytes(), timeout_s=20)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log_path.read_text()
    assert elapsed < 5.0
    assert b"service stopped" in log_path.read_bytes()


def test_missing_required_setting_fails_at_start_naming_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    proc = subprocess.run(
        [sys.executable, "-m", "services.trainer"], env=env, capture_output=True, timeout=60, text=True
    )
    assert proc.returncode != 0
    assert "FRESHET_STORE_ADDRESS" in proc.stderr
