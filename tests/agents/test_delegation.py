"""Delegation over the real mesh when things go wrong: a delegation replayed under
the same key re-attaches to its sub-task, and a sub-task whose event stream is
lost still ends its branch of the tree and is charged to the caller."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from agentplex.agents.llm.base import CompletionRequest, LLMEvent
from agentplex.agents.llm.scripted import ScriptedLLM
from agentplex.registry.ledger import ledger_key
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import (
    agent_service_pb2_grpc,
    step_event_pb2,
    task_pb2,
    tool_registry_service_pb2,
    tool_registry_service_pb2_grpc,
)


def kinds(events: list[step_event_pb2.StepEvent], kind: str) -> list[step_event_pb2.StepEvent]:
    return [e for e in events if e.WhichOneof("kind") == kind]


def tokens(event: step_event_pb2.StepEvent) -> int:
    return event.llm_call_finished.prompt_tokens + event.llm_call_finished.completion_tokens


async def test_a_replayed_delegation_re_attaches_to_its_running_sub_task(
    mesh, channel_to, redis_client, start_worker, make_gate, gated, eventually
) -> None:
    gate = make_gate()  # holds the sub-task in its first model call
    await start_worker("assistant", llm=gated(gate))
    registry = tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel_to(mesh.registry))
    caller = tool_registry_service_pb2.Caller(
        agent="supervisor", session_id="s-replay", task_id="t-parent"
    )
    key = "t-parent:1:0"

    def invocation(share: int) -> tool_registry_service_pb2.InvokeToolStreamRequest:
        return tool_registry_service_pb2.InvokeToolStreamRequest(
            invocation=tool_registry_service_pb2.InvokeToolRequest(
                tool_name="agent.assistant",
                arguments_json=json.dumps({"prompt": "what is 17*23?"}),
                idempotency_key=key,
                caller=caller,
                token_budget=share,
            )
        )

    first = registry.InvokeToolStream(invocation(4000), timeout=60)
    first_items = first.__aiter__()
    subtask = (await first_items.__anext__()).subtask
    assert subtask.task_id
    await eventually(lambda: gate.arrived >= 1, message="the sub-task did not start")

    # The parent is replayed (its worker died, its ledger claim expired): the
    # registry runs the delegation again, with a new deadline and a smaller share.
    await redis_client.delete(ledger_key(mesh.settings.key_prefix, "supervisor", "s-replay", key))
    second = registry.InvokeToolStream(invocation(3000), timeout=90)
    second_items = second.__aiter__()
    again = await second_items.__anext__()
    assert again.WhichOneof("item") == "subtask", again  # not a TASK_ID_REUSED tool error
    assert again.subtask.task_id == subtask.task_id

    gate.open()
    first_rest = [item async for item in first_items]
    second_rest = [item async for item in second_items]
    for items in (first_rest, second_rest):
        response = items[-1].response
        assert not response.HasField("error"), response.error
        payload = json.loads(response.result_json)
        assert payload["task_id"] == subtask.task_id and payload["output"] == "17*23 = 391."
        finals = [i.event for i in items if i.event.WhichOneof("kind") == "final_result"]
        assert [f.task_id for f in finals] == [subtask.task_id]

    # One sub-task, run once, with the limits it was first given.
    assistant = agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["assistant"]))
    record = (await assistant.GetTask(pb.GetTaskRequest(task_id=subtask.task_id), timeout=5)).task
    assert record.status == task_pb2.TASK_STATUS_COMPLETED and record.attempts == 1
    prefix = f"{mesh.settings.key_prefix}:task:assistant:"
    records = [k for k in await redis_client.keys(f"{prefix}*") if not k.endswith(b":events")]
    assert records == [f"{prefix}{subtask.task_id}".encode()]


async def test_a_replayed_delegation_with_another_prompt_is_still_refused(
    mesh, channel_to, redis_client, workers
) -> None:
    registry = tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel_to(mesh.registry))
    caller = tool_registry_service_pb2.Caller(agent="supervisor", session_id="s-x", task_id="t-p")

    def invocation(prompt: str) -> tool_registry_service_pb2.InvokeToolRequest:
        return tool_registry_service_pb2.InvokeToolRequest(
            tool_name="agent.assistant",
            arguments_json=json.dumps({"prompt": prompt}),
            idempotency_key="t-p:1:0",
            caller=caller,
            token_budget=4000,
        )

    done = await registry.InvokeTool(invocation("what is 2+2?"), timeout=30)
    assert not done.HasField("error"), done.error
    await redis_client.delete(ledger_key(mesh.settings.key_prefix, "supervisor", "s-x", "t-p:1:0"))
    other = await registry.InvokeTool(invocation("what is 3+3?"), timeout=30)
    assert other.error.code == "TASK_ID_REUSED"


class HeldAfterFirstCall(ScriptedLLM):
    """The scripted model, but every call after the first waits for `release`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.release = asyncio.Event()

    async def stream(self, request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        self.calls += 1
        if self.calls > 1:
            await self.release.wait()
        async for event in super().stream(request):
            yield event


async def test_a_lost_sub_task_stream_still_ends_its_branch_and_is_charged(
    mesh, channel_to, redis_client, start_worker
) -> None:
    model = HeldAfterFirstCall()
    await start_worker("assistant", llm=model)
    supervisor = agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["supervisor"]))
    call = supervisor.StreamSteps(pb.StreamStepsRequest(prompt="what is 17*23?"), timeout=60)
    events: list[step_event_pb2.StepEvent] = []
    try:
        async for response in call:
            events.append(response.event)
            if response.event.agent == "assistant" and kinds([response.event], "llm_call_finished"):
                # The sub-task has spent tokens and is held in its next model call;
                # now its record vanishes, so the registry loses its event stream.
                child = response.event.source_task_id
                await redis_client.delete(f"{mesh.settings.key_prefix}:task:assistant:{child}")
    finally:
        model.release.set()

    [started] = kinds(events, "delegation_started")
    child = started.delegation_started.task_id
    spent = sum(tokens(e) for e in kinds(events, "llm_call_finished") if e.source_task_id == child)
    assert spent > 0
    [finished] = kinds(events, "delegation_finished")  # the branch ends
    assert finished.delegation_finished.task_id == child and finished.depth == 0
    result = finished.delegation_finished.result
    assert result.status == task_pb2.TASK_STATUS_FAILED
    assert "lost the sub-task's event stream" in result.error
    assert result.tokens_used == spent
    [final] = kinds(events, "final_result")
    own = sum(tokens(e) for e in kinds(events, "llm_call_finished") if not e.source_task_id)
    assert final.final_result.result.tokens_used == own + spent  # charged to the caller
