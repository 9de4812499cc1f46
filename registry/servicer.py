"""gRPC adapter for `ToolRegistry`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from agentplex.registry.service import ToolRegistry
from agentplex.registry.store import Grant
from agentplex.runtime.clients import Deadline
from agentplex.runtime.errors import InvalidArgument
from agentplex.v1 import tool_registry_service_pb2 as pb
from agentplex.v1 import tool_registry_service_pb2_grpc as pb_grpc


class ToolRegistryServicer(pb_grpc.ToolRegistryServiceServicer):
    def __init__(self, registry: ToolRegistry, *, default_timeout_seconds: float) -> None:
        self._registry = registry
        self._default_timeout = default_timeout_seconds

    async def RegisterTool(
        self,
        request: pb.RegisterToolRequest,
        context: grpc.aio.ServicerContext[pb.RegisterToolRequest, pb.RegisterToolResponse],
    ) -> pb.RegisterToolResponse:
        if not request.HasField("tool"):
            raise InvalidArgument("tool is required")
        created = await self._registry.register(request.tool)
        stored = await self._registry.get(
            request.tool.name, request.tool.version, include_retired=True
        )
        return pb.RegisterToolResponse(tool=stored, created=created)

    async def ListTools(
        self,
        request: pb.ListToolsRequest,
        context: grpc.aio.ServicerContext[pb.ListToolsRequest, pb.ListToolsResponse],
    ) -> pb.ListToolsResponse:
        tools, revision = await self._registry.list_with_revision(
            request.agent, all_versions=request.all_versions
        )
        return pb.ListToolsResponse(tools=tools, revision=revision)

    async def GetTool(
        self,
        request: pb.GetToolRequest,
        context: grpc.aio.ServicerContext[pb.GetToolRequest, pb.GetToolResponse],
    ) -> pb.GetToolResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        tool = await self._registry.get(request.name, request.version)
        return pb.GetToolResponse(tool=await self._registry.with_endpoints(tool))

    async def InvokeTool(
        self,
        request: pb.InvokeToolRequest,
        context: grpc.aio.ServicerContext[pb.InvokeToolRequest, pb.InvokeToolResponse],
    ) -> pb.InvokeToolResponse:
        if not request.tool_name:
            raise InvalidArgument("tool_name is required")
        deadline = Deadline.from_context(context, self._default_timeout)
        return await self._registry.invoke(request, deadline)

    async def InvokeToolStream(
        self,
        request: pb.InvokeToolStreamRequest,
        context: grpc.aio.ServicerContext[pb.InvokeToolStreamRequest, pb.InvokeToolStreamResponse],
    ) -> AsyncIterator[pb.InvokeToolStreamResponse]:
        invocation = request.invocation
        if not invocation.tool_name:
            raise InvalidArgument("invocation.tool_name is required")
        deadline = Deadline.from_context(context, self._default_timeout)
        items: asyncio.Queue[pb.InvokeToolStreamResponse | None] = asyncio.Queue()
        running = asyncio.create_task(
            self._registry.invoke(invocation, deadline, progress=items.put),
            name=f"invoke-{invocation.tool_name}",
        )
        running.add_done_callback(lambda _: items.put_nowait(None))
        try:
            while (item := await items.get()) is not None:
                yield item
            response = running.result()
        finally:
            # The caller hung up: stop the invocation, which cancels its sub-task.
            if not running.done():
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
        yield pb.InvokeToolStreamResponse(response=response)

    async def SetToolState(
        self,
        request: pb.SetToolStateRequest,
        context: grpc.aio.ServicerContext[pb.SetToolStateRequest, pb.SetToolStateResponse],
    ) -> pb.SetToolStateResponse:
        if not request.name or not request.version:
            raise InvalidArgument("name and version are required")
        tool = await self._registry.set_state(
            request.name, request.version, request.state, request.replacement
        )
        return pb.SetToolStateResponse(tool=tool)

    async def WithdrawEndpoint(
        self,
        request: pb.WithdrawEndpointRequest,
        context: grpc.aio.ServicerContext[pb.WithdrawEndpointRequest, pb.WithdrawEndpointResponse],
    ) -> pb.WithdrawEndpointResponse:
        if not (request.name and request.version and request.endpoint):
            raise InvalidArgument("name, version and endpoint are required")
        remaining = await self._registry.withdraw_endpoint(
            request.name, request.version, request.endpoint
        )
        return pb.WithdrawEndpointResponse(remaining=remaining)

    async def SetAgentTools(
        self,
        request: pb.SetAgentToolsRequest,
        context: grpc.aio.ServicerContext[pb.SetAgentToolsRequest, pb.SetAgentToolsResponse],
    ) -> pb.SetAgentToolsResponse:
        if not request.agent:
            raise InvalidArgument("agent is required")
        grants, applied = await self._registry.set_agent_tools(
            request.agent,
            [Grant(g.name, g.major) for g in request.grants],
            only_if_unset=request.only_if_unset,
        )
        return pb.SetAgentToolsResponse(
            grants=[pb.ToolGrant(name=g.name, major=g.major) for g in grants], applied=applied
        )
