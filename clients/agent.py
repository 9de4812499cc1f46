"""`AgentClient`: calling agents from Python with nothing but the contracts.

This module imports only grpcio, protobuf, google.rpc (googleapis-common-protos)
and the generated `agentplex.v1` stubs, which is all `pip install agentplex`
brings without the `mesh` extra: a program that only calls agents installs no
Redis, Envoy or control plane. It talks to an agent directly or through the
gateway (which picks the agent by the `x-agentplex-agent` header).

    async with AgentClient("localhost:8080", agent="assistant", token=TOKEN) as assistant:
        result = await assistant.run("what is 17*23?")
        async for event in assistant.stream("remember that the deploy is on Friday"):
            ...

`watch` follows a durable task to its end across dropped streams: a replica or
the gateway going away mid-watch costs a reconnect from the last sequence seen,
never a gap or a repeated event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from agentplex.v1 import agent_pb2, step_event_pb2, task_pb2
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc as pb_grpc

AGENT_HEADER = "x-agentplex-agent"
# A watch reconnects this many times in a row (each after a stream that delivered
# nothing new) before giving up with the last error; the wait doubles up to the cap.
WATCH_RECONNECTS = 5
_RECONNECT_FIRST_SECONDS = 0.2
_RECONNECT_MAX_SECONDS = 2.0
_FINAL_KINDS = ("final_result", "error")
_TERMINAL = (
    task_pb2.TASK_STATUS_COMPLETED,
    task_pb2.TASK_STATUS_FAILED,
    task_pb2.TASK_STATUS_CANCELLED,
)
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


async def _cancelled_when_left(call: Any) -> AsyncIterator[Any]:
    """The call's responses; the call is cancelled if the consumer stops early, so an
    abandoned watch does not hold its stream open on the server."""
    try:
        async for response in call:
            yield response
    finally:
        call.cancel()


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
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        """`token`: a bearer token for a gateway that checks them (`agentplex token`),
        sent on every call. Without `credentials` the channel then uses gRPC's local
        credentials, which connect to loopback only: a token never crosses a network
        in plaintext. With `credentials` (TLS) it rides on them; with a `channel` of
        the caller's, it is sent as a header and the channel is the caller's to secure."""
        call_token = grpc.access_token_call_credentials(token) if token else None
        if channel is None:
            if call_token is not None:
                transport = credentials or grpc.local_channel_credentials()
                credentials = grpc.composite_channel_credentials(transport, call_token)
            channel = (
                grpc.aio.secure_channel(address, credentials, options=_KEEPALIVE_OPTIONS)
                if credentials is not None
                else grpc.aio.insecure_channel(address, options=_KEEPALIVE_OPTIONS)
            )
            token = None  # carried by the credentials
        self._channel = channel
        self._stub = pb_grpc.AgentServiceStub(channel)
        metadata: list[tuple[str, str]] = [(AGENT_HEADER, agent)] if agent else []
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        self._metadata = tuple(metadata)

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
        self,
        task_id: str,
        *,
        after: int = 0,
        final_only: bool = False,
        reconnects: int = WATCH_RECONNECTS,
    ) -> AsyncIterator[step_event_pb2.StepEvent]:
        """A task's events after sequence `after`, until its final one.

        A stream that drops (UNAVAILABLE: a replica or the gateway went away) or ends
        before the final event is opened again after the last sequence seen, so the
        events come exactly once, in order; `reconnects` bounds how many times in a
        row that may happen without a new event (0: never). Any other failure is an
        `AgentError` at once."""
        cursor, failures = after, 0
        while True:
            request = pb.WatchTaskRequest(
                task_id=task_id, after_sequence=cursor, final_only=final_only
            )
            call = self._stub.WatchTask(request, metadata=self._metadata)
            error: grpc.aio.AioRpcError | None = None
            try:
                async for response in _cancelled_when_left(call):
                    event = response.event
                    if event.sequence <= cursor and not final_only:
                        continue  # never twice, whatever a server resends
                    cursor, failures = max(cursor, event.sequence), 0
                    yield event
                    if event.WhichOneof("kind") in _FINAL_KINDS:
                        return
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise AgentError.from_rpc_error(err) from None
                error = err
            else:
                # A clean end with no final event: the task ended before this stream
                # began (nothing after `cursor` to send), or the server let go early.
                try:
                    task = await self.get(task_id)
                except AgentError as err:
                    if err.code != grpc.StatusCode.UNAVAILABLE:
                        raise
                else:
                    if task.status in _TERMINAL and cursor >= task.last_sequence:
                        return
            failures += 1
            if failures > reconnects:
                if error is not None:
                    raise AgentError.from_rpc_error(error) from None
                raise AgentError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the watch of task {task_id} kept ending before the task did",
                )
            await asyncio.sleep(
                min(_RECONNECT_FIRST_SECONDS * 2 ** (failures - 1), _RECONNECT_MAX_SECONDS)
            )

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
