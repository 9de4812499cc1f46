"""Memory scopes and safety through the real mesh: history is per agent per session,
a delegated agent sees only what it is given, and concurrent tasks (or appends) on one
session lose no message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from agentplex.agents import app as agents_app
from agentplex.agents.catalog import CATALOG
from agentplex.agents.llm.base import CompletionRequest, LLMEvent
from agentplex.agents.llm.scripted import ScriptedLLM
from agentplex.clients.memory import MemoryClient
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import (
    agent_service_pb2_grpc,
    memory_pb2,
    task_pb2,
)

EVERYTHING = 1_000_000


async def test_twenty_concurrent_tasks_on_one_session_lose_no_turn(mesh, channel_to) -> None:
    assistant = agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["assistant"]))
    prompts = [f"what is {n}*3?" for n in range(20)]
    responses = await asyncio.gather(
        *(
            assistant.RunTask(pb.RunTaskRequest(prompt=p, session_id="s-crowd"), timeout=30)
            for p in prompts
        )
    )
    assert all(r.result.status == task_pb2.TASK_STATUS_COMPLETED for r in responses)

    memory = MemoryClient(mesh.memory)
    try:
        packet = await memory.load("assistant", "s-crowd", EVERYTHING, timeout=5)
    finally:
        await memory.close()
    contents = [m.content for m in packet.messages]
    assert len(contents) == 40 and packet.next_position == 40
    assert sorted(contents[0::2]) == sorted(prompts)  # every turn, each one whole:
    for question, answer in zip(contents[0::2], contents[1::2], strict=True):
        n = int(question.removeprefix("what is ").removesuffix("*3?"))
        assert answer == f"{n}*3 = {n * 3}."


async def test_twenty_concurrent_appends_through_the_service_lose_nothing(mesh) -> None:
    clients = [MemoryClient(mesh.memory) for _ in range(4)]
    try:
        counts = await asyncio.gather(
            *(
                clients[w % 4].append(
                    "assistant",
                    "s-appends",
                    [
                        memory_pb2.MemoryMessage(role=memory_pb2.ROLE_USER, content=f"w{w}-{i}")
                        for i in range(3)
                    ],
                    timeout=5,
                )
                for w in range(20)
            )
        )
        packet = await clients[0].load("assistant", "s-appends", EVERYTHING, timeout=5)
    finally:
        for client in clients:
            await client.close()
    assert sorted(counts) == [3 * (n + 1) for n in range(20)]
    contents = [m.content for m in packet.messages]
    assert sorted(contents) == sorted(f"w{w}-{i}" for w in range(20) for i in range(3))
    for start in range(0, 60, 3):  # each append landed whole, in order
        writer = contents[start].split("-")[0]
        assert contents[start : start + 3] == [f"{writer}-{i}" for i in range(3)]


class RecordingLLM(ScriptedLLM):
    """The scripted model, keeping every request it was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[CompletionRequest] = []

    async def stream(self, request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        self.requests.append(request)
        async for event in super().stream(request):
            yield event


def contents(model: RecordingLLM) -> list[str]:
    return [m.content for request in model.requests for m in request.messages]


async def test_a_sub_agent_sees_only_its_own_scope(mesh, channel_to, start_worker) -> None:
    """A delegation reaches the sub-agent as a task of its own: the delegated prompt
    and its own (agent, session) memory, nothing of the caller's history. Checked on
    what the sub-agent's model was actually sent, in a real supervisor delegation."""
    sub_model = RecordingLLM()
    await start_worker("assistant", llm=sub_model)
    supervisor_model = RecordingLLM()
    host = agents_app.build_host(
        CATALOG["supervisor"], mesh.settings, metrics_port=None, llm=supervisor_model
    )
    address = (await host.start()).address
    memory = MemoryClient(mesh.memory)
    try:
        history = [
            memory_pb2.MemoryMessage(
                role=memory_pb2.ROLE_USER, content="the caller's secret is zq-7781"
            ),
            memory_pb2.MemoryMessage(
                role=memory_pb2.ROLE_ASSISTANT, content="noted: only the supervisor knows xk-4420"
            ),
        ]
        await memory.append("supervisor", "s-shared", history, timeout=5)

        supervisor = agent_service_pb2_grpc.AgentServiceStub(channel_to(address))
        response = await supervisor.RunTask(
            pb.RunTaskRequest(prompt="what is 17*23?", session_id="s-shared"), timeout=30
        )
        assert response.result.status == task_pb2.TASK_STATUS_COMPLETED
        assert "17*23 = 391." in response.result.output  # the sub-agent did answer

        # The supervisor's own model had the history (so there was something to leak) ...
        seen_by_supervisor = contents(supervisor_model)
        assert any("zq-7781" in c for c in seen_by_supervisor)
        assert any("xk-4420" in c for c in seen_by_supervisor)
        # ... and delegated: the sub-agent's model was called, with none of it.
        assert sub_model.requests
        first = sub_model.requests[0].messages
        assert [m.content for m in first if m.role == "user"] == ["what is 17*23?"]
        seen_by_sub = contents(sub_model)
        assert not any("zq-7781" in c or "xk-4420" in c for c in seen_by_sub)
        assert not any(m.content in c for m in history for c in seen_by_sub)

        # The caller's scope has the new turn; nothing of the sub-agent's went into it.
        caller = await memory.load("supervisor", "s-shared", EVERYTHING, timeout=5)
        assert [m.content for m in caller.messages][:2] == [m.content for m in history]
        assert len(caller.messages) == 4
    finally:
        await memory.close()
        await host.stop()
