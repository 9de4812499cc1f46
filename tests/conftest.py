"""Shared fixtures: one real Redis per test session, isolated per test by key prefix,
and the real services started in-process on free loopback ports."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from agentplex.mesh.redis_process import EmbeddedRedis
from agentplex.runtime.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for the whole session (started on its own loop)."""
    server = EmbeddedRedis()
    loop = asyncio.new_event_loop()
    try:
        url = loop.run_until_complete(server.start())
        yield url
    finally:
        loop.run_until_complete(server.stop())
        loop.close()


@pytest.fixture
def key_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(redis_url: str, key_prefix: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        docs_dir=REPO_ROOT,
        health_interval_seconds=0.2,
        grace_seconds=1.0,
    )


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@dataclass
class Mesh:
    """Addresses of the in-process services of one test."""

    memory: str
    registry: str
    agents: dict[str, str]
    settings: Settings


@pytest.fixture
async def mesh(settings: Settings) -> AsyncIterator[Mesh]:
    """Memory, registry and both catalog agents, real gRPC servers on port 0."""
    from agentplex.agents import app as agents_app
    from agentplex.agents.catalog import CATALOG
    from agentplex.memory import app as memory_app
    from agentplex.registry import app as registry_app

    hosts = []
    try:
        memory_host = memory_app.build_host(settings, metrics_port=None)
        hosts.append(memory_host)
        memory = (await memory_host.start()).address
        registry_host = await registry_app.build_host(settings, metrics_port=None)
        hosts.append(registry_host)
        registry = (await registry_host.start()).address
        agent_settings = settings.model_copy(
            update={"memory_address": memory, "registry_address": registry}
        )
        agents = {}
        for name, spec in CATALOG.items():
            host = agents_app.build_host(spec, agent_settings, metrics_port=None)
            hosts.append(host)
            agents[name] = (await host.start()).address
        yield Mesh(memory=memory, registry=registry, agents=agents, settings=agent_settings)
    finally:
        for host in reversed(hosts):
            await host.stop()


@pytest.fixture
async def channel_to():  # type: ignore[no-untyped-def]
    """Open channels by address; all are closed after the test."""
    channels: list[grpc.aio.Channel] = []

    def open_(address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address)
        channels.append(channel)
        return channel

    yield open_
    for channel in channels:
        await channel.close()


async def _eventually(
    condition: Callable[[], Awaitable[bool] | bool],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition not met",
) -> None:
    """Poll `condition` until it holds; fail with `message` after `timeout` seconds."""
    give_up = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > give_up:
            raise AssertionError(f"{message} within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture
def eventually():  # type: ignore[no-untyped-def]
    """`await eventually(condition, timeout=…, message=…)`: poll instead of sleeping."""
    return _eventually
