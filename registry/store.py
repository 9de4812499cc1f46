"""Registry state in Redis: every version of every tool contract, and access lists.

Everything the registry knows lives here, so a restarted (or second) registry
serves exactly the same contracts, and a registration is visible to every
replica on its next call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis.asyncio as aioredis

from agentplex.registry.schemas import semver
from agentplex.v1 import tool_pb2


@dataclass(frozen=True)
class Grant:
    """An agent may use `name` at major version `major` (0 = the newest major)."""

    name: str
    major: int = 0


class RegistryStore:
    def __init__(self, redis: aioredis.Redis, *, key_prefix: str) -> None:
        self._redis = redis
        self._prefix = f"{key_prefix}:registry"
        self._names_key = f"{self._prefix}:names"
        self._access_key = f"{self._prefix}:access"

    def _tool_key(self, name: str) -> str:
        return f"{self._prefix}:tool:{name}"

    async def versions(self, name: str) -> list[tool_pb2.ToolDefinition]:
        """Every version of a tool, oldest first."""
        return _sorted(await self._redis.hvals(self._tool_key(name)))

    async def versions_of(self, names: list[str]) -> dict[str, list[tool_pb2.ToolDefinition]]:
        """Every version of several tools, in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hvals(self._tool_key(name))
            rows = await pipe.execute()
        return {name: _sorted(raw) for name, raw in zip(names, rows, strict=True)}

    async def grants_and_versions(
        self, agent: str, name: str
    ) -> tuple[list[Grant] | None, list[tool_pb2.ToolDefinition]]:
        """An agent's grants and a tool's versions, in one round trip (the invoke path)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(self._access_key, agent)
            pipe.hvals(self._tool_key(name))
            raw_grants, raw_versions = await pipe.execute()
        return _grants(raw_grants), _sorted(raw_versions)

    async def put_version(self, tool: tool_pb2.ToolDefinition) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._tool_key(tool.name), tool.version, tool.SerializeToString())
            pipe.sadd(self._names_key, tool.name)
            await pipe.execute()

    async def add_version(self, tool: tool_pb2.ToolDefinition) -> bool:
        """Publish a version that must not exist yet; False if it already does."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(self._tool_key(tool.name), tool.version, tool.SerializeToString())
            pipe.sadd(self._names_key, tool.name)
            created, _ = await pipe.execute()
        return bool(created)

    def _endpoints_key(self, name: str, version: str) -> str:
        return f"{self._prefix}:endpoints:{name}:{version}"

    async def add_endpoint(self, name: str, version: str, endpoint: str) -> None:
        await self._redis.sadd(self._endpoints_key(name, version), endpoint)

    async def remove_endpoint(self, name: str, version: str, endpoint: str) -> int:
        """Remove one backend address; returns how many remain."""
        key = self._endpoints_key(name, version)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(key, endpoint)
            pipe.scard(key)
            _, remaining = await pipe.execute()
        return int(remaining)

    async def endpoints(self, name: str, version: str) -> list[str]:
        return sorted(
            e.decode() for e in await self._redis.smembers(self._endpoints_key(name, version))
        )

    async def names(self) -> list[str]:
        return sorted(name.decode() for name in await self._redis.smembers(self._names_key))

    async def grants(self, agent: str) -> list[Grant] | None:
        """What `agent` may use, or None for an agent the registry does not know."""
        return _grants(await self._redis.hget(self._access_key, agent))

    async def set_grants(
        self, agent: str, grants: list[Grant], *, only_if_new: bool = False
    ) -> bool:
        value = json.dumps(
            [{"name": g.name, "major": g.major} for g in sorted(grants, key=lambda g: g.name)]
        )
        if only_if_new:
            return bool(await self._redis.hsetnx(self._access_key, agent, value))
        await self._redis.hset(self._access_key, agent, value)
        return True


def _sorted(raw: list[bytes]) -> list[tool_pb2.ToolDefinition]:
    tools = [tool_pb2.ToolDefinition.FromString(blob) for blob in raw]
    return sorted(tools, key=lambda tool: semver(tool.version))


def _grants(raw: bytes | None) -> list[Grant] | None:
    if raw is None:
        return None
    return [Grant(item["name"], int(item.get("major", 0))) for item in json.loads(raw)]
