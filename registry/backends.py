"""How the registry reaches the service that runs a tool.

`ToolRegistry.invoke` checks a call once and hands the result on as an
`Invocation`; `BackendRouter` sends it by the tool's backend kind.
`ExecutorBackend` calls a ToolExecutorService. `AgentBackend` turns an agent
tool (`agent.<name>`) into a durable sub-task on that agent's queue
(SubmitTask), followed with WatchTask and relayed to a streaming caller; each
downstream agent is guarded by a circuit breaker. Both reach their backends
through a `Connections` pool of their own (each kind of backend has its own mesh
identity, which an mTLS channel verifies). Every call gets the caller's remaining
deadline, capped by the tool timeout (a sub-task by the deadline alone).
UNAVAILABLE is retried only for tools declared read-only or idempotent (a
side-effecting call that may have happened is never blindly repeated).

A backend that stays unavailable is the mesh's failure, not the tool's answer:
`MESH_UNAVAILABLE`, which the caller's runner turns into a failed attempt (to
be run again) instead of showing it to its model. That code promises the call
took no effect a repeat under its key would duplicate, so it is given only
when that holds: for tools safe to repeat; when no backend accepted a
connection (nothing was sent); when the backend itself said its own
dependency was down (`Reason.BACKEND_DEPENDENCY_UNAVAILABLE`); and for agent
tools, whose sub-task id comes from the key, so a repeat re-attaches. A
side-effecting call whose backend failed mid-call may have happened:
`OUTCOME_UNKNOWN`, which the model is told.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from agentplex.contract import agent_tool, callers, limits, lineage
from agentplex.contract.events import is_final
from agentplex.contract.reasons import Reason, ToolErrorCode
from agentplex.registry import metrics
from agentplex.registry.breaker import CircuitBreaker
from agentplex.runtime import errors
from agentplex.runtime.clients import Deadline, Keepalive, call_with_deadline, open_channel
from agentplex.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    step_event_pb2,
    task_pb2,
    tool_executor_service_pb2,
    tool_executor_service_pb2_grpc,
    tool_pb2,
    tool_registry_service_pb2,
)

if TYPE_CHECKING:
    from agentplex.runtime.tls import MeshTls

RETRY_ATTEMPTS = 3
# Re-attaching to a sub-task's event stream after it broke (it runs on regardless).
WATCH_ATTEMPTS = 3
# Tool error codes that count against a downstream agent's breaker: it was
# unreachable, too slow, its queue was full, or its task failed. Any other error
# (refusals, cancellations, budget limits, the caller's own deadline) says
# nothing about its health and gives no verdict: it neither counts as a failure
# nor resets the count, and a half-open probe that ends so frees its slot.
BREAKER_FAILURES = frozenset(
    {
        ToolErrorCode.MESH_UNAVAILABLE,
        ToolErrorCode.UNAVAILABLE,
        ToolErrorCode.TIMEOUT,
        ToolErrorCode.AGENT_FAILED,
        Reason.QUEUE_FULL,
        # A failed sub-task reports the name of its status code (TaskFailed.code).
        *(
            code.name
            for code in (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.INTERNAL,
                grpc.StatusCode.UNKNOWN,
                grpc.StatusCode.ABORTED,
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        ),
    }
)

Progress = Callable[[tool_registry_service_pb2.InvokeToolStreamResponse], Awaitable[None]]
"""Receives what a streamed invocation relays: an agent tool's sub-task, then its events."""
# How long one backend gets to accept a connection before the next is tried.
CONNECT_SECONDS = 1.0
# A backend that failed to connect is tried last for this long.
SUSPECT_SECONDS = 10.0
MAX_CHANNELS = 256
SAFE_TO_REPEAT = (tool_pb2.SIDE_EFFECT_READ_ONLY, tool_pb2.SIDE_EFFECT_IDEMPOTENT)

ExecuteResponse = tool_executor_service_pb2.ExecuteToolResponse

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Invocation:
    """One tool call as checked by the registry, built once and passed down whole.

    Everything a backend needs travels together, so adding a field touches
    the one place that builds it and the one place that reads it.
    """

    tool: tool_pb2.ToolDefinition
    """The resolved version (its contract, backend kind and side effect class)."""
    arguments: dict[str, Any]
    """Parsed, and valid against the version's input schema."""
    caller: tool_registry_service_pb2.Caller
    deadline: Deadline
    idempotency_key: str = ""
    token_budget: int = 0
    """Caps an agent tool's sub-task budget (0: no cap)."""
    progress: Progress | None = None
    """Receives what a streamed invocation relays; None for a unary call."""

    @property
    def safe_to_repeat(self) -> bool:
        """Declared read-only or idempotent: running it again does no harm."""
        return self.tool.side_effect in SAFE_TO_REPEAT


