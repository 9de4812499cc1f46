"""The runner times every plan-act-observe step and every model call."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

from prometheus_client import REGISTRY

from agentplex.agents.catalog import AgentSpec
from agentplex.agents.llm.scripted import ScriptedLLM
from agentplex.agents.runner import AgentRunner, RetryPolicy
from agentplex.contract.task_request import TaskRequest
from agentplex.runtime.clients import Deadline
from agentplex.v1 import (
    memory_pb2,
    memory_service_pb2,
    step_event_pb2,
    task_pb2,
    tool_pb2,
    tool_registry_service_pb2,
)

SPEC = AgentSpec("step-timer", "1.0.0", "test agent", "Be precise.", ("calculator",))


class Calculator:
    """A registry that serves one tool and answers every call with 5."""

    async def list_tools(
        self, agent: str = "", *, timeout: float
    ) -> tool_registry_service_pb2.ListToolsResponse:
        schema = {"type": "object", "properties": {"expression": {"type": "string"}}}
        return tool_registry_service_pb2.ListToolsResponse(
            tools=[
                tool_pb2.ToolDefinition(
                    name="calculator",
                    version="1.0.0",
                    description="arithmetic",
                    input_schema_json=json.dumps(schema),
                )
            ],
            revision=1,
        )

    async def invoke(
        self, request: tool_registry_service_pb2.InvokeToolRequest, *, timeout: float
    ) -> tool_registry_service_pb2.InvokeToolResponse:
        return tool_registry_service_pb2.InvokeToolResponse(
            tool_name=request.tool_name,
            tool_version="1.0.0",
            result_json=json.dumps({"value": 5}),
            registry_revision=1,
        )

    def invoke_stream(
        self, request: tool_registry_service_pb2.InvokeToolRequest, *, timeout: float
    ) -> AsyncIterator[tool_registry_service_pb2.InvokeToolStreamResponse]:
        raise AssertionError("nothing delegates here")


class Memory:
    async def load(
        self, agent: str, session_id: str, max_tokens: int, *, timeout: float
    ) -> memory_service_pb2.LoadContextResponse:
        return memory_service_pb2.LoadContextResponse()

    async def append(
        self,
        agent: str,
        session_id: str,
        messages: Sequence[memory_pb2.MemoryMessage],
        *,
        timeout: float,
    ) -> int:
        return len(messages)

    async def read(self, *args: object, **kwargs: object) -> object:
        raise AssertionError("nothing summarizes here")

    async def store_summary(self, *args: object, **kwargs: object) -> object:
        raise AssertionError("nothing summarizes here")


async def ignore(event: step_event_pb2.StepEvent) -> None:
    return None


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_each_step_and_model_call_is_timed() -> None:
    llm = ScriptedLLM()
    steps = {"agent": SPEC.name}
    calls = {"agent": SPEC.name, "model": llm.model}
    before = (
        sample("agentplex_step_duration_seconds_count", steps),
        sample("agentplex_llm_call_duration_seconds_count", calls),
        sample("agentplex_step_duration_seconds_bucket", {**steps, "le": "+Inf"}),
    )
    runner = AgentRunner(
        spec=SPEC,
        llm=llm,
        tools=Calculator(),
        memory=Memory(),  # type: ignore[arg-type]
        context_tokens=1000,
        retry=RetryPolicy(attempts=1, initial_seconds=0.0, max_seconds=0.0),
    )
    task = TaskRequest(
        task_id="t-steps", prompt="2 + 3", session_id="s1", max_steps=5, token_budget=8192
    )

    outcome = await runner.run(task, Deadline.after(10), ignore)

    # Step 1 calls the calculator, step 2 answers from its result.
    assert outcome.result.status == task_pb2.TASK_STATUS_COMPLETED
    assert outcome.result.steps_used == 2
    assert sample("agentplex_step_duration_seconds_count", steps) == before[0] + 2
    assert sample("agentplex_llm_call_duration_seconds_count", calls) == before[1] + 2
    assert sample("agentplex_step_duration_seconds_bucket", {**steps, "le": "+Inf"}) == (
        before[2] + 2
    )
    assert sample("agentplex_step_duration_seconds_sum", steps) > 0
