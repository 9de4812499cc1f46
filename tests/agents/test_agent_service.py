"""AgentService end to end over real gRPC: real Redis, memory, registry and agents."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import REGISTRY

from agentplex.agents import app as agents_app
from agentplex.agents.catalog import ASSISTANT
from agentplex.agents.llm.base import CompletionRequest, LLMEvent, TextDelta
from agentplex.runtime.errors import from_rpc_error
from agentplex.v1 import (
    agent_service_pb2 as pb,
)
from agentplex.v1 import (
    agent_service_pb2_grpc,
    memory_pb2,
    memory_service_pb2,
    memory_service_pb2_grpc,
    task_pb2,
)


@pytest.fixture
def assistant(mesh, channel_to):
    return agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["assistant"]))


async def memory_messages(mesh, channel_to, agent: str, session: str):
    stub = memory_service_pb2_grpc.MemoryServiceStub(channel_to(mesh.memory))
    response = await stub.LoadContext(
        memory_service_pb2.LoadContextRequest(
            scope=memory_pb2.SessionScope(agent=agent, session_id=session)
        )
    )
    return list(response.messages)


async def test_run_task_uses_the_calculator(assistant) -> None:
    response = await assistant.RunTask(pb.RunTaskRequest(prompt="what is 17*23?"), timeout=10)
    result = response.result
    assert result.status == task_pb2.TASK_STATUS_COMPLETED
    assert "391" in result.output
    assert (result.steps_used, result.tool_calls, result.error) == (2, 1, "")
    assert result.tokens_used > 0 and result.task_id and result.session_id


async def test_stream_steps_streams_typed_events_in_order(assistant) -> None:
    call = assistant.StreamSteps(
        pb.StreamStepsRequest(prompt="what is 17*23?", task_id="t-1"), timeout=10
    )
    events = [response.event async for response in call]
    assert await call.code() == grpc.StatusCode.OK
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds[0] == "task_accepted" and kinds[-1] == "final_result"
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert {e.task_id for e in events} == {"t-1"} and {e.agent for e in events} == {"assistant"}
    [tool_call] = [e.tool_call for e in events if e.HasField("tool_call")]
    assert (tool_call.tool_name, tool_call.tool_version) == ("calculator", "1.0.0")
    assert json.loads(tool_call.arguments_json) == {"expression": "17*23"}
    assert tool_call.idempotency_key == "t-1:1:0"
    [tool_result] = [e.tool_result for e in events if e.HasField("tool_result")]
    assert json.loads(tool_result.result_json)["result"] == 391
    deltas = "".join(e.llm_output_delta.text for e in events if e.HasField("llm_output_delta"))
    final = events[-1].final_result.result
    assert deltas == final.output and "391" in final.output
    assert [
        e.llm_call_finished.finish_reason for e in events if e.HasField("llm_call_finished")
    ] == ["tool_calls", "stop"]


async def test_turn_is_saved_to_memory(mesh, channel_to, assistant) -> None:
    await assistant.RunTask(pb.RunTaskRequest(prompt="what is 2+2", session_id="s-mem"), timeout=10)
    messages = await memory_messages(mesh, channel_to, "assistant", "s-mem")
    assert [(m.role, m.content) for m in messages] == [
        (memory_pb2.ROLE_USER, "what is 2+2"),
        (memory_pb2.ROLE_ASSISTANT, "2+2 = 4."),
    ]


async def test_any_replica_serves_any_session(mesh, channel_to, assistant) -> None:
    """Agents are stateless: a second replica sees what the first one stored."""
    await assistant.RunTask(
        pb.RunTaskRequest(prompt="remember that the code is 4512", session_id="shared"), timeout=10
    )
    replica = agents_app.build_host(ASSISTANT, mesh.settings, metrics_port=None)
    endpoint = await replica.start()
    try:
        other = agent_service_pb2_grpc.AgentServiceStub(channel_to(endpoint.address))
        response = await other.RunTask(
            pb.RunTaskRequest(prompt="what did I ask you to remember?", session_id="shared"),
            timeout=10,
        )
    finally:
        await replica.stop()
    assert "the code is 4512" in response.result.output


async def test_side_effects_are_scoped_to_the_session(assistant) -> None:
    await assistant.RunTask(
        pb.RunTaskRequest(prompt="remember the secret", session_id="a"), timeout=10
    )
    other = await assistant.RunTask(
        pb.RunTaskRequest(prompt="what did I ask you to remember?", session_id="b"), timeout=10
    )
    assert "secret" not in other.result.output


async def test_max_steps_reached_completes_with_error(assistant) -> None:
    response = await assistant.RunTask(
        pb.RunTaskRequest(prompt="what is 3*3", max_steps=1), timeout=10
    )
    assert response.result.status == task_pb2.TASK_STATUS_COMPLETED
    assert response.result.error == "max steps reached"
    assert response.result.steps_used == 1


async def test_token_budget_exceeded_completes_with_partial_output(assistant) -> None:
    prompt = "what is 1+1? " + "padding " * 300
    response = await assistant.RunTask(
        pb.RunTaskRequest(prompt=prompt, token_budget=600), timeout=10
    )
    assert response.result.status == task_pb2.TASK_STATUS_COMPLETED
    assert response.result.error == "token budget exceeded"
    assert response.result.tokens_used <= 600 or response.result.steps_used >= 1


async def test_agent_card(assistant) -> None:
    card = (await assistant.GetAgentCard(pb.GetAgentCardRequest(), timeout=5)).card
    assert card.name == "assistant"
    assert list(card.tools) == ["calculator", "notes.read", "notes.write"]
    assert card.model == "scripted/scripted-1"
    assert (card.limits.max_steps_limit, card.limits.default_token_budget) == (25, 8192)


BAD_REQUESTS = [
    pytest.param({"prompt": ""}, "prompt", id="empty-prompt"),
    pytest.param({"prompt": "hi", "max_steps": 0}, "max_steps", id="max-steps-0"),
    pytest.param({"prompt": "hi", "max_steps": 26}, "max_steps", id="max-steps-26"),
    pytest.param({"prompt": "hi", "token_budget": 100}, "token_budget", id="budget-100"),
    pytest.param({"prompt": "x" * (64 * 1024 + 1)}, "64 KiB", id="prompt-over-64KiB"),
    pytest.param({"prompt": "hi", "task_id": "bad id!"}, "task_id", id="bad-task-id"),
]


@pytest.mark.parametrize(("fields", "named"), BAD_REQUESTS)
async def test_bad_run_task_is_invalid_argument_and_writes_nothing(
    mesh, channel_to, assistant, fields, named
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await assistant.RunTask(pb.RunTaskRequest(session_id="untouched", **fields), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (caught.value.details() or "")
    assert from_rpc_error(caught.value).reason == "INVALID_ARGUMENT"
    assert await memory_messages(mesh, channel_to, "assistant", "untouched") == []


@pytest.mark.parametrize(("fields", "named"), BAD_REQUESTS)
async def test_bad_stream_steps_fails_before_any_event(assistant, fields, named) -> None:
    call = assistant.StreamSteps(pb.StreamStepsRequest(**fields), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pytest.fail("no event may be sent for a rejected request")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (caught.value.details() or "")


class HangingLLM:
    """Streams one delta, then waits forever: lets tests stop a task mid-flight."""

    model = "test/hanging"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def stream(self, request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        self.started.set()
        try:
            yield TextDelta("thinking")
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def hanging_agent(mesh, channel_to):
    llm = HangingLLM()
    host = agents_app.build_host(ASSISTANT, mesh.settings, metrics_port=None, llm=llm)
    endpoint = await host.start()
    try:
        yield llm, agent_service_pb2_grpc.AgentServiceStub(channel_to(endpoint.address))
    finally:
        await host.stop()


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_client_disconnect_cancels_the_task(hanging_agent, eventually) -> None:
    llm, stub = hanging_agent
    cancelled_before = _sample("agentplex_tasks_total", agent="assistant", status="cancelled")
    call = stub.StreamSteps(
        pb.StreamStepsRequest(prompt="think hard", session_id="gone"), timeout=30
    )
    async for response in call:
        if response.event.HasField("llm_output_delta"):
            break
    call.cancel()
    await asyncio.wait_for(llm.cancelled.wait(), timeout=5)
    await eventually(
        lambda: (
            _sample("agentplex_tasks_total", agent="assistant", status="cancelled")
            == cancelled_before + 1
        ),
        message="the cancelled task was not counted",
    )


async def test_deadline_stops_the_task_with_deadline_exceeded(hanging_agent) -> None:
    llm, stub = hanging_agent
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RunTask(pb.RunTaskRequest(prompt="think hard"), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(llm.cancelled.wait(), timeout=5)


async def test_one_trace_spans_task_llm_and_tool_across_services(
    spans, assistant, eventually
) -> None:
    spans.clear()
    await assistant.RunTask(pb.RunTaskRequest(prompt="what is 5*5", task_id="traced"), timeout=10)

    def finished() -> bool:
        names = {s.name for s in spans.get_finished_spans()}
        return {"agent.task", "agent.llm_call", "agent.tool_call", "registry.invoke"} <= names

    await eventually(finished, message="expected spans missing")
    by_name = {s.name: s for s in spans.get_finished_spans()}
    task_span = by_name["agent.task"]
    assert task_span.attributes["agent.task_id"] == "traced"
    # The registry's span joined the agent's trace through gRPC metadata.
    assert by_name["registry.invoke"].context.trace_id == task_span.context.trace_id
    assert by_name["agent.tool_call"].context.trace_id == task_span.context.trace_id
