"""gRPC adapter for `ToolRegistry`."""

from __future__ import annotations

import grpc

from agentplex.registry.service import ToolRegistry
from agentplex.runtime.clients import Deadline
from agentplex.runtime.errors import InvalidArgument
from agentplex.v1 import tool_registry_service_pb2 as pb
from agentplex.v1 import tool_registry_service_pb2_grpc as pb_grpc


class ToolRegistryServicer(pb_grpc.ToolRegistryServiceServicer):
    def __init__(self, registry: ToolRegistry, *, default_timeout_seconds: float) -> None:
        self._registry = registry
        self._default_timeout = default_timeout_seconds

    async def RegisterTool(
        self, request: pb.RegisterToolRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterToolResponse:
        if not request.HasField("tool"):
            raise InvalidArgument("tool is required")
        created = await self._registry.register(request.tool)
        return pb.RegisterToolResponse(tool=request.tool, created=created)

    async def ListTools(
        self, request: pb.ListToolsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListToolsResponse:
        return pb.ListToolsResponse(tools=await self._registry.list(request.agent))

    async def GetTool(
        self, request: pb.GetToolRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetToolResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        return pb.GetToolResponse(tool=await self._registry.get(request.name))

    async def InvokeTool(
        self, request: pb.InvokeToolRequest, context: grpc.aio.ServicerContext
    ) -> pb.InvokeToolResponse:
        if not request.tool_name:
            raise InvalidArgument("tool_name is required")
        deadline = Deadline.from_context(context, self._default_timeout)
        return await self._registry.invoke(request, deadline)
