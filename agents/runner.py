"""`AgentRunner`: the plan → act → observe loop.

One task: load a bounded context packet from Memory, ask the model, run the
tool calls it requests in parallel through the Tool Registry, feed the
results back, repeat until the model stops, `max_steps` is reached or the
token budget runs out; then save the turn to Memory in one atomic append.

The runner keeps nothing between tasks: everything it knows about a session
comes from Memory, so any replica can run any task.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf import timestamp_pb2
from opentelemetry import trace
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from agentplex.agents import metrics
from agentplex.agents.catalog import AgentSpec
from agentplex.agents.events import EventRecorder, EventSink
from agentplex.agents.llm.base import (
    ChatMessage,
    Completion,
    CompletionRequest,
    LLMError,
    LLMProvider,
    TextDelta,
    ToolCall,
    ToolSpec,
    TransientLLMError,
)
from agentplex.agents.task import TaskRequest
from agentplex.runtime import errors
from agentplex.runtime.clients import Deadline
from agentplex.runtime.tokens import estimate_message_tokens, estimate_tokens
from agentplex.v1 import (
    memory_pb2,
    memory_service_pb2,
    step_event_pb2,
    task_pb2,
    tool_pb2,
    tool_registry_service_pb2,
)

log = logging.getLogger(__name__)
tracer = trace.get_tracer("agentplex.agents")

MAX_STEPS_REACHED = "max steps reached"
TOKEN_BUDGET_EXCEEDED = "token budget exceeded"
# Per-call caps, always further bounded by the task's deadline.
MEMORY_CALL_SECONDS = 5.0
REGISTRY_CALL_SECONDS = 5.0
TOOL_CALL_SECONDS = 30.0


class ToolGateway(Protocol):
    async def list_tools(
        self, agent: str = "", *, timeout: float
    ) -> tool_registry_service_pb2.ListToolsResponse: ...

    async def invoke(
        self, request: tool_registry_service_pb2.InvokeToolRequest, *, timeout: float
    ) -> tool_registry_service_pb2.InvokeToolResponse: ...


class MemoryGateway(Protocol):
    async def load(
        self, agent: str, session_id: str, max_tokens: int, *, timeout: float
    ) -> memory_service_pb2.LoadContextResponse: ...

    async def append(
        self,
        agent: str,
        session_id: str,
        messages: Sequence[memory_pb2.MemoryMessage],
        *,
        timeout: float,
    ) -> int: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient LLM errors: exponential backoff with jitter."""

    attempts: int = 3
    initial_seconds: float = 0.5
    max_seconds: float = 8.0


@dataclass(frozen=True)
class TaskOutcome:
    """The result, plus the error to report when the task FAILED."""

    result: task_pb2.TaskResult
    failure: errors.AgentplexError | None = None


class _BudgetExceeded(Exception):
    pass


class _Cancelled(Exception):
    pass


CancelCheck = Callable[[], Awaitable[bool]]
"""Returns True when the task should stop at this step boundary."""

CANCELLED = "cancelled"


@dataclass
class _ToolList:
    """The agent's tool list, read again only when the registry has moved on.

    Every tool call reports the registry's revision; a step after one that saw
    a newer revision (or a failed call, which reports none) re-reads the list,
    so a newly published tool or version is used on the next step without a
    registry round trip on every step.
    """

    tools: list[tool_pb2.ToolDefinition] = field(default_factory=list)
    revision: int = -1  # revision the list was read at; -1: never read
    seen: int | None = None  # newest revision a call reported; None: unknown

    def stale(self) -> bool:
        return self.revision < 0 or self.seen != self.revision

    def read(self, response: tool_registry_service_pb2.ListToolsResponse) -> None:
        self.tools = list(response.tools)
        self.revision = self.seen = int(response.revision)

    def saw(self, revision: int | None) -> None:
        if revision is None or self.seen is None:
            self.seen = None
        else:
            self.seen = max(self.seen, revision)


@dataclass
class _Progress:
    steps: int = 0
    tokens: int = 0
    tool_calls: int = 0
    output: str = ""


