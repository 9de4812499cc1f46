"""An agent process's tasks share its tool list until the registry moves on (real servers)."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from agentplex.contract.tool_definition import define
from agentplex.runtime.settings import Settings
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc, tool_pb2, tool_registry_service_pb2_grpc
from agentplex.v1 import tool_registry_service_pb2 as registry_pb

LIST_TOOLS = "/agentplex.v1.ToolRegistryService/ListTools"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Reuse bounded by the registry's revision alone, so no timing enters the test.
    return settings.model_copy(update={"tool_list_max_age_seconds": 3600.0})


def list_tools_calls() -> float:
    return (
        REGISTRY.get_sample_value(
            "agentplex_rpc_handled_total", {"method": LIST_TOOLS, "code": "OK"}
        )
        or 0.0
    )


async def test_tasks_reuse_the_list_until_a_call_reports_a_newer_revision(mesh, channel_to) -> None:
    assistant = agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["assistant"]))
    registry = tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel_to(mesh.registry))

    async def task() -> str:
        done = await assistant.RunTask(pb.RunTaskRequest(prompt="what is 17*23?"), timeout=10)
        return done.result.output

    before = list_tools_calls()
    for _ in range(3):
        assert "391" in await task()
    assert list_tools_calls() == before + 1  # read once, by the first task

    await registry.RegisterTool(
        registry_pb.RegisterToolRequest(
            tool=define(
                name="weather.lookup",
                version="1.0.0",
                description="Looks up the current weather for a city.",
                input_schema={"type": "object", "properties": {"city": {"type": "string"}}},
                output_schema={"type": "object"},
                side_effect=tool_pb2.SIDE_EFFECT_READ_ONLY,
            )
        ),
        timeout=10,
    )
    # The next task starts on the shared list; its calculator call reports the newer
    # revision, so its second step reads the list again, and later tasks share that.
    assert "391" in await task()
    assert list_tools_calls() == before + 2
    assert "391" in await task()
    assert list_tools_calls() == before + 2
