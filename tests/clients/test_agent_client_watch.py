"""`AgentClient.watch` across dropped streams, and its bearer token, against a real
gRPC server whose WatchTask drops the stream the way a replica going away does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from agentplex.clients.agent import AgentClient, AgentError
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc as pb_grpc
from agentplex.v1 import step_event_pb2, task_pb2

LAST = 5


def event(sequence: int) -> step_event_pb2.StepEvent:
    if sequence == LAST:
        return step_event_pb2.StepEvent(
            task_id="t",
            sequence=sequence,
            final_result=step_event_pb2.TaskFinished(result=task_pb2.TaskResult(output="done")),
        )
    return step_event_pb2.StepEvent(
        task_id="t", sequence=sequence, step_started=step_event_pb2.StepStarted()
    )


class FlakyAgent(pb_grpc.AgentServiceServicer):
    """Sends two events per stream, then drops it (UNAVAILABLE), until the last one.
    `drops` bounds how many streams it drops (None: every one)."""

    def __init__(self, drops: int | None = None) -> None:
        self.drops = drops
        self.watches: list[tuple[int, tuple[tuple[str, str], ...]]] = []

    async def WatchTask(
        self, request: pb.WatchTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchTaskResponse]:
        metadata = [(str(key), str(value)) for key, value in context.invocation_metadata() or ()]
        self.watches.append((request.after_sequence, tuple(metadata)))
        for sequence in range(request.after_sequence + 1, LAST + 1)[:2]:
            yield pb.WatchTaskResponse(event=event(sequence))
        dropping = self.drops is None or len(self.watches) <= self.drops
        if request.after_sequence + 2 < LAST and dropping:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "replica going away")

    async def GetTask(
        self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetTaskResponse:
        return pb.GetTaskResponse(
            task=task_pb2.Task(
                task_id="t", status=task_pb2.TASK_STATUS_COMPLETED, last_sequence=LAST
            )
        )


@pytest.fixture
async def serve():
    servers: list[grpc.aio.Server] = []

    async def start(servicer: FlakyAgent) -> str:
        server = grpc.aio.server()
        pb_grpc.add_AgentServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(None)


async def test_a_dropped_watch_resumes_after_the_last_event_without_gap_or_repeat(serve) -> None:
    agent = FlakyAgent()
    async with AgentClient(await serve(agent), agent="assistant", token="tok") as client:
        seen = [e.sequence async for e in client.watch("t")]
    assert seen == [1, 2, 3, 4, 5]
    assert [after for after, _ in agent.watches] == [0, 2, 4]
    for _, metadata in agent.watches:  # every reconnect carries the agent and the token
        assert ("x-agentplex-agent", "assistant") in metadata
        assert ("authorization", "Bearer tok") in metadata


async def test_a_watch_that_keeps_dropping_gives_up_with_the_error(serve) -> None:
    agent = FlakyAgent()
    async with AgentClient(await serve(agent)) as client:
        with pytest.raises(AgentError) as failed:
            async for _ in client.watch("t", reconnects=0):
                pass
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert "replica going away" in failed.value.message


async def test_a_finished_task_watched_from_its_end_ends_at_once(serve) -> None:
    agent = FlakyAgent(drops=0)
    async with AgentClient(await serve(agent)) as client:
        assert [e.sequence async for e in client.watch("t", after=LAST)] == []
    assert [after for after, _ in agent.watches] == [LAST]
