"""Versions, pins, lifecycle, backends and agents-as-tools, over real gRPC."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from agentplex.tools.calculator import Calculator
from agentplex.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    tool_pb2,
    tool_registry_service_pb2_grpc,
)
from agentplex.v1 import tool_executor_service_pb2 as ex
from agentplex.v1 import tool_executor_service_pb2_grpc as ex_grpc
from agentplex.v1 import tool_registry_service_pb2 as pb


@pytest.fixture
def registry(mesh, channel_to):
    return tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel_to(mesh.registry))


@pytest.fixture
def assistant(mesh, channel_to):
    return agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["assistant"]))


def calculator(version: str, endpoint: str, **schema_changes: object) -> tool_pb2.ToolDefinition:
    tool = tool_pb2.ToolDefinition()
    tool.CopyFrom(Calculator.definition)
    tool.version, tool.endpoint = version, endpoint
    schema = json.loads(tool.input_schema_json)
    for key, value in schema_changes.items():
        if key == "properties":
            schema["properties"].update(value)
        else:
            schema[key] = value
    tool.input_schema_json = json.dumps(schema)
    return tool


async def register(
    registry: tool_registry_service_pb2_grpc.ToolRegistryServiceStub, tool: tool_pb2.ToolDefinition
) -> pb.RegisterToolResponse:
    return await registry.RegisterTool(pb.RegisterToolRequest(tool=tool), timeout=5)


async def tool_call_version(assistant, prompt: str) -> tuple[str, str]:
    call = assistant.StreamSteps(agent_service_pb2.StreamStepsRequest(prompt=prompt), timeout=10)
    events = [r.event async for r in call]
    [tool_call] = [e.tool_call for e in events if e.HasField("tool_call")]
    return tool_call.tool_version, events[-1].final_result.result.output


async def test_worked_example_minor_breaking_major_and_a_pinned_agent(
    registry, assistant, mesh
) -> None:
    precision = {"precision": {"type": "integer", "minimum": 0, "maximum": 12}}
    # v1.1: an optional property: compatible, and the agent uses it on its next task.
    created = await register(registry, calculator("1.1.0", mesh.tools, properties=precision))
    assert created.created
    assert await tool_call_version(assistant, "what is 17*23?") == ("1.1.0", "17*23 = 391.")

    # v1.2: the new property becomes required: breaking, rejected with the reasons.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await register(
            registry,
            calculator(
                "1.2.0", mesh.tools, properties=precision, required=["expression", "precision"]
            ),
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "$.precision: property became required" in (caught.value.details() or "")
    assert "Publish it as 2.0.0 instead" in (caught.value.details() or "")

    # v2.0: the same change as a new major is fine...
    assert (
        await register(
            registry,
            calculator(
                "2.0.0", mesh.tools, properties=precision, required=["expression", "precision"]
            ),
        )
    ).created
    newest = await registry.GetTool(pb.GetToolRequest(name="calculator"), timeout=5)
    assert newest.tool.version == "2.0.0"
    # ...and the assistant, pinned to calculator@1, keeps working on 1.1.0.
    mine = await registry.ListTools(pb.ListToolsRequest(agent="assistant"), timeout=5)
    assert {t.name: t.version for t in mine.tools}["calculator"] == "1.1.0"
    assert await tool_call_version(assistant, "what is 6*7?") == ("1.1.0", "6*7 = 42.")
    # Explicitly asking a pinned agent for 2.x is refused.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.InvokeTool(
            pb.InvokeToolRequest(
                tool_name="calculator",
                version="2",
                arguments_json='{"expression": "1"}',
                caller=pb.Caller(agent="assistant"),
            ),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_deprecated_versions_warn_and_retired_ones_are_gone(registry, mesh) -> None:
    await register(registry, calculator("1.1.0", mesh.tools))
    await registry.SetToolState(
        pb.SetToolStateRequest(
            name="calculator",
            version="1.1.0",
            state=tool_pb2.TOOL_STATE_DEPRECATED,
            replacement="calculator@2",
        ),
        timeout=5,
    )
    invoke = pb.InvokeToolRequest(tool_name="calculator", arguments_json='{"expression": "2+2"}')
    response = await registry.InvokeTool(invoke, timeout=5)
    assert response.tool_version == "1.1.0" and json.loads(response.result_json)["result"] == 4
    assert response.warning == "calculator 1.1.0 is deprecated; move to calculator@2"

    # Retiring 1.1.0 falls back to the newest live 1.x; retiring that too leaves nothing.
    for version in ("1.1.0", "1.0.0"):
        await registry.SetToolState(
            pb.SetToolStateRequest(
                name="calculator",
                version=version,
                state=tool_pb2.TOOL_STATE_RETIRED,
                replacement="calculator@2",
            ),
            timeout=5,
        )
        if version == "1.1.0":
            assert (await registry.InvokeTool(invoke, timeout=5)).tool_version == "1.0.0"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.InvokeTool(invoke, timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "retired; use calculator@2" in (caught.value.details() or "")
    listed = await registry.ListTools(pb.ListToolsRequest(), timeout=5)
    assert "calculator" not in [t.name for t in listed.tools]
    every = await registry.ListTools(pb.ListToolsRequest(all_versions=True), timeout=5)
    assert {t.version for t in every.tools if t.name == "calculator"} == {"1.0.0", "1.1.0"}


async def test_deprecating_needs_a_replacement(registry) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.SetToolState(
            pb.SetToolStateRequest(
                name="calculator", version="1.0.0", state=tool_pb2.TOOL_STATE_DEPRECATED
            ),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_fifty_concurrent_calls_with_one_key_run_once(
    registry, redis_client, key_prefix
) -> None:
    request = pb.InvokeToolRequest(
        tool_name="notes.write",
        arguments_json='{"text": "once"}',
        idempotency_key="same",
        caller=pb.Caller(agent="assistant", session_id="s50"),
    )
    responses = await asyncio.gather(*(registry.InvokeTool(request, timeout=10) for _ in range(50)))
    assert sum(not r.replayed for r in responses) == 1
    assert {r.result_json for r in responses} == {responses[0].result_json}
    assert await redis_client.lrange(f"{key_prefix}:notes:s50", 0, -1) == [b"once"]


async def test_access_lists_are_set_in_the_registry(registry, assistant) -> None:
    await registry.SetAgentTools(
        pb.SetAgentToolsRequest(
            agent="assistant", grants=[pb.ToolGrant(name="docs.search", major=1)]
        ),
        timeout=5,
    )
    mine = await registry.ListTools(pb.ListToolsRequest(agent="assistant"), timeout=5)
    assert [t.name for t in mine.tools] == ["docs.search"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.InvokeTool(
            pb.InvokeToolRequest(
                tool_name="calculator",
                arguments_json='{"expression": "1"}',
                caller=pb.Caller(agent="assistant"),
            ),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The agent's next task only sees (and so only uses) what it was granted.
    response = await assistant.RunTask(
        agent_service_pb2.RunTaskRequest(prompt="what is 2*3?"), timeout=10
    )
    assert "2*3 = 6" not in response.result.output


class FlakyBackend(ex_grpc.ToolExecutorServiceServicer):
    """A real tool backend that is UNAVAILABLE for its first `failures` calls."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def ExecuteTool(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return ex.ExecuteToolResponse(result_json=json.dumps({"ok": True}))


