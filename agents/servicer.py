"""gRPC adapter for `AgentRunner`: validates, sets the deadline, relays events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from agentplex.agents.runner import AgentRunner, TaskOutcome
from agentplex.contract import lineage
from agentplex.contract.task_request import TaskRequest
from agentplex.runtime.clients import Deadline
from agentplex.runtime.errors import InvalidArgument
from agentplex.tasks.service import TaskService
from agentplex.v1 import agent_pb2, agent_service_pb2, agent_service_pb2_grpc, step_event_pb2


async def _discard(event: step_event_pb2.StepEvent) -> None:
    return None


class AgentServicer(agent_service_pb2_grpc.AgentServiceServicer):
    def __init__(
        self,
        runner: AgentRunner,
        card: agent_pb2.AgentCard,
        tasks: TaskService,
        *,
        default_timeout_seconds: float,
    ) -> None:
        self._runner = runner
        self._card = card
        self._tasks = tasks
        self._default_timeout = default_timeout_seconds

    async def RunTask(
        self,
        request: agent_service_pb2.RunTaskRequest,
        context: grpc.aio.ServicerContext[
            agent_service_pb2.RunTaskRequest, agent_service_pb2.RunTaskResponse
        ],
    ) -> agent_service_pb2.RunTaskResponse:
        task = TaskRequest.from_proto(request)
        lineage.check_accepts(self._card.name, request.lineage)
        deadline = Deadline.from_context(context, self._default_timeout)
        outcome = await self._runner.run(task, deadline, _discard)
        if outcome.failure is not None:
            raise outcome.failure
        return agent_service_pb2.RunTaskResponse(result=outcome.result)

    async def StreamSteps(
        self,
        request: agent_service_pb2.StreamStepsRequest,
        context: grpc.aio.ServicerContext[
            agent_service_pb2.StreamStepsRequest, agent_service_pb2.StreamStepsResponse
        ],
    ) -> AsyncIterator[agent_service_pb2.StreamStepsResponse]:
        task = TaskRequest.from_proto(request)
        lineage.check_accepts(self._card.name, request.lineage)
        deadline = Deadline.from_context(context, self._default_timeout)
        events: asyncio.Queue[step_event_pb2.StepEvent | None] = asyncio.Queue()
        running: asyncio.Task[TaskOutcome] = asyncio.create_task(
            self._runner.run(task, deadline, events.put), name=f"task-{task.task_id}"
        )
        running.add_done_callback(lambda _: events.put_nowait(None))
        try:
            while (event := await events.get()) is not None:
                yield agent_service_pb2.StreamStepsResponse(event=event)
            outcome = running.result()
        finally:
            # The caller hung up (or the stream broke): stop the task with it.
            if not running.done():
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
        if outcome.failure is not None:
            raise outcome.failure

    async def GetAgentCard(
        self,
        request: agent_service_pb2.GetAgentCardRequest,
        context: grpc.aio.ServicerContext[
            agent_service_pb2.GetAgentCardRequest, agent_service_pb2.GetAgentCardResponse
        ],
    ) -> agent_service_pb2.GetAgentCardResponse:
        return agent_service_pb2.GetAgentCardResponse(card=self._card)

    async def SubmitTask(
        self,
        request: agent_service_pb2.SubmitTaskRequest,
        context: grpc.aio.ServicerContext[
            agent_service_pb2.SubmitTaskRequest, agent_service_pb2.SubmitTaskResponse
        ],
    ) -> agent_service_pb2.SubmitTaskResponse:
        if not request.HasField("task"):
            raise InvalidArgument("task is required")
        task, created = await self._tasks.submit(request.task)
        return agent_service_pb2.SubmitTaskResponse(task=task, created=created)

    async def GetTask(
        self,
        request: agent_service_pb2.GetTaskRequest,
        context: grpc.aio.ServicerContext[
            agent_service_pb2.GetTaskRequest, agent_service_pb2.GetTaskResponse
        ],
    ) -> agent_service_pb2.GetTaskResponse:
        return agent_service_pb2.GetTaskResponse(task=await self._tasks.get(request.task_id))

    async def CancelTask(
        self,
        request: agent_service_pb2.CancelTaskRequest,
        context: grpc.aio.ServicerContext[
            agent_service_pb2.CancelTaskRequest, agent_service_pb2.CancelTaskResponse
        ],
    ) -> agent_service_pb2.CancelTaskResponse:
        return agent_service_pb2.CancelTaskResponse(task=await self._tasks.cancel(request.task_id))

    async def WatchTask(
        self,
        request: agent_service_pb2.WatchTaskRequest,
        context: grpc.aio.ServicerContext[
            agent_service_pb2.WatchTaskRequest, agent_service_pb2.WatchTaskResponse
        ],
    ) -> AsyncIterator[agent_service_pb2.WatchTaskResponse]:
        async for event in self._tasks.watch(
            request.task_id, request.after_sequence, final_only=request.final_only
        ):
            yield agent_service_pb2.WatchTaskResponse(event=event)
