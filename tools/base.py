"""What a tool backend is, and what it may use while it runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis

from agentplex.contract.reasons import ToolErrorCode
from agentplex.v1 import tool_pb2


class ToolFailure(Exception):
    """The tool ran and could not do what was asked (e.g. division by zero).

    Reported to the model as a structured tool error, never as an RPC failure,
    so the model can read it and try something else.
    """

    def __init__(self, message: str, *, code: str = ToolErrorCode.EXECUTION_FAILED) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ToolContext:
    """What a running tool may touch: the caller's scope and shared stores."""

    agent: str
    session_id: str
    task_id: str
    redis: aioredis.Redis
    key_prefix: str
    idempotency_key: str = ""
    """The call's key (empty when it has none): what a side-effecting tool dedupes
    on, so that running it again after a lost answer does not repeat its effect."""


class Tool(Protocol):
    definition: tool_pb2.ToolDefinition

    async def run(self, arguments: dict[str, Any], context: ToolContext) -> dict[str, Any]: ...