@pytest.fixture
async def flaky():
    backend = FlakyBackend(failures=2)
    server = grpc.aio.server()
    ex_grpc.add_ToolExecutorServiceServicer_to_server(backend, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield backend, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def flaky_tool(
    name: str, endpoint: str, side_effect: tool_pb2.SideEffect
) -> tool_pb2.ToolDefinition:
    schema = json.dumps({"type": "object", "properties": {}})
    out = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}})
    return tool_pb2.ToolDefinition(
        name=name,
        version="1.0.0",
        description="Flaky.",
        input_schema_json=schema,
        output_schema_json=out,
        side_effect=side_effect,
        endpoint=endpoint,
    )


async def test_unavailable_backend_is_retried_for_idempotent_tools_only(registry, flaky) -> None:
    backend, endpoint = flaky
    await register(registry, flaky_tool("flaky.read", endpoint, tool_pb2.SIDE_EFFECT_READ_ONLY))
    response = await registry.InvokeTool(pb.InvokeToolRequest(tool_name="flaky.read"), timeout=10)
    assert json.loads(response.result_json) == {"ok": True}
    assert backend.calls == 3  # two failures retried, third call served

    backend.calls = 0
    await register(
        registry, flaky_tool("flaky.write", endpoint, tool_pb2.SIDE_EFFECT_SIDE_EFFECTING)
    )
    response = await registry.InvokeTool(
        pb.InvokeToolRequest(tool_name="flaky.write", idempotency_key="w1"), timeout=10
    )
    assert backend.calls == 1  # never blindly repeated
    # The backend failed mid-call without saying it took no effect: it may have
    # happened, so the model is told so, and at most once means the key keeps it.
    assert response.error.code == "OUTCOME_UNKNOWN"
    assert "warming up" in response.error.message
    again = await registry.InvokeTool(
        pb.InvokeToolRequest(tool_name="flaky.write", idempotency_key="w1"), timeout=10
    )
    assert again.replayed and again.error.code == "OUTCOME_UNKNOWN" and backend.calls == 1
    # A read-only call that failed for good is the mesh's failure, and leaves its
    # key free for a later retry.
    backend.calls, backend.failures = 0, 5
    failed = await registry.InvokeTool(
        pb.InvokeToolRequest(tool_name="flaky.read", idempotency_key="r1"), timeout=10
    )
    assert failed.error.code == "MESH_UNAVAILABLE" and backend.calls == 3
    backend.calls, backend.failures = 0, 0
    retried = await registry.InvokeTool(
        pb.InvokeToolRequest(tool_name="flaky.read", idempotency_key="r1"), timeout=10
    )
    assert not retried.replayed and json.loads(retried.result_json) == {"ok": True}


