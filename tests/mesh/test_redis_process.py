"""EmbeddedRedis: a real redis-server child on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from agentplex.mesh.redis_process import EmbeddedRedis, free_port, redis_server_binary


async def ping(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(await client.ping())
    finally:
        await client.aclose()


async def answers(url: str) -> bool:
    try:
        return await ping(url)
    except aioredis.ConnectionError:
        return False


def test_redis_server_binary_is_executable() -> None:
    path = redis_server_binary()
    assert os.path.isfile(path)
    assert os.access(path, os.X_OK)


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_starts_on_a_free_port_and_stops() -> None:
    server = EmbeddedRedis()
    try:
        url = await server.start()
        assert url == server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.port > 0
        assert await ping(url)
        process = server._process
        assert process is not None
    finally:
        await server.stop()
    assert process.returncode is not None
    assert not await answers(url)


async def test_data_lives_in_the_embedded_server() -> None:
    async with EmbeddedRedis() as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            await client.set("greeting", "hello")
            assert await client.get("greeting") == b"hello"
        finally:
            await client.aclose()


async def test_two_instances_get_different_ports() -> None:
    async with EmbeddedRedis() as first, EmbeddedRedis() as second:
        assert first.port != second.port
        assert await ping(first.url)
        assert await ping(second.url)
        a = aioredis.Redis.from_url(first.url)
        b = aioredis.Redis.from_url(second.url)
        try:
            await a.set("who", "first")
            assert await b.get("who") is None
        finally:
            await a.aclose()
            await b.aclose()
    assert not await answers(first.url)
    assert not await answers(second.url)


async def test_temporary_data_dir_is_removed_on_stop() -> None:
    server = EmbeddedRedis()
    await server.start()
    data_dir = server._data_dir
    assert data_dir is not None
    assert data_dir.is_dir()
    await server.stop()
    assert not data_dir.exists()


async def test_explicit_data_dir_is_used_and_kept(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis-data"
    async with EmbeddedRedis(data_dir=data_dir) as server:
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        try:
            assert (await client.config_get("dir"))["dir"] == str(data_dir.resolve())
        finally:
            await client.aclose()
    assert data_dir.is_dir()


async def test_explicit_port_is_used() -> None:
    port = free_port()
    async with EmbeddedRedis(port=port) as server:
        assert server.port == port
        assert await ping(f"redis://127.0.0.1:{port}/0")


async def test_stop_is_idempotent_and_safe_before_start() -> None:
    never_started = EmbeddedRedis()
    await never_started.stop()
    server = EmbeddedRedis()
    await server.start()
    await server.stop()
    await server.stop()


@dataclass
class Failure:
    port: int
    error: BaseException | None
    seconds: float


@pytest.fixture(scope="module")
def busy_port_failure() -> Failure:
    """Start on a port someone else holds (bound, not listening): once per module."""

    async def attempt(port: int) -> BaseException | None:
        server = EmbeddedRedis(port=port)
        try:
            await server.start()
        except Exception as exc:
            return exc
        finally:
            await server.stop()
        return None

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        started = time.monotonic()
        error = asyncio.run(attempt(port))
        return Failure(port=port, error=error, seconds=time.monotonic() - started)


def test_busy_explicit_port_fails_with_runtime_error(busy_port_failure: Failure) -> None:
    assert isinstance(busy_port_failure.error, RuntimeError)
    expected = f"redis-server did not start on 127.0.0.1:{busy_port_failure.port}"
    assert expected in str(busy_port_failure.error)


def test_start_failure_says_why(busy_port_failure: Failure) -> None:
    assert "Address already in use" in str(busy_port_failure.error)


def test_start_failure_is_reported_quickly(busy_port_failure: Failure) -> None:
    # redis-server exits within milliseconds when it cannot bind.
    assert busy_port_failure.seconds < 1.0


async def test_port_held_by_another_redis_is_not_mistaken_for_ours() -> None:
    async with EmbeddedRedis() as first:
        second = EmbeddedRedis(port=first.port)
        try:
            with pytest.raises(RuntimeError):
                await second.start()
        finally:
            await second.stop()
