"""Tools that need a person's approval are refused, every call, until approvals exist."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import pytest

from agentplex.contract.reasons import Reason
from agentplex.contract.tool_definition import define
from agentplex.runtime.errors import PermissionDenied, from_rpc_error
from agentplex.runtime.interceptors import EdgeInterceptor
from agentplex.v1 import tool_executor_service_pb2 as ex
from agentplex.v1 import tool_executor_service_pb2_grpc as ex_grpc
from agentplex.v1 import tool_pb2, tool_registry_service_pb2_grpc
from agentplex.v1 import tool_registry_service_pb2 as pb


class CountingBackend(ex_grpc.ToolExecutorServiceServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def ExecuteTool(self, request, context):
        self.calls += 1
        return ex.ExecuteToolResponse(result_json=json.dumps({"sent": True}))


@pytest.fixture
async def backend() -> AsyncIterator[tuple[CountingBackend, str]]:
    servicer = CountingBackend()
    server = grpc.aio.server(interceptors=[EdgeInterceptor()])
    ex_grpc.add_ToolExecutorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def payment(version: str = "1.0.0", *, requires_approval: bool = True) -> tool_pb2.ToolDefinition:
    tool = define(
        name="payments.send",
        version=version,
        description="Sends a payment.",
        input_schema={"type": "object", "properties": {"cents": {"type": "integer"}}},
        output_schema={"type": "object"},
        side_effect=tool_pb2.SIDE_EFFECT_SIDE_EFFECTING,
    )
    tool.requires_approval = requires_approval
    return tool


async def test_every_call_of_a_tool_needing_approval_is_refused(
    mesh, channel_to, backend, redis_client, key_prefix
) -> None:
    servicer, address = backend
    registry = tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel_to(mesh.registry))
    tool = payment()
    tool.endpoint = address
    published = await registry.RegisterTool(pb.RegisterToolRequest(tool=tool), timeout=10)
    assert published.tool.requires_approval
    await registry.SetAgentTools(
        pb.SetAgentToolsRequest(agent="payer", grants=[pb.ToolGrant(name="payments.send")]),
        timeout=10,
    )
    for caller in (pb.Caller(agent="payer", session_id="s"), pb.Caller(session_id="s")):
        request = pb.InvokeToolRequest(
            tool_name="payments.send",
            arguments_json=json.dumps({"cents": 100}),
            idempotency_key="t-1:1:0",
            caller=caller,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await registry.InvokeTool(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        error = from_rpc_error(info.value)
        assert isinstance(error, PermissionDenied)
        assert error.reason == Reason.APPROVAL_REQUIRED
        assert error.message == (
            "calling payments.send needs a person's approval, and this task runs "
            "unattended; approvals are not available yet"
        )
    assert servicer.calls == 0
    assert await redis_client.keys(f"{key_prefix}:idempotency:*") == []


async def test_requiring_approval_from_a_minor_version_on_is_allowed(
    mesh, channel_to, backend
) -> None:
    servicer, address = backend
    registry = tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel_to(mesh.registry))
    first = payment(requires_approval=False)
    first.endpoint = address
    await registry.RegisterTool(pb.RegisterToolRequest(tool=first), timeout=10)
    request = pb.InvokeToolRequest(
        tool_name="payments.send", idempotency_key="k-1", caller=pb.Caller(session_id="s")
    )
    assert json.loads((await registry.InvokeTool(request, timeout=10)).result_json) == {
        "sent": True
    }
    second = payment("1.1.0")
    second.endpoint = address
    assert (await registry.RegisterTool(pb.RegisterToolRequest(tool=second), timeout=10)).created
    request.idempotency_key = "k-2"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await registry.InvokeTool(request, timeout=10)
    assert from_rpc_error(info.value).reason == Reason.APPROVAL_REQUIRED
    assert servicer.calls == 1
