"""Registry state in Redis: tool contracts and per-agent access lists.

Everything the registry knows lives here, so a restarted (or second) registry
serves exactly the same contracts.
"""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from agentplex.v1 import tool_pb2


class RegistryStore:
    def __init__(self, redis: aioredis.Redis, *, key_prefix: str) -> None:
        self._redis = redis
        self._tools_key = f"{key_prefix}:registry:tools"
        self._access_key = f"{key_prefix}:registry:access"

    async def get_tool(self, name: str) -> tool_pb2.ToolDefinition | None:
        raw = await self._redis.hget(self._tools_key, name)
        return None if raw is None else tool_pb2.ToolDefinition.FromString(raw)

    async def put_tool(self, tool: tool_pb2.ToolDefinition) -> None:
        await self._redis.hset(self._tools_key, tool.name, tool.SerializeToString())

    async def list_tools(self) -> list[tool_pb2.ToolDefinition]:
        raw = await self._redis.hgetall(self._tools_key)
        tools = [tool_pb2.ToolDefinition.FromString(blob) for blob in raw.values()]
        return sorted(tools, key=lambda tool: tool.name)

    async def agent_tools(self, agent: str) -> list[str] | None:
        """The tools `agent` may use, or None for an agent the registry does not know."""
        raw = await self._redis.hget(self._access_key, agent)
        return None if raw is None else list(json.loads(raw))

    async def set_agent_tools(self, agent: str, tools: list[str]) -> None:
        await self._redis.hset(self._access_key, agent, json.dumps(sorted(tools)))
