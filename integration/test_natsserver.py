"""Tests of the embedded nats-server: JetStream on a free loopback port, clean and idempotent stop."""

from __future__ import annotations

import os
import shutil
import socket

import nats
import pytest

from freshet.natsserver import EmbeddedNats, free_port, server_binary


async def _account_streams(url: str) -> int:
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    try:
        return (await nc.jetstream().account_info()).streams
    finally:
        await nc.close()


def test_server_binary_is_an_executable_file():
    path = server_binary()

    assert os.path.isfile(path) and os.access(path, os.X_OK)


def test_free_port_can_be_bound_on_loopback():
    port = free_port()

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


async def test_started_server_serves_jetstream_on_its_loopback_url():
    with EmbeddedNats() as server:
        assert server.url == f"nats://127.0.0.1:{server.port}"
        assert await _account_streams(server.url) == 0


def test_stop_is_idempotent_and_removes_the_temporary_store():
    server = EmbeddedNats().start()
    store = server.store_dir
    assert os.path.isdir(store)

    server.stop()
    server.stop()

    assert not os.path.exists(store)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_stop_before_start_is_harmless():
    server = EmbeddedNats()

    server.stop()

    assert not os.path.exists(server.store_dir)


def test_given_store_directory_is_kept_after_stop(tmp_path):
    store = tmp_path / "js"
    store.mkdir()

    with EmbeddedNats(store_dir=str(store)):
        pass

    assert store.is_dir()


async def test_two_servers_run_side_by_side_on_different_ports():
    with EmbeddedNats() as first, EmbeddedNats() as second:
        assert first.port != second.port
        assert first.store_dir != second.store_dir
        nc = await nats.connect(first.url, allow_reconnect=False)
        try:
            await nc.jetstream().add_stream(name="ONLY_FIRST", subjects=["first.>"])
        finally:
            await nc.close()

        assert await _account_streams(first.url) == 1
        assert await _account_streams(second.url) == 0


def test_start_on_a_port_already_in_use_raises():
    with EmbeddedNats() as first:
        second = EmbeddedNats(port=first.port)
        try:
            with pytest.raises(RuntimeError, match="exited"):
                second.start()
        finally:
            second.stop()


def test_failed_start_removes_the_temporary_store():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))  # bound, not listening: the server's bind fails, connects are refused
        server = EmbeddedNats(port=blocker.getsockname()[1])
        try:
            with pytest.raises(RuntimeError, match="address already in use"):
                server.start()
            assert not os.path.exists(server.store_dir)
        finally:
            shutil.rmtree(server.store_dir, ignore_errors=True)