class AgentRunner:
    def __init__(
        self,
        *,
        spec: AgentSpec,
        llm: LLMProvider,
        tools: ToolGateway,
        memory: MemoryGateway,
        context_tokens: int,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.spec = spec
        self._llm = llm
        self._tools = tools
        self._memory = memory
        self._context_tokens = context_tokens
        self._retry = retry or RetryPolicy()

    async def run(
        self,
        task: TaskRequest,
        deadline: Deadline,
        sink: EventSink,
        *,
        cancel_requested: CancelCheck | None = None,
        last_sequence: int = 0,
    ) -> TaskOutcome:
        """Run one task to its end, streaming events into `sink`.

        Cancellation (the caller hung up) propagates: nothing is saved for a
        task that did not finish. `cancel_requested` is asked at every step
        boundary; when it says yes the task ends CANCELLED there, with nothing
        half-written. `last_sequence` continues the event numbering of an
        earlier attempt of the same task.
        """
        events = EventRecorder(
            task_id=task.task_id, agent=self.spec.name, sink=sink, last_sequence=last_sequence
        )
        progress = _Progress()
        started = time.monotonic()
        started_at = timestamp_pb2.Timestamp()
        started_at.GetCurrentTime()
        agent = self.spec.name
        metrics.tasks_in_flight.labels(agent).inc()
        status_label = "cancelled"
        with tracer.start_as_current_span("agent.task") as span:
            span.set_attributes(
                {
                    "agent.name": agent,
                    "agent.task_id": task.task_id,
                    "agent.session_id": task.session_id,
                }
            )
            try:
                await events.emit(
                    0,
                    task_accepted=step_event_pb2.TaskAccepted(
                        session_id=task.session_id,
                        max_steps=task.max_steps,
                        token_budget=task.token_budget,
                    ),
                )
                status, error, failure = task_pb2.TASK_STATUS_COMPLETED, "", None
                try:
                    try:
                        error = (
                            await self._loop(task, deadline, events, progress, cancel_requested)
                            or ""
                        )
                    except _BudgetExceeded:
                        error = TOKEN_BUDGET_EXCEEDED
                    if progress.output:
                        await self._save(task, progress, deadline)
                except _Cancelled:
                    status, error = task_pb2.TASK_STATUS_CANCELLED, CANCELLED
                except errors.AgentplexError as exc:
                    status, error, failure = task_pb2.TASK_STATUS_FAILED, exc.message, exc
                except LLMError as exc:
                    failure = (
                        errors.Unavailable
                        if isinstance(exc, TransientLLMError)
                        else errors.FailedPrecondition
                    )(f"LLM call failed: {exc}", reason="LLM_FAILED")
                    status, error = task_pb2.TASK_STATUS_FAILED, failure.message
                result = task_pb2.TaskResult(
                    task_id=task.task_id,
                    status=status,
                    output=progress.output,
                    steps_used=progress.steps,
                    tokens_used=progress.tokens,
                    tool_calls=progress.tool_calls,
                    error=error,
                    session_id=task.session_id,
                    started_at=started_at,
                )
                result.duration_ms = int((time.monotonic() - started) * 1000)
                if failure is None:
                    await events.emit(
                        progress.steps, final_result=step_event_pb2.TaskFinished(result=result)
                    )
                else:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, failure.message))
                    await events.emit(
                        progress.steps,
                        error=step_event_pb2.TaskFailed(
                            code=errors.status_code_for(failure).name,
                            message=failure.message,
                            result=result,
                        ),
                    )
                status_label = task_pb2.TaskStatus.Name(status).removeprefix("TASK_STATUS_")
                span.set_attributes(
                    {
                        "agent.status": status_label,
                        "agent.tokens_used": progress.tokens,
                        "agent.steps_used": progress.steps,
                    }
                )
                return TaskOutcome(result, failure)
            finally:
                metrics.tasks_in_flight.labels(agent).dec()
                metrics.tasks_finished.labels(agent, status_label.lower()).inc()
                metrics.task_duration.labels(agent).observe(time.monotonic() - started)

    async def _loop(
        self,
        task: TaskRequest,
        deadline: Deadline,
        events: EventRecorder,
        progress: _Progress,
        cancel_requested: CancelCheck | None,
    ) -> str | None:
        context = await self._memory.load(
            self.spec.name,
            task.session_id,
            self._context_tokens,
            timeout=deadline.timeout(MEMORY_CALL_SECONDS),
        )
        messages: list[ChatMessage] = [ChatMessage("system", self.spec.instructions)]
        messages.extend(_from_memory(m) for m in context.messages)
        messages.append(ChatMessage("user", task.prompt))

        tool_list = _ToolList()
        for step in range(1, task.max_steps + 1):
            if cancel_requested is not None and await cancel_requested():
                raise _Cancelled
            progress.steps = step
            if tool_list.stale():
                tool_list.read(
                    await self._tools.list_tools(
                        self.spec.name, timeout=deadline.timeout(REGISTRY_CALL_SECONDS)
                    )
                )
            tool_defs = tool_list.tools
            tool_specs = [ToolSpec(t.name, t.description, t.input_schema_json) for t in tool_defs]
            await events.emit(
                step, step_started=step_event_pb2.StepStarted(tokens_used=progress.tokens)
            )
            remaining = task.token_budget - progress.tokens
            # Do not start a call whose prompt alone cannot fit in the budget.
            if _estimate_prompt(messages, tool_specs) >= remaining:
                raise _BudgetExceeded
            completion = await self._complete(
                messages, tool_specs, remaining, step, deadline, events
            )
            progress.tokens += completion.usage.total_tokens
            if completion.content:
                progress.output = completion.content
            await events.emit(
                step,
                llm_call_finished=step_event_pb2.LlmCallFinished(
                    model=completion.model,
                    prompt_tokens=completion.usage.prompt_tokens,
                    completion_tokens=completion.usage.completion_tokens,
                    finish_reason=completion.finish_reason,
                    tool_calls_requested=len(completion.tool_calls),
                    usage_estimated=completion.usage.estimated,
                ),
            )
            if progress.tokens > task.token_budget:
                raise _BudgetExceeded
            if not completion.tool_calls:
                return None
            messages.append(ChatMessage("assistant", completion.content, completion.tool_calls))
            results = await asyncio.gather(
                *(
                    self._invoke(task, step, index, call, tool_list, deadline, events)
                    for index, call in enumerate(completion.tool_calls)
                )
            )
            progress.tool_calls += len(completion.tool_calls)
            messages.extend(
                ChatMessage("tool", content, tool_call_id=call.id)
                for call, content in zip(completion.tool_calls, results, strict=True)
            )
        return MAX_STEPS_REACHED

    async def _complete(
        self,
        messages: list[ChatMessage],
        tools: list[ToolSpec],
        remaining_tokens: int,
        step: int,
        deadline: Deadline,
        events: EventRecorder,
    ) -> Completion:
        request = CompletionRequest(
            messages=tuple(messages), tools=tuple(tools), max_tokens=remaining_tokens
        )
        agent = self.spec.name

        def count_retry(state: RetryCallState) -> None:
            metrics.llm_retries.labels(agent).inc()
            log.warning(
                "retrying LLM call after a transient error",
                extra={
                    "attempt": state.attempt_number,
                    "error": str(state.outcome.exception() if state.outcome else ""),
                },
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._retry.attempts),
            wait=wait_exponential_jitter(
                multiplier=self._retry.initial_seconds,
                jitter=self._retry.initial_seconds,
                max=self._retry.max_seconds,
            ),
            retry=retry_if_exception_type(TransientLLMError),
            before_sleep=count_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt, tracer.start_as_current_span("agent.llm_call") as span:
                span.set_attributes(
                    {
                        "llm.model": self._llm.model,
                        "agent.step": step,
                        "llm.attempt": attempt.retry_state.attempt_number,
                    }
                )
                completion = await self._stream_once(request, step, deadline, events)
                span.set_attributes(
                    {
                        "llm.prompt_tokens": completion.usage.prompt_tokens,
                        "llm.completion_tokens": completion.usage.completion_tokens,
                        "llm.finish_reason": completion.finish_reason,
                    }
                )
                metrics.llm_tokens.labels(agent, "prompt").inc(completion.usage.prompt_tokens)
                metrics.llm_tokens.labels(agent, "completion").inc(
                    completion.usage.completion_tokens
                )
                return completion
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _stream_once(
        self, request: CompletionRequest, step: int, deadline: Deadline, events: EventRecorder
    ) -> Completion:
        streamed = False
        try:
            async with asyncio.timeout(deadline.timeout()):
                async for event in self._llm.stream(request):
                    if isinstance(event, TextDelta):
                        if event.text:
                            streamed = True
                            await events.emit(
                                step,
                                llm_output_delta=step_event_pb2.LlmOutputDelta(text=event.text),
                            )
                    else:
                        return event
        except TimeoutError:
            raise errors.DeadlineExceeded("the task's deadline passed during an LLM call") from None
        except TransientLLMError as exc:
            if streamed:
                # The caller already saw part of this answer; a silent retry would
                # repeat it, so the error is final.
                raise LLMError(f"model stream broke after output started: {exc}") from exc
            raise
        raise TransientLLMError("model stream ended without a completion")

    async def _invoke(
        self,
        task: TaskRequest,
        step: int,
        index: int,
        call: ToolCall,
        tool_list: _ToolList,
        deadline: Deadline,
        events: EventRecorder,
    ) -> str:
        """Run one tool call; always returns the text the model will see."""
        versions = {tool.name: tool.version for tool in tool_list.tools}
        # Derived, not random: a retried step reuses the key, so the registry
        # replays a side effect instead of repeating it.
        key = f"{task.task_id}:{step}:{index}"
        await events.emit(
            step,
            tool_call=step_event_pb2.ToolCallStarted(
                call_id=call.id,
                tool_name=call.name,
                tool_version=versions.get(call.name, ""),
                arguments_json=call.arguments_json,
                idempotency_key=key,
            ),
        )
        started = time.monotonic()
        outcome = step_event_pb2.ToolCallResult(call_id=call.id, tool_name=call.name)
        with tracer.start_as_current_span("agent.tool_call") as span:
            span.set_attributes({"tool.name": call.name, "tool.call_id": call.id})
            try:
                response = await self._tools.invoke(
                    tool_registry_service_pb2.InvokeToolRequest(
                        tool_name=call.name,
                        # The exact version whose schema the model was shown.
                        version=versions.get(call.name, ""),
                        arguments_json=call.arguments_json,
                        idempotency_key=key,
                        caller=tool_registry_service_pb2.Caller(
                            agent=self.spec.name, session_id=task.session_id, task_id=task.task_id
                        ),
                    ),
                    timeout=deadline.timeout(TOOL_CALL_SECONDS),
                )
                tool_list.saw(response.registry_revision)
                if response.HasField("error"):
                    outcome.error.CopyFrom(response.error)
                else:
                    outcome.result_json = response.result_json
            except errors.DeadlineExceeded:
                raise
            except errors.AgentplexError as exc:
                tool_list.saw(None)  # the list may be out of date: read it again
                # Refusals (bad arguments, unknown or forbidden tool, backend down)
                # go back to the model, which may correct itself.
                outcome.error.CopyFrom(tool_pb2.ToolError(code=exc.reason, message=exc.message))
            label = "error" if outcome.HasField("error") else "ok"
            span.set_attribute("tool.outcome", label)
        metrics.tool_calls.labels(self.spec.name, call.name, label).inc()
        outcome.duration_ms = int((time.monotonic() - started) * 1000)
        await events.emit(step, tool_result=outcome)
        if outcome.HasField("error"):
            return json.dumps(
                {"error": {"code": outcome.error.code, "message": outcome.error.message}}
            )
        return outcome.result_json

    async def _save(self, task: TaskRequest, progress: _Progress, deadline: Deadline) -> None:
        """Save the finished turn: prompt and answer, in one atomic append."""
        await self._memory.append(
            self.spec.name,
            task.session_id,
            [
                memory_pb2.MemoryMessage(
                    role=memory_pb2.ROLE_USER, content=task.prompt, task_id=task.task_id
                ),
                memory_pb2.MemoryMessage(
                    role=memory_pb2.ROLE_ASSISTANT, content=progress.output, task_id=task.task_id
                ),
            ],
            timeout=deadline.timeout(MEMORY_CALL_SECONDS),
        )


_ROLES = {
    memory_pb2.ROLE_SYSTEM: "system",
    memory_pb2.ROLE_USER: "user",
    memory_pb2.ROLE_ASSISTANT: "assistant",
    memory_pb2.ROLE_TOOL: "tool",
}


def _from_memory(message: memory_pb2.MemoryMessage) -> ChatMessage:
    return ChatMessage(
        _ROLES.get(message.role, "user"),
        message.content,  # type: ignore[arg-type]
        tool_call_id=message.tool_call_id,
    )


def _estimate_prompt(messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]) -> int:
    return sum(estimate_message_tokens(m.content) for m in messages) + sum(
        estimate_tokens(t.parameters_json) for t in tools
    )
