"""Memory scopes and safety through the real mesh: history is per agent per session,
a delegated agent sees only what it is given, and concurrent tasks (or appends) on one
session lose no message."""

from __future__ import annotations

import asyncio

from agentplex.memory.client import MemoryClient
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import (
    agent_service_pb2_grpc,
    memory_pb2,
    task_pb2,
)

EVERYTHING = 1_000_000


async def test_twenty_concurrent_tasks_on_one_session_lose_no_turn(mesh, channel_to) -> None:  # type: ignore[no-untyped-def]
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


async def test_twenty_concurrent_appends_through_the_service_lose_nothing(mesh) -> None:  # type: ignore[no-untyped-def]
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


async def test_a_sub_agent_sees_only_its_own_scope(mesh, channel_to) -> None:  # type: ignore[no-untyped-def]
    """A delegation reaches the sub-agent as a task of its own: a prompt and a session
    id, nothing of the caller's history. Even under the caller's session id, the
    sub-agent's memory is its own (agent, session) scope."""
    memory = MemoryClient(mesh.memory)
    try:
        secret = memory_pb2.MemoryMessage(
            role=memory_pb2.ROLE_USER, content="the caller's secret is zq-7781"
        )
        await memory.append("assistant", "s-shared", [secret], timeout=5)

        researcher = agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["researcher"]))
        response = await researcher.RunTask(
            pb.RunTaskRequest(
                prompt="how does the registry validate?",
                session_id="s-shared",
                metadata={"delegated_by": "assistant"},
            ),
            timeout=30,
        )
        assert response.result.status == task_pb2.TASK_STATUS_COMPLETED

        sub = await memory.load("researcher", "s-shared", EVERYTHING, timeout=5)
        assert sub.messages[0].content == "how does the registry validate?"
        assert len(sub.messages) == 2
        assert not any("zq-7781" in m.content for m in sub.messages)
        caller = await memory.load("assistant", "s-shared", EVERYTHING, timeout=5)
        assert [m.content for m in caller.messages] == ["the caller's secret is zq-7781"]
    finally:
        await memory.close()