class NotConnected(errors.Unavailable):
    """No backend of the tool accepted a connection: nothing was sent to any."""


class Connections:
    """Connections, not state: one channel per backend address, reused, and the
    addresses that lately failed to accept one (tried last).

    With `tls` (the registry's mesh credentials) the channels are mTLS and accept only
    backends whose certificate names `server_identity`."""

    def __init__(
        self,
        keepalive: Keepalive | None = None,
        *,
        tls: MeshTls | None = None,
        server_identity: str | None = None,
    ) -> None:
        self._keepalive = keepalive
        self._tls = tls
        self._server_identity = server_identity
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._suspect: dict[str, float] = {}

    def channel(self, endpoint: str) -> grpc.aio.Channel:
        if endpoint not in self._channels:
            if len(self._channels) >= MAX_CHANNELS:
                # Drop the oldest: backends that left long ago should not pin sockets.
                oldest = next(iter(self._channels))
                asyncio.get_running_loop().create_task(self._channels.pop(oldest).close())
            # Tool backends may be written in any language with gRPC's default
            # ping policy: keepalive that such a server accepts.
            self._channels[endpoint] = open_channel(
                endpoint,
                self._keepalive,
                any_server=True,
                tls=self._tls,
                server_identity=self._server_identity,
            )
        return self._channels[endpoint]

    async def connect(
        self, tool: tool_pb2.ToolDefinition, endpoints: list[str], deadline: Deadline
    ) -> grpc.aio.Channel:
        """A backend that accepts a connection. Nothing has been sent to the ones
        skipped, so moving on is safe even for side-effecting tools."""
        now = time.monotonic()
        # Spread load; try backends that failed recently last.
        order = sorted(endpoints, key=lambda e: (self._suspect.get(e, 0) > now, random.random()))
        for endpoint in order:
            channel = self.channel(endpoint)
            if channel.get_state() == grpc.ChannelConnectivity.READY:
                return channel  # the common case: no waiting, no extra task
            try:
                await asyncio.wait_for(
                    channel.channel_ready(), timeout=deadline.timeout(CONNECT_SECONDS)
                )
            except TimeoutError:
                self._suspect[endpoint] = time.monotonic() + SUSPECT_SECONDS
                continue
            self._suspect.pop(endpoint, None)
            return channel
        raise NotConnected(
            f"no backend of {tool.name} {tool.version} accepted a connection "
            f"(tried {', '.join(order)})"
        )

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


class _Backend(ABC):
    """What both kinds of backend share: connect, send, retry what is safe to
    repeat, and turn every failure the model can route around into a tool error."""

    def __init__(
        self, connections: Connections, *, tool_timeout_seconds: float, retry_wait_seconds: float
    ) -> None:
        self._connections = connections
        self._tool_timeout = tool_timeout_seconds
        self._retry_wait = retry_wait_seconds

    async def execute(self, invocation: Invocation, endpoints: list[str]) -> ExecuteResponse:
        return await self._execute(invocation, endpoints)

    @abstractmethod
    async def _send(self, invocation: Invocation, channel: grpc.aio.Channel) -> ExecuteResponse:
        """One attempt over a connected channel."""

    async def _execute(self, invocation: Invocation, endpoints: list[str]) -> ExecuteResponse:
        tool, deadline = invocation.tool, invocation.deadline
        attempts = RETRY_ATTEMPTS if invocation.safe_to_repeat else 1
        try:
            async for attempt in self._retrying(attempts):
                with attempt:
                    channel = await self._connections.connect(tool, endpoints, deadline)
                    return await self._send(invocation, channel)
        except errors.DeadlineExceeded:
            if deadline.remaining() < 0.01:
                raise  # the caller's own deadline: the whole call is over
            # Only the tool's own time limit ran out: the model can try something else.
            return _failure(
                ToolErrorCode.TIMEOUT,
                f"{tool.name} took longer than its {self._tool_timeout:g}s limit",
            )
        except errors.Unavailable as exc:
            retried = f" after {attempts} attempts" if attempts > 1 else ""
            if self._repeatable(invocation, exc):
                return _failure(
                    ToolErrorCode.MESH_UNAVAILABLE,
                    f"{tool.name} could not be run{retried}: {exc.message}",
                )
            return _failure(
                ToolErrorCode.OUTCOME_UNKNOWN,
                f"{tool.name}'s backend failed during the call ({exc.message}); it may or "
                "may not have taken effect, and will not run again under this idempotency key",
            )
        except errors.AgentplexError as exc:
            return _failure(exc.reason, exc.message)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _repeatable(self, invocation: Invocation, failure: errors.Unavailable) -> bool:
        """Whether a call that ended unavailable took no effect a repeat under its
        key would duplicate: then it is the mesh's failure (`MESH_UNAVAILABLE`),
        and the key is given back for the retry."""
        return (
            invocation.safe_to_repeat
            or isinstance(failure, NotConnected)
            or failure.reason == Reason.BACKEND_DEPENDENCY_UNAVAILABLE
        )

    def _retrying(self, attempts: int) -> AsyncRetrying:
        """UNAVAILABLE only: nothing else a backend says gets better by asking again."""
        return AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential_jitter(
                multiplier=self._retry_wait, jitter=self._retry_wait, max=1.0
            ),
            retry=retry_if_exception_type(errors.Unavailable),
            reraise=True,
        )


