"""`BackendRouter`: how the registry reaches the service that runs a tool.

Executor tools go to a ToolExecutorService, agent tools (`agent.<name>`) to
that agent's RunTask. Every call gets the caller's remaining deadline, capped
by the tool timeout. UNAVAILABLE is retried only for tools declared read-only
or idempotent (a side-effecting call that may have happened is never blindly
repeated); when the backend stays down the model gets a structured tool error
it can route around, not a failed task.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from typing import Any

import grpc
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from agentplex.runtime import errors
from agentplex.runtime.clients import Deadline, call_with_deadline, open_channel
from agentplex.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    tool_executor_service_pb2,
    tool_executor_service_pb2_grpc,
    tool_pb2,
    tool_registry_service_pb2,
)

RETRY_ATTEMPTS = 3
# How long one backend gets to accept a connection before the next is tried.
CONNECT_SECONDS = 1.0
# A backend that failed to connect is tried last for this long.
SUSPECT_SECONDS = 10.0
MAX_CHANNELS = 256
SAFE_TO_RETRY = (tool_pb2.SIDE_EFFECT_READ_ONLY, tool_pb2.SIDE_EFFECT_IDEMPOTENT)


class BackendRouter:
    def __init__(self, *, tool_timeout_seconds: float, retry_wait_seconds: float = 0.1) -> None:
        self._tool_timeout = tool_timeout_seconds
        self._retry_wait = retry_wait_seconds
        # Connections, not state: one channel per backend address, reused.
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._suspect: dict[str, float] = {}

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        if endpoint not in self._channels:
            if len(self._channels) >= MAX_CHANNELS:
                # Drop the oldest: backends that left long ago should not pin sockets.
                oldest = next(iter(self._channels))
                asyncio.get_running_loop().create_task(self._channels.pop(oldest).close())
            self._channels[endpoint] = open_channel(endpoint)
        return self._channels[endpoint]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def execute(
        self,
        tool: tool_pb2.ToolDefinition,
        endpoints: list[str],
        arguments: dict[str, Any],
        caller: tool_registry_service_pb2.Caller,
        idempotency_key: str,
        deadline: Deadline,
    ) -> tool_executor_service_pb2.ExecuteToolResponse:
        if not endpoints:
            raise errors.FailedPrecondition(
                f"tool {tool.name} {tool.version} is registered but no backend serves it",
                reason="NO_BACKEND",
            )
        attempts = RETRY_ATTEMPTS if tool.side_effect in SAFE_TO_RETRY else 1
        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential_jitter(
                multiplier=self._retry_wait, jitter=self._retry_wait, max=1.0
            ),
            retry=retry_if_exception_type(errors.Unavailable),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    channel = await self._connect(tool, endpoints, deadline)
                    return await self._call(
                        tool, channel, arguments, caller, idempotency_key, deadline
                    )
        except errors.DeadlineExceeded:
            if deadline.remaining() < 0.01:
                raise  # the caller's own deadline: the whole call is over
            # Only the tool's own time limit ran out: the model can try something else.
            return _failure(
                "TIMEOUT", f"{tool.name} took longer than its {self._tool_timeout:g}s limit"
            )
        except errors.Unavailable as exc:
            retried = f" after {attempts} attempts" if attempts > 1 else ""
            return _failure("UNAVAILABLE", f"{tool.name} is unavailable{retried}: {exc.message}")
        except errors.AgentplexError as exc:
            return _failure(exc.reason, exc.message)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _connect(
        self, tool: tool_pb2.ToolDefinition, endpoints: list[str], deadline: Deadline
    ) -> grpc.aio.Channel:
        """A backend that accepts a connection. Nothing has been sent to the ones
        skipped, so moving on is safe even for side-effecting tools."""
        now = time.monotonic()
        # Spread load; try backends that failed recently last.
        order = sorted(endpoints, key=lambda e: (self._suspect.get(e, 0) > now, random.random()))
        for endpoint in order:
            channel = self._channel(endpoint)
            if channel.get_state() == grpc.ChannelConnectivity.READY:
                return channel  # the common case: no waiting, no extra task
            try:
                await asyncio.wait_for(
                    channel.channel_ready(), timeout=deadline.timeout(CONNECT_SECONDS)
                )
            except TimeoutError:
                self._suspect[endpoint] = time.monotonic() + SUSPECT_SECONDS
                continue
            self._suspect.pop(endpoint, None)
            return channel
        raise errors.Unavailable(
            f"no backend of {tool.name} {tool.version} accepted a connection "
            f"(tried {', '.join(order)})"
        )

    async def _call(
        self,
        tool: tool_pb2.ToolDefinition,
        channel: grpc.aio.Channel,
        arguments: dict[str, Any],
        caller: tool_registry_service_pb2.Caller,
        idempotency_key: str,
        deadline: Deadline,
    ) -> tool_executor_service_pb2.ExecuteToolResponse:
        if tool.backend_kind == tool_pb2.BACKEND_KIND_AGENT:
            # A delegated task is bounded by the caller's deadline, not the tool limit.
            return await self._run_agent(
                channel, arguments, caller, idempotency_key, deadline.timeout()
            )
        stub = tool_executor_service_pb2_grpc.ToolExecutorServiceStub(channel)
        return await call_with_deadline(
            stub.ExecuteTool,
            tool_executor_service_pb2.ExecuteToolRequest(
                tool_name=tool.name,
                tool_version=tool.version,
                arguments_json=json.dumps(arguments),
                caller=caller,
                idempotency_key=idempotency_key,
            ),
            timeout=deadline.timeout(self._tool_timeout),
        )

    async def _run_agent(
        self,
        channel: grpc.aio.Channel,
        arguments: dict[str, Any],
        caller: tool_registry_service_pb2.Caller,
        idempotency_key: str,
        timeout: float,
    ) -> tool_executor_service_pb2.ExecuteToolResponse:
        request = agent_service_pb2.RunTaskRequest(
            # Derived from the invocation's key, so a replayed delegation keeps its id.
            task_id=f"d-{hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]}"
            if idempotency_key
            else "",
            prompt=arguments["prompt"],
            session_id=arguments.get("session_id", ""),
            metadata={"delegated_by": caller.agent or "operator", "parent_task": caller.task_id},
        )
        for field in ("max_steps", "token_budget"):
            if field in arguments:
                setattr(request, field, arguments[field])
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        response = await call_with_deadline(stub.RunTask, request, timeout=timeout)
        result = response.result
        payload = {
            "task_id": result.task_id,
            "output": result.output,
            "error": result.error,
            "steps_used": result.steps_used,
            "tokens_used": result.tokens_used,
        }
        return tool_executor_service_pb2.ExecuteToolResponse(result_json=json.dumps(payload))


def _failure(code: str, message: str) -> tool_executor_service_pb2.ExecuteToolResponse:
    return tool_executor_service_pb2.ExecuteToolResponse(
        error=tool_pb2.ToolError(code=code, message=message)
    )
