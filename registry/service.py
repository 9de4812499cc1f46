"""`ToolRegistry`: registration, discovery and validated invocation of tools.

Plain class, no gRPC: the servicer adapts it, tests drive it directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping

import redis.asyncio as aioredis
from opentelemetry import trace

from agentplex.registry import schemas
from agentplex.registry.ledger import IdempotencyLedger, fingerprint
from agentplex.registry.store import RegistryStore
from agentplex.runtime.clients import Deadline
from agentplex.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from agentplex.tools.base import Tool, ToolContext, ToolFailure
from agentplex.v1 import tool_pb2
from agentplex.v1 import tool_registry_service_pb2 as pb

log = logging.getLogger(__name__)
tracer = trace.get_tracer("agentplex.registry")


class ToolRegistry:
    def __init__(
        self,
        *,
        store: RegistryStore,
        ledger: IdempotencyLedger,
        backends: Mapping[str, Tool],
        redis: aioredis.Redis,
        key_prefix: str,
        tool_timeout_seconds: float,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._backends = dict(backends)
        self._redis = redis
        self._prefix = key_prefix
        self._tool_timeout = tool_timeout_seconds

    async def register(self, tool: tool_pb2.ToolDefinition) -> bool:
        """Publish a contract; False when the identical contract was already there."""
        schemas.check_definition(tool)
        current = await self._store.get_tool(tool.name)
        if current is not None:
            if current.SerializeToString(deterministic=True) == tool.SerializeToString(
                deterministic=True
            ):
                return False
            if schemas.semver(tool.version) <= schemas.semver(current.version):
                raise FailedPrecondition(
                    f"tool {tool.name!r} is at version {current.version}; a changed contract "
                    f"needs a higher version than that, got {tool.version}",
                    reason="VERSION_NOT_NEWER",
                )
        await self._store.put_tool(tool)
        log.info("registered tool", extra={"tool": tool.name, "version": tool.version})
        return True

    async def seed(
        self, tools: list[tool_pb2.ToolDefinition], access: Mapping[str, list[str]]
    ) -> None:
        """Publish the built-in contracts and agents' access lists at start-up."""
        for tool in tools:
            try:
                await self.register(tool)
            except FailedPrecondition as exc:
                log.warning("kept the stored contract of %s: %s", tool.name, exc.message)
        for agent, names in access.items():
            await self._store.set_agent_tools(agent, names)

    async def list(self, agent: str = "") -> list[tool_pb2.ToolDefinition]:
        tools = await self._store.list_tools()
        if not agent:
            return tools
        allowed = await self._store.agent_tools(agent)
        if allowed is None:
            raise NotFound(
                f"agent {agent!r} is not known to the registry", reason="AGENT_NOT_FOUND"
            )
        return [tool for tool in tools if tool.name in allowed]

    async def get(self, name: str) -> tool_pb2.ToolDefinition:
        tool = await self._store.get_tool(name)
        if tool is None:
            raise NotFound(f"tool {name!r} is not registered", reason="TOOL_NOT_FOUND")
        return tool

    async def invoke(
        self, request: pb.InvokeToolRequest, deadline: Deadline
    ) -> pb.InvokeToolResponse:
        with tracer.start_as_current_span("registry.invoke") as span:
            span.set_attribute("tool.name", request.tool_name)
            tool = await self.get(request.tool_name)
            caller = request.caller
            if caller.agent:
                allowed = await self._store.agent_tools(caller.agent)
                if allowed is None or tool.name not in allowed:
                    raise PermissionDenied(
                        f"agent {caller.agent!r} may not use tool {tool.name!r}",
                        reason="TOOL_NOT_ALLOWED",
                    )
            arguments = schemas.parse_arguments(request.arguments_json)
            violation = schemas.schema_violation(tool.input_schema_json, arguments)
            if violation:
                raise InvalidArgument(
                    f"arguments for {tool.name} do not match its input schema: {violation}",
                )
            backend = self._backends.get(tool.name)
            if backend is None:
                raise FailedPrecondition(
                    f"tool {tool.name!r} is registered but no backend serves it here",
                    reason="NO_BACKEND",
                )
            if not request.idempotency_key:
                return await self._execute(tool, backend, arguments, caller, deadline)
            fp = fingerprint(tool.name, arguments)
            scope = caller.session_id or caller.agent or "-"
            claim = await self._ledger.claim(scope, request.idempotency_key, fp, deadline)
            if claim.replay is not None:
                span.set_attribute("tool.replayed", True)
                return claim.replay
            try:
                response = await self._execute(tool, backend, arguments, caller, deadline)
            except BaseException:
                await asyncio.shield(self._ledger.release(claim))
                raise
            await self._ledger.complete(claim, fp, response)
            return response

    async def _execute(
        self,
        tool: tool_pb2.ToolDefinition,
        backend: Tool,
        arguments: dict[str, object],
        caller: pb.Caller,
        deadline: Deadline,
    ) -> pb.InvokeToolResponse:
        response = pb.InvokeToolResponse(tool_name=tool.name, tool_version=tool.version)
        context = ToolContext(
            agent=caller.agent,
            session_id=caller.session_id,
            task_id=caller.task_id,
            redis=self._redis,
            key_prefix=self._prefix,
        )
        started = time.perf_counter()
        try:
            async with asyncio.timeout(deadline.timeout(self._tool_timeout)):
                result = await backend.run(arguments, context)
        except ToolFailure as exc:
            response.error.CopyFrom(tool_pb2.ToolError(code=exc.code, message=exc.message))
            return response
        except TimeoutError:
            # The caller's deadline passing is DEADLINE_EXCEEDED, not a tool error.
            deadline.timeout()
            response.error.CopyFrom(
                tool_pb2.ToolError(
                    code="TIMEOUT", message=f"{tool.name} took longer than {self._tool_timeout:g}s"
                )
            )
            return response
        finally:
            log.debug(
                "tool ran",
                extra={"tool": tool.name, "ms": round((time.perf_counter() - started) * 1000, 2)},
            )
        violation = schemas.schema_violation(tool.output_schema_json, result)
        if violation:
            log.error(
                "tool %s returned a result outside its output schema: %s", tool.name, violation
            )
            response.error.CopyFrom(
                tool_pb2.ToolError(
                    code="INVALID_RESULT",
                    message=f"{tool.name} returned a result outside its output schema: {violation}",
                )
            )
            return response
        try:
            response.result_json = json.dumps(result, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            response.error.CopyFrom(
                tool_pb2.ToolError(
                    code="INVALID_RESULT",
                    message=f"{tool.name} returned a result that is not JSON: {exc}",
                )
            )
        return response