class ExecutorBackend(_Backend):
    """Executor tools: one ExecuteTool call, within the tool's time limit."""

    async def _send(self, invocation: Invocation, channel: grpc.aio.Channel) -> ExecuteResponse:
        stub = tool_executor_service_pb2_grpc.ToolExecutorServiceStub(channel)
        return await call_with_deadline(
            stub.ExecuteTool,
            tool_executor_service_pb2.ExecuteToolRequest(
                tool_name=invocation.tool.name,
                tool_version=invocation.tool.version,
                arguments_json=json.dumps(invocation.arguments),
                caller=invocation.caller,
                idempotency_key=invocation.idempotency_key,
            ),
            timeout=invocation.deadline.timeout(self._tool_timeout),
        )


class AgentBackend(_Backend):
    """Agent tools: a durable sub-task on the agent's queue, followed to its end,
    behind one circuit breaker per downstream agent."""

    def __init__(
        self,
        connections: Connections,
        *,
        tool_timeout_seconds: float,
        retry_wait_seconds: float,
        breaker_failure_threshold: int,
        breaker_reset_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(
            connections,
            tool_timeout_seconds=tool_timeout_seconds,
            retry_wait_seconds=retry_wait_seconds,
        )
        self._breaker_threshold = breaker_failure_threshold
        self._breaker_reset = breaker_reset_seconds
        self._clock = clock
        # Per-process health knowledge about downstream agents (see breaker.py).
        self._breakers: dict[str, CircuitBreaker] = {}

    def breaker(self, tool_name: str) -> CircuitBreaker:
        """The breaker guarding one downstream agent (created on first use)."""
        if tool_name not in self._breakers:
            self._breakers[tool_name] = CircuitBreaker(
                failure_threshold=self._breaker_threshold,
                reset_seconds=self._breaker_reset,
                clock=self._clock,
                on_transition=metrics.breaker_transitions(tool_name),
            )
        return self._breakers[tool_name]

    async def execute(self, invocation: Invocation, endpoints: list[str]) -> ExecuteResponse:
        """A sub-agent that keeps failing is not called again until its cool-down
        ends: the caller's model gets a tool error it can route around at once
        instead of a timeout each time."""
        tool = invocation.tool
        breaker = self.breaker(tool.name)
        if not breaker.allow():
            refusal = (
                f"{tool.name} failed {breaker.consecutive_failures} times in a row and is "
                f"not being called for the next {breaker.retry_after():.0f}s"
            )
            if breaker.last_failure == ToolErrorCode.MESH_UNAVAILABLE:
                # Open because the agent is unreachable: an outage of the mesh, which
                # the caller's attempt waits out, not a verdict on the agent's work.
                return _failure(ToolErrorCode.MESH_UNAVAILABLE, f"{refusal}: unreachable")
            return _failure(ToolErrorCode.CIRCUIT_OPEN, f"{refusal}; do without it")
        verdict: bool | None = None
        cause = ""
        try:
            response = await self._execute(invocation, endpoints)
            verdict = breaker_verdict(response)
            if verdict is False:
                cause = response.error.code
            return response
        finally:
            # No verdict when the caller gave up (cancelled, or its own deadline).
            breaker.record(verdict, cause=cause)

    def _repeatable(self, invocation: Invocation, failure: errors.Unavailable) -> bool:
        """Always: the sub-task's id comes from the idempotency key, so a repeat
        re-attaches to the sub-task it may have started instead of starting another."""
        return True

    async def _send(self, invocation: Invocation, channel: grpc.aio.Channel) -> ExecuteResponse:
        """Delegate: a durable sub-task on the agent's queue, followed to its end.

        Durable, so the sub-task has a record of its own (status, lineage,
        result: `GetTask` on that agent) and its events can be watched by
        anyone. It is bounded by the caller's deadline (carried in the spec,
        so even a worker that picks it up late stops in time) and its share of
        the caller's budget, and it does not outlive the call: when the caller
        goes away or its deadline passes, the sub-task is cancelled.
        """
        tool = invocation.tool
        budget = subtask_budget(invocation)
        if budget < limits.MIN_TOKEN_BUDGET:
            return _failure(
                ToolErrorCode.TOKEN_BUDGET_EXCEEDED,
                f"token budget exceeded: only {budget} tokens are left for {tool.name}, "
                f"and a sub-task needs at least {limits.MIN_TOKEN_BUDGET}",
            )
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        submitted = await call_with_deadline(
            stub.SubmitTask,
            agent_service_pb2.SubmitTaskRequest(task=subtask_spec(invocation, budget)),
            timeout=invocation.deadline.timeout(CONNECT_SECONDS * 5),
        )
        final = await self._watch(stub, submitted.task, invocation)
        return subtask_answer(agent_tool.agent_of_tool(tool.name), final)

    async def _watch(
        self,
        stub: agent_service_pb2_grpc.AgentServiceStub,
        subtask: task_pb2.Task,
        invocation: Invocation,
    ) -> step_event_pb2.StepEvent:
        """Relay the sub-task and follow it to its final event; cancel it if we stop first."""
        progress = invocation.progress
        try:
            if progress is not None:
                await progress(tool_registry_service_pb2.InvokeToolStreamResponse(subtask=subtask))
            return await self._follow(stub, subtask.task_id, invocation.deadline, progress)
        except errors.Unavailable:
            # The stream was lost, not the sub-task: it runs on (its deadline bounds
            # it), and the caller's retried attempt re-attaches to it by its id.
            raise
        except BaseException:
            # Cancelled, or out of time: the sub-task must not outlive this call.
            await asyncio.shield(_cancel_quietly(stub, subtask.task_id))
            raise

    async def _follow(
        self,
        stub: agent_service_pb2_grpc.AgentServiceStub,
        task_id: str,
        deadline: Deadline,
        progress: Progress | None,
    ) -> step_event_pb2.StepEvent:
        """Watch a sub-task to its final event, resuming after a broken stream."""
        after = 0
        for attempt in range(1, WATCH_ATTEMPTS + 1):
            call = stub.WatchTask(
                agent_service_pb2.WatchTaskRequest(task_id=task_id, after_sequence=after),
                timeout=deadline.timeout(),
            )
            try:
                async for response in call:
                    event: step_event_pb2.StepEvent = response.event  # the stub is untyped
                    after = event.sequence
                    if progress is not None:
                        await progress(
                            tool_registry_service_pb2.InvokeToolStreamResponse(event=event)
                        )
                    if is_final(event):
                        return event
            except grpc.aio.AioRpcError as err:
                failure = errors.from_rpc_error(err)
                if not isinstance(failure, errors.Unavailable) or attempt == WATCH_ATTEMPTS:
                    raise failure from err
            finally:
                call.cancel()
        raise errors.Unavailable(f"lost the event stream of sub-task {task_id}")


class BackendRouter:
    """Sends an invocation to the backend of its tool's kind; owns the connections."""

    def __init__(
        self,
        *,
        tool_timeout_seconds: float,
        retry_wait_seconds: float = 0.1,
        breaker_failure_threshold: int = 5,
        breaker_reset_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        keepalive: Keepalive | None = None,
        tls: MeshTls | None = None,
    ) -> None:
        """`tls`: the registry's mesh credentials, when mTLS is on."""
        self._executor_connections = Connections(keepalive, tls=tls, server_identity=callers.TOOLS)
        self._agent_connections = Connections(keepalive, tls=tls, server_identity=callers.AGENT)
        self.executors = ExecutorBackend(
            self._executor_connections,
            tool_timeout_seconds=tool_timeout_seconds,
            retry_wait_seconds=retry_wait_seconds,
        )
        self.agents = AgentBackend(
            self._agent_connections,
            tool_timeout_seconds=tool_timeout_seconds,
            retry_wait_seconds=retry_wait_seconds,
            breaker_failure_threshold=breaker_failure_threshold,
            breaker_reset_seconds=breaker_reset_seconds,
            clock=clock,
        )

    async def execute(self, invocation: Invocation, endpoints: list[str]) -> ExecuteResponse:
        tool = invocation.tool
        if not endpoints:
            raise errors.FailedPrecondition(
                f"tool {tool.name} {tool.version} is registered but no backend serves it",
                reason=Reason.NO_BACKEND,
            )
        if tool.backend_kind == tool_pb2.BACKEND_KIND_AGENT:
            return await self.agents.execute(invocation, endpoints)
        return await self.executors.execute(invocation, endpoints)

    async def close(self) -> None:
        await self._executor_connections.close()
        await self._agent_connections.close()


def breaker_verdict(response: ExecuteResponse) -> bool | None:
    """What one call says about the downstream agent's health: True healthy, False
    failing, None nothing (see BREAKER_FAILURES)."""
    if not response.HasField("error"):
        return True
    return False if response.error.code in BREAKER_FAILURES else None


def subtask_budget(invocation: Invocation) -> int:
    """What the sub-task may spend: what the model asked for, capped by the caller's share."""
    budget = int(invocation.arguments.get("token_budget", limits.DEFAULT_TOKEN_BUDGET))
    if invocation.token_budget:
        budget = min(budget, invocation.token_budget)
    return budget


def subtask_spec(invocation: Invocation, budget: int) -> task_pb2.TaskSpec:
    """The sub-task to submit: the caller's prompt, lineage, deadline and budget share."""
    arguments, caller = invocation.arguments, invocation.caller
    spec = task_pb2.TaskSpec(
        # Derived from the invocation's key, so a replayed delegation keeps its id
        # and re-attaches to the sub-task (see TaskService.submit).
        task_id=_subtask_id(caller, invocation.idempotency_key),
        prompt=arguments["prompt"],
        session_id=arguments.get("session_id", ""),
        metadata={"delegated_by": caller.agent or "operator", "parent_task": caller.task_id},
        token_budget=budget,
        lineage=lineage.child_lineage(
            caller_agent=caller.agent, caller_task_id=caller.task_id, caller=caller.lineage
        ),
    )
    if "max_steps" in arguments:
        spec.max_steps = arguments["max_steps"]
    spec.deadline.FromNanoseconds(int((time.time() + invocation.deadline.timeout()) * 1e9))
    return spec


def subtask_answer(agent: str, final: step_event_pb2.StepEvent) -> ExecuteResponse:
    """The tool's answer from the sub-task's final event."""
    if final.WhichOneof("kind") == "error":
        # A tenant out of quota says nothing about the agent's health: its own code,
        # which is no breaker failure, so one tenant cannot open it for every other.
        quota = final.error.reason == Reason.QUOTA_EXHAUSTED
        return _failure(
            Reason.QUOTA_EXHAUSTED if quota else final.error.code or ToolErrorCode.AGENT_FAILED,
            f"the {agent} agent failed: {final.error.message}",
        )
    result = final.final_result.result
    if result.status == task_pb2.TASK_STATUS_CANCELLED:
        return _failure(ToolErrorCode.CANCELLED, f"the {agent} task {result.task_id} was cancelled")
    payload = {
        "task_id": result.task_id,
        "output": result.output,
        "error": result.error,
        "steps_used": result.steps_used,
        "tokens_used": result.tokens_used,
    }
    return ExecuteResponse(result_json=json.dumps(payload))


def _subtask_id(caller: tool_registry_service_pb2.Caller, idempotency_key: str) -> str:
    if not idempotency_key:
        return ""
    scope = json.dumps([caller.agent, caller.session_id, idempotency_key])
    return f"d-{hashlib.sha256(scope.encode()).hexdigest()[:32]}"


async def _cancel_quietly(stub: agent_service_pb2_grpc.AgentServiceStub, task_id: str) -> None:
    try:
        await stub.CancelTask(agent_service_pb2.CancelTaskRequest(task_id=task_id), timeout=2.0)
    except grpc.aio.AioRpcError as err:
        # Its own deadline (in the spec) still stops it; say so in the log.
        log.warning("could not cancel sub-task %s: %s", task_id, err.details())


def _failure(code: str, message: str) -> ExecuteResponse:
    return ExecuteResponse(error=tool_pb2.ToolError(code=code, message=message))
