"""Delegation: an agent's tool call to another agent (`agent.<name>`), streamed.

The call goes through the Tool Registry like any tool call (access lists,
schema validation, idempotency, depth and cycle limits, the circuit breaker),
but with `InvokeToolStream`: the registry starts the sub-task as a durable
task on the sub-agent's queue and relays its events while it runs. Here they
are relayed once more into this task's own stream, so a caller watching the
root sees the whole tree live, each event with the agent and depth that
produced it; the sub-task's end becomes one `DelegationFinished` event.

What the sub-task spent is charged to this task's budget, and a sub-task
that ran out of its share ends the whole tree with "token budget exceeded".

A delegation whose stream breaks after the sub-task started (the registry
lost the sub-task's events, or this call to the registry broke) still ends
its branch with a `DelegationFinished`: FAILED, the error, and the tokens the
sub-task's relayed model calls showed it had spent — which are charged too.
When it broke because the mesh was unavailable, the call's error is
MESH_UNAVAILABLE, which fails the delegating task's attempt (see the runner).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from agentplex.agents.events import EventRecorder
from agentplex.contract.events import is_final
from agentplex.contract.reasons import ToolErrorCode
from agentplex.runtime import errors
from agentplex.v1 import step_event_pb2, task_pb2, tool_pb2, tool_registry_service_pb2

TOKEN_BUDGET_EXCEEDED = "token budget exceeded"
# Tool error code for a delegation refused because the caller's share of its
# budget is too small for any sub-task.
BUDGET_ERROR_CODE = ToolErrorCode.TOKEN_BUDGET_EXCEEDED


class StreamingTools(Protocol):
    def invoke_stream(
        self, request: tool_registry_service_pb2.InvokeToolRequest, *, timeout: float
    ) -> AsyncIterator[tool_registry_service_pb2.InvokeToolStreamResponse]: ...


@dataclass(frozen=True)
class Delegated:
    """What a delegation came to, as far as the delegating task is concerned."""

    response: tool_registry_service_pb2.InvokeToolResponse
    # Tokens the sub-task (and its own sub-tasks) spent; charged to the caller.
    tokens: int
    # The sub-task ran out of its share, or there was no share left to give.
    budget_exhausted: bool
    # The sub-task's answer or partial answer, for the caller's partial output.
    output: str


async def delegate(
    tools: StreamingTools,
    request: tool_registry_service_pb2.InvokeToolRequest,
    *,
    timeout: float,
    events: EventRecorder,
    step: int,
    call_id: str,
) -> Delegated:
    """Run one agent tool call, relaying the sub-task's events into `events`."""
    subtask: task_pb2.Task | None = None
    result: task_pb2.TaskResult | None = None
    response = tool_registry_service_pb2.InvokeToolResponse(tool_name=request.tool_name)
    # Model tokens the sub-tree's relayed events reported, for a stream that breaks.
    seen_tokens = 0
    try:
        async for item in tools.invoke_stream(request, timeout=timeout):
            which = item.WhichOneof("item")
            if which == "subtask":
                subtask = item.subtask
                await events.emit(
                    step,
                    delegation_started=step_event_pb2.DelegationStarted(
                        call_id=call_id,
                        agent=subtask.agent,
                        task_id=subtask.task_id,
                        token_budget=request.token_budget,
                        lineage=subtask.lineage,
                    ),
                )
            elif which == "event":
                event = item.event
                if is_final(event):
                    # Only the sub-task's own end can be final here (it turned its
                    # sub-tasks' ends into DelegationFinished); report it as such.
                    result = (
                        event.final_result.result
                        if event.HasField("final_result")
                        else event.error.result
                    )
                    continue
                if event.HasField("llm_call_finished"):
                    usage = event.llm_call_finished
                    seen_tokens += usage.prompt_tokens + usage.completion_tokens
                await events.relay(event)
            elif which == "response":
                response = item.response
    except errors.AgentplexError as exc:
        if subtask is None:
            raise  # nothing started: the runner reports it as before
        # A stream lost to an outage is the mesh's failure, not the sub-agent's
        # answer: the attempt fails, and its retry re-attaches to the sub-task.
        code = ToolErrorCode.MESH_UNAVAILABLE if isinstance(exc, errors.Unavailable) else exc.reason
        response = tool_registry_service_pb2.InvokeToolResponse(
            tool_name=request.tool_name,
            error=tool_pb2.ToolError(code=code, message=exc.message),
        )
        if isinstance(exc, errors.DeadlineExceeded):
            await _finish_lost(events, step, call_id, subtask, response, seen_tokens)
            raise  # the task's own deadline: it ends, the branch with it
    if subtask is not None and result is None:
        # The sub-task started but its end never came through: end the branch
        # with what is known, and charge what it was seen to spend.
        result = await _finish_lost(events, step, call_id, subtask, response, seen_tokens)
    elif subtask is not None and result is not None:
        await events.emit(
            step,
            delegation_finished=step_event_pb2.DelegationFinished(
                call_id=call_id, agent=subtask.agent, task_id=subtask.task_id, result=result
            ),
        )
    tokens, output, error = _spent(response, result)
    exhausted = error == TOKEN_BUDGET_EXCEEDED or (
        response.HasField("error") and response.error.code == BUDGET_ERROR_CODE
    )
    return Delegated(response=response, tokens=tokens, budget_exhausted=exhausted, output=output)


async def _finish_lost(
    events: EventRecorder,
    step: int,
    call_id: str,
    subtask: task_pb2.Task,
    response: tool_registry_service_pb2.InvokeToolResponse,
    tokens: int,
) -> task_pb2.TaskResult:
    """Emit the DelegationFinished of a sub-task whose own end was never seen."""
    error = response.error.message if response.HasField("error") else ""
    result = task_pb2.TaskResult(
        task_id=subtask.task_id,
        status=task_pb2.TASK_STATUS_FAILED,
        tokens_used=tokens,
        error=f"lost the sub-task's event stream: {error or 'it ended without a result'}",
        session_id=subtask.session_id,
    )
    await events.emit(
        step,
        delegation_finished=step_event_pb2.DelegationFinished(
            call_id=call_id, agent=subtask.agent, task_id=subtask.task_id, result=result
        ),
    )
    return result


def _spent(
    response: tool_registry_service_pb2.InvokeToolResponse,
    result: task_pb2.TaskResult | None,
) -> tuple[int, str, str]:
    """Tokens, output and error of the sub-task, from its final event or, for a
    replayed invocation (no events), from the stored result."""
    if result is not None:
        return result.tokens_used, result.output, result.error
    if response.WhichOneof("outcome") == "result_json":
        try:
            payload = json.loads(response.result_json)
        except json.JSONDecodeError:
            return 0, "", ""
        return (
            int(payload.get("tokens_used", 0)),
            str(payload.get("output", "")),
            str(payload.get("error", "")),
        )
    return 0, "", ""
