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
from agentplex.runtime.redis_client import as_bytes, as_text
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
        # Agents whose access list an operator set: an agent's own default never replaces it.
        self._operator_set_key = f"{self._prefix}:access:operator"
        self._revision_key = f"{self._prefix}:revision"

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

    async def revision(self) -> int:
        """Bumped by every change an agent's tool list could see."""
        return int(await self._redis.get(self._revision_key) or 0)

    async def grants_and_versions(
        self, agent: str, name: str
    ) -> tuple[list[Grant] | None, list[tool_pb2.ToolDefinition], int]:
        """An agent's grants, a tool's versions and the revision: one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self._revision_key)  # first: a change after it only makes it look older
            pipe.hget(self._access_key, agent)
            pipe.hvals(self._tool_key(name))
            revision, raw_grants, raw_versions = await pipe.execute()
        return _grants(raw_grants), _sorted(raw_versions), int(revision or 0)

    async def put_version(self, tool: tool_pb2.ToolDefinition) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._tool_key(tool.name), tool.version, tool.SerializeToString())
            pipe.sadd(self._names_key, tool.name)
            pipe.incr(self._revision_key)
            await pipe.execute()

    async def add_version(self, tool: tool_pb2.ToolDefinition) -> bool:
        """Publish a version that must not exist yet; False if it already does."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(self._tool_key(tool.name), tool.version, tool.SerializeToString())
            pipe.sadd(self._names_key, tool.name)
            pipe.incr(self._revision_key)
            created, *_ = await pipe.execute()
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
            as_text(e) for e in await self._redis.smembers(self._endpoints_key(name, version))
        )

    async def names(self) -> list[str]:
        return sorted(as_text(name) for name in await self._redis.smembers(self._names_key))

    async def grants(self, agent: str) -> list[Grant] | None:
        """What `agent` may use, or None for an agent the registry does not know."""
        return _grants(await self._redis.hget(self._access_key, agent))

    async def set_grants(
        self, agent: str, grants: list[Grant], *, as_default: bool = False
    ) -> bool:
        """Store an agent's access list; whether it was stored.

        An operator's list (`as_default=False`) is always stored and marks the agent;
        an agent's own default replaces any earlier default (a spec that changed)
        but never a list an operator set. One script: no interleaving between the
        check and the write.
        """
        value = json.dumps(
            [{"name": g.name, "major": g.major} for g in sorted(grants, key=lambda g: g.name)]
        )
        stored = await self._redis.eval(
            _SET_GRANTS,
            3,
            self._access_key,
            self._operator_set_key,
            self._revision_key,
            agent,
            "1" if as_default else "0",
            value,
        )
        return bool(stored)


_SET_GRANTS = """
if ARGV[2] == '1' then
  if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 0 end
else
  redis.call('SADD', KEYS[2], ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('INCR', KEYS[3])
return 1
"""


def _sorted(raw: list[bytes | str]) -> list[tool_pb2.ToolDefinition]:
    tools = [tool_pb2.ToolDefinition.FromString(as_bytes(blob)) for blob in raw]
    return sorted(tools, key=lambda tool: semver(tool.version))


def _grants(raw: bytes | str | None) -> list[Grant] | None:
    if raw is None:
        return None
    return [Grant(item["name"], int(item.get("major", 0))) for item in json.loads(raw)]
