"""`AgentClient`: calling agents from Python with nothing but the contracts.

This module imports only grpcio, protobuf, google.rpc (googleapis-common-protos)
and the generated `agentplex.v1` stubs, which is all `pip install agentplex`
brings without the `mesh` extra: a program that only calls agents installs no
Redis, Envoy or control plane. It talks to an agent directly or through the
gateway (which picks the agent by the `x-agentplex-agent` header).

    async with AgentClient("localhost:8080", agent="assistant") as assistant:
        result = await assistant.run("what is 17*23?")
        async for event in assistant.stream("remember that the deploy is on Friday"):
            ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from agentplex.v1 import agent_pb2, step_event_pb2, task_pb2
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc as pb_grpc

AGENT_HEADER = "x-agentplex-agent"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
# A frozen agent or gateway fails a call within about 20 s instead of hanging it;
# pings only during calls, at most two without data, as any gRPC server accepts.
_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
]


class AgentError(Exception):
    """A call failed: its gRPC status code, message, and the `ErrorInfo` reason
    (e.g. "TASK_NOT_FOUND") when the mesh attached one."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason or code.name

    @classmethod
    def from_rpc_error(cls, err: grpc.aio.AioRpcError) -> AgentError:
        reason = ""
        for key, value in err.trailing_metadata() or ():
            if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
                for detail in status_pb2.Status.FromString(value).details:
                    info = error_details_pb2.ErrorInfo()
                    if detail.Unpack(info):
                        reason = info.reason
        return cls(err.code(), err.details() or err.code().name, reason)


def _limit(
    request: pb.RunTaskRequest | pb.StreamStepsRequest | task_pb2.TaskSpec,
    max_steps: int | None,
    token_budget: int | None,
) -> None:
    """Set the limits that were given; unset ones take the agent's defaults."""
    if max_steps is not None:
        request.max_steps = max_steps
    if token_budget is not None:
        request.token_budget = token_budget


class AgentClient:
    """One agent, reached at `address` (the agent itself, or the gateway with `agent`)."""

    def __init__(
        self,
        address: str,
        *,
        agent: str = "",
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        if channel is None:
            channel = (
                grpc.aio.secure_channel(address, credentials, options=_KEEPALIVE_OPTIONS)
                if credentials is not None
                else grpc.aio.insecure_channel(address, options=_KEEPALIVE_OPTIONS)
            )
        self._channel = channel
        self._stub = pb_grpc.AgentServiceStub(channel)
        self._metadata = ((AGENT_HEADER, agent),) if agent else ()

    async def run(
        self,
        prompt: str,
        *,
        session_id: str = "",
        max_steps: int | None = None,
        token_budget: int | None = None,
        timeout: float = 300.0,
    ) -> task_pb2.TaskResult:
        """Run a task within this call and return its result."""
        request = pb.RunTaskRequest(prompt=prompt, session_id=session_id)
        _limit(request, max_steps, token_budget)
        response: pb.RunTaskResponse = await self._call(self._stub.RunTask, request, timeout)
        return response.result

    async def stream(
        self,
        prompt: str,
        *,
        session_id: str = "",
        max_steps: int | None = None,
        token_budget: int | None = None,
        timeout: float = 300.0,
    ) -> AsyncIterator[step_event_pb2.StepEvent]:
        """Run a task within this call, yielding its step events as they happen."""
        request = pb.StreamStepsRequest(prompt=prompt, session_id=session_id)
        _limit(request, max_steps, token_budget)
        call = self._stub.StreamSteps(request, timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield response.event
        except grpc.aio.AioRpcError as err:
            raise AgentError.from_rpc_error(err) from None

    async def submit(
        self,
        prompt: str,
        *,
        task_id: str = "",
        session_id: str = "",
        max_steps: int | None = None,
        token_budget: int | None = None,
        timeout: float = 10.0,
    ) -> task_pb2.Task:
        """Queue a durable task (idempotent per `task_id`); returns it as accepted."""
        spec = task_pb2.TaskSpec(task_id=task_id, prompt=prompt, session_id=session_id)
        _limit(spec, max_steps, token_budget)
        response: pb.SubmitTaskResponse = await self._call(
            self._stub.SubmitTask, pb.SubmitTaskRequest(task=spec), timeout
        )
        return response.task

    async def watch(
        self, task_id: str, *, after: int = 0, final_only: bool = False
    ) -> AsyncIterator[step_event_pb2.StepEvent]:
        """A task's events after sequence `after`, until its final one (resumable)."""
        request = pb.WatchTaskRequest(task_id=task_id, after_sequence=after, final_only=final_only)
        call = self._stub.WatchTask(request, metadata=self._metadata)
        try:
            async for response in call:
                yield response.event
        except grpc.aio.AioRpcError as err:
            raise AgentError.from_rpc_error(err) from None

    async def get(self, task_id: str, *, timeout: float = 10.0) -> task_pb2.Task:
        response: pb.GetTaskResponse = await self._call(
            self._stub.GetTask, pb.GetTaskRequest(task_id=task_id), timeout
        )
        return response.task

    async def cancel(self, task_id: str, *, timeout: float = 10.0) -> task_pb2.Task:
        response: pb.CancelTaskResponse = await self._call(
            self._stub.CancelTask, pb.CancelTaskRequest(task_id=task_id), timeout
        )
        return response.task

    async def card(self, *, timeout: float = 10.0) -> agent_pb2.AgentCard:
        """The agent's name, description, version and tools."""
        response: pb.GetAgentCardResponse = await self._call(
            self._stub.GetAgentCard, pb.GetAgentCardRequest(), timeout
        )
        return response.card

    async def _call(self, rpc: Any, request: Any, timeout: float) -> Any:
        """One unary call with the agent header; a failure as `AgentError`."""
        try:
            return await rpc(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as err:
            raise AgentError.from_rpc_error(err) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