async def test_backend_gone_is_the_meshs_failure_not_the_tools(registry) -> None:
    from agentplex.mesh.redis_process import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    await register(registry, flaky_tool("gone.read", endpoint, tool_pb2.SIDE_EFFECT_READ_ONLY))
    response = await registry.InvokeTool(pb.InvokeToolRequest(tool_name="gone.read"), timeout=10)
    assert response.error.code == "MESH_UNAVAILABLE"
    assert "after 3 attempts" in response.error.message


async def test_agents_are_tools(registry, workers) -> None:
    """An agent tool runs a durable sub-task on that agent's queue (hence the workers)."""
    tool = (await registry.GetTool(pb.GetToolRequest(name="agent.assistant"), timeout=5)).tool
    assert tool.backend_kind == tool_pb2.BACKEND_KIND_AGENT
    response = await registry.InvokeTool(
        pb.InvokeToolRequest(
            tool_name="agent.assistant",
            arguments_json='{"prompt": "what is 17*23?"}',
            idempotency_key="delegate-1",
        ),
        timeout=20,
    )
    result = json.loads(response.result_json)
    assert result["output"] == "17*23 = 391." and result["error"] == ""
    assert result["task_id"].startswith("d-")
    replay = await registry.InvokeTool(
        pb.InvokeToolRequest(
            tool_name="agent.assistant",
            arguments_json='{"prompt": "what is 17*23?"}',
            idempotency_key="delegate-1",
        ),
        timeout=20,
    )
    assert replay.replayed and json.loads(replay.result_json) == result


async def test_several_backends_serve_one_version_and_a_dead_one_is_skipped(registry, mesh) -> None:
    """A second backend joins the first instead of taking its routes; one that
    went away is skipped (nothing was sent to it, so even side effects are safe)."""
    from agentplex.mesh.redis_process import free_port

    dead = f"127.0.0.1:{free_port()}"
    extra = calculator("1.0.0", dead)
    created = await register(registry, extra)
    assert not created.created  # same contract: one more backend, no new version
    got = (
        await registry.GetTool(pb.GetToolRequest(name="calculator", version="1.0.0"), timeout=5)
    ).tool
    assert sorted(got.endpoints) == sorted([mesh.tools, dead])
    for _ in range(4):  # whichever order is tried, the live backend answers
        response = await registry.InvokeTool(
            pb.InvokeToolRequest(tool_name="calculator", arguments_json='{"expression": "2*21"}'),
            timeout=10,
        )
        assert json.loads(response.result_json)["result"] == 42
    remaining = await registry.WithdrawEndpoint(
        pb.WithdrawEndpointRequest(name="calculator", version="1.0.0", endpoint=dead), timeout=5
    )
    assert remaining.remaining == 1
