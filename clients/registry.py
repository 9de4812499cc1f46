"""`RegistryClient`: how agents, tool backends and the CLI reach the Tool Registry."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from agentplex.contract import callers
from agentplex.runtime.clients import call_with_deadline, open_channel
from agentplex.runtime.errors import AgentplexError, FailedPrecondition, from_rpc_error
from agentplex.v1 import tool_pb2
from agentplex.v1 import tool_registry_service_pb2 as pb
from agentplex.v1 import tool_registry_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # only the type: runtime.tls needs cryptography, a mesh extra
    from agentplex.runtime.tls import MeshTls

log = logging.getLogger(__name__)


class RegistryClient:
    def __init__(
        self,
        address: str,
        *,
        channel: grpc.aio.Channel | None = None,
        tls: MeshTls | None = None,
    ) -> None:
        """`tls`: the caller's mesh credentials, when mTLS is on (ignored with `channel`)."""
        self._channel = channel or open_channel(address, tls=tls, server_identity=callers.REGISTRY)
        self._stub = pb_grpc.ToolRegistryServiceStub(self._channel)

    async def list_tools(self, agent: str = "", *, timeout: float) -> pb.ListToolsResponse:
        return await call_with_deadline(
            self._stub.ListTools, pb.ListToolsRequest(agent=agent), timeout=timeout
        )

    async def invoke(
        self, request: pb.InvokeToolRequest, *, timeout: float
    ) -> pb.InvokeToolResponse:
        return await call_with_deadline(self._stub.InvokeTool, request, timeout=timeout)

    async def invoke_stream(
        self, request: pb.InvokeToolRequest, *, timeout: float
    ) -> AsyncIterator[pb.InvokeToolStreamResponse]:
        """Invoke and stream progress; leaving the loop early cancels the invocation."""
        call = self._stub.InvokeToolStream(
            pb.InvokeToolStreamRequest(invocation=request), timeout=timeout
        )
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()

    async def register(self, tool: tool_pb2.ToolDefinition, *, timeout: float) -> bool:
        response = await call_with_deadline(
            self._stub.RegisterTool, pb.RegisterToolRequest(tool=tool), timeout=timeout
        )
        return bool(response.created)

    async def publish(
        self,
        tools: list[tool_pb2.ToolDefinition],
        endpoint: str,
        kind: tool_pb2.BackendKind,
        *,
        timeout: float,
    ) -> None:
        """Publish contracts served at `endpoint` (what a backend does on start-up)."""
        for tool in tools:
            published = tool_pb2.ToolDefinition()
            published.CopyFrom(tool)
            published.endpoint, published.backend_kind = endpoint, kind
            try:
                await self.register(published, timeout=timeout)
            except FailedPrecondition as exc:
                # E.g. the contract was edited without a version bump. The service
                # still runs; its other contracts still publish; the log says why.
                log.error("could not publish %s %s: %s", tool.name, tool.version, exc.message)

    async def set_agent_tools(
        self,
        agent: str,
        grants: list[pb.ToolGrant],
        *,
        only_if_unset: bool = False,
        timeout: float,
    ) -> pb.SetAgentToolsResponse:
        """Store an agent's access list (`only_if_unset`: as a default an operator's list beats)."""
        return await call_with_deadline(
            self._stub.SetAgentTools,
            pb.SetAgentToolsRequest(agent=agent, grants=grants, only_if_unset=only_if_unset),
            timeout=timeout,
        )

    async def withdraw(
        self, tools: list[tool_pb2.ToolDefinition], endpoint: str, *, timeout: float
    ) -> None:
        """Stop routing to `endpoint` (what a backend does when it shuts down)."""
        for tool in tools:
            try:
                await call_with_deadline(
                    self._stub.WithdrawEndpoint,
                    pb.WithdrawEndpointRequest(
                        name=tool.name, version=tool.version, endpoint=endpoint
                    ),
                    timeout=timeout,
                )
            except AgentplexError as exc:  # best effort: the registry may be gone first
                log.warning("could not withdraw %s from %s: %s", endpoint, tool.name, exc.message)

    async def close(self) -> None:
        await self._channel.close()
