"""`ToolExecutorServicer`: serves the built-in tools as a tool backend.

Only the registry calls it, after access checks and argument validation; a
tool's own failure comes back as a structured error, never as an RPC failure.
A failure of the backend's own dependency (its Redis) is the opposite: not the
tool's answer, so an RPC failure, UNAVAILABLE with the reason
`BACKEND_DEPENDENCY_UNAVAILABLE`. That reason promises the registry that
running the call again under its key repeats no effect, which holds because
the built-in tools either have none or dedupe on the key (`notes.write`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import grpc
import redis.asyncio as aioredis
import redis.exceptions

from agentplex.contract.reasons import Reason, ToolErrorCode
from agentplex.runtime.errors import NotFound, Unavailable
from agentplex.runtime.principal import tenant_prefix
from agentplex.tools.base import Tool, ToolContext, ToolFailure
from agentplex.v1 import tool_executor_service_pb2 as pb
from agentplex.v1 import tool_executor_service_pb2_grpc as pb_grpc
from agentplex.v1 import tool_pb2


class ToolExecutorServicer(pb_grpc.ToolExecutorServiceServicer):
    def __init__(self, tools: Iterable[Tool], *, redis: aioredis.Redis, key_prefix: str) -> None:
        # Keyed by name and major: an implementation serves every compatible
        # (same-major) version of its contract.
        self._tools = {(t.definition.name, _major(t.definition.version)): t for t in tools}
        self._redis = redis
        self._prefix = key_prefix

    async def ExecuteTool(
        self,
        request: pb.ExecuteToolRequest,
        context: grpc.aio.ServicerContext[pb.ExecuteToolRequest, pb.ExecuteToolResponse],
    ) -> pb.ExecuteToolResponse:
        tool = self._tools.get((request.tool_name, _major(request.tool_version)))
        if tool is None:
            raise NotFound(
                f"this backend does not serve {request.tool_name} {request.tool_version}",
                reason=Reason.TOOL_NOT_SERVED,
            )
        caller = request.caller
        context_ = ToolContext(
            agent=caller.agent,
            session_id=caller.session_id,
            task_id=caller.task_id,
            redis=self._redis,
            # Every tool's data under the caller's tenant: one tenant's notes (or
            # anything else a tool keeps) are invisible to every other.
            key_prefix=tenant_prefix(self._prefix),
            idempotency_key=request.idempotency_key,
        )
        try:
            result = await tool.run(json.loads(request.arguments_json), context_)
        except ToolFailure as exc:
            return pb.ExecuteToolResponse(
                error=tool_pb2.ToolError(code=exc.code, message=exc.message)
            )
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise Unavailable(
                f"{request.tool_name} could not run: this backend's Redis is unavailable ({exc})",
                reason=Reason.BACKEND_DEPENDENCY_UNAVAILABLE,
            ) from exc
        try:
            return pb.ExecuteToolResponse(result_json=json.dumps(result, allow_nan=False))
        except (TypeError, ValueError) as exc:
            return pb.ExecuteToolResponse(
                error=tool_pb2.ToolError(
                    code=ToolErrorCode.INVALID_RESULT, message=f"result is not JSON: {exc}"
                )
            )


def _major(version: str) -> str:
    return version.split(".", 1)[0]
