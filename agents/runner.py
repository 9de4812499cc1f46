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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

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
from agentplex.agents.context import Context, ContextManager, ContextMemory, ContextPolicy
from agentplex.agents.delegation import Delegated, delegate
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
from agentplex.agents.tool_list import SharedToolList, TaskToolList
from agentplex.contract.task_request import TaskRequest
from agentplex.runtime import errors
from agentplex.runtime.clients import Deadline
from agentplex.runtime.tokens import (
    MESSAGE_OVERHEAD_TOKENS,
    estimate_message_tokens,
    estimate_tokens,
)
from agentplex.v1 import (
    memory_pb2,
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

    def invoke_stream(
        self, request: tool_registry_service_pb2.InvokeToolRequest, *, timeout: float
    ) -> AsyncIterator[tool_registry_service_pb2.InvokeToolStreamResponse]: ...


class MemoryGateway(ContextMemory, Protocol):
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


T = TypeVar("T")
CancelCheck = Callable[[], Awaitable[bool]]

"""Returns True when the task should stop at this step boundary."""

CANCELLED = "cancelled"


@dataclass
class _Progress:
    steps: int = 0
    tokens: int = 0
    tool_calls: int = 0
    output: str = ""
    # The provider's token count of `output`, framing included; 0 when it reported none.
    output_tokens: int = 0
    budget_warned: bool = False


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
        context: ContextManager | None = None,
        tool_list_max_age: float = 0.0,
    ) -> None:
        self.spec = spec
        self._llm = llm
        self._tools = tools
        self._memory = memory
        # Bounded packets, old turns summarized by this agent's own model (agents/context.py).
        self._context = context or ContextManager(
            memory=memory, llm=llm, policy=ContextPolicy(max_tokens=context_tokens)
        )
        self._retry = retry or RetryPolicy()
        self._shared_tools = SharedToolList(max_age=tool_list_max_age)

    async def run(
        self,
        task: TaskRequest,
        deadline: Deadline,
        sink: EventSink,
        *,
        last_sequence: int = 0,
        interrupt: asyncio.Event | None = None,
        cancel_requested: CancelCheck | None = None,
    ) -> TaskOutcome:
        """Run one task to its end, streaming events into `sink`.

        Cancellation (the caller hung up) propagates: nothing is saved for a
        task that did not finish. `last_sequence` continues the event
        numbering of an earlier attempt of the same task. A durable task's
        cancel arrives as `interrupt`: once set, the task ends CANCELLED at
        once, mid-step (in-flight model and tool calls, and the sub-tasks of
        delegations, are cancelled). `cancel_requested` lets the runner ask
        for it at each step boundary, so a cancel recorded before a step
        stops the task there rather than up to one poll later; it sets the
        same `interrupt`.
        """
        events = EventRecorder(
            task_id=task.task_id,
            agent=self.spec.name,
            sink=sink,
            depth=task.depth,
            last_sequence=last_sequence,
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
                            await self._loop(
                                task, deadline, events, progress, interrupt, cancel_requested
                            )
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
        interrupt: asyncio.Event | None = None,
        cancel_requested: CancelCheck | None = None,
    ) -> str | None:
        context = await _interruptible(
            self._context.load(
                self.spec.name,
                task.session_id,
                deadline,
                # Summaries are paid from the task's budget, but never most of it.
                spend_limit=task.token_budget // 4,
            ),
            interrupt,  # summarizing is model calls too: a cancel stops it at once
        )
        await self._account_summaries(context, events, progress)
        messages = context.chat_messages(self.spec.instructions)
        messages.append(ChatMessage("user", task.prompt))

        tool_list = TaskToolList(self._shared_tools)
        for step in range(1, task.max_steps + 1):
            if (interrupt is not None and interrupt.is_set()) or (
                cancel_requested is not None and await cancel_requested()
            ):
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
            completion = await _interruptible(
                self._complete(messages, tool_specs, remaining, step, deadline, events), interrupt
            )
            progress.tokens += completion.usage.total_tokens
            if completion.content:
                progress.output = completion.content
                progress.output_tokens = (
                    0
                    if completion.usage.estimated or completion.tool_calls
                    else completion.usage.completion_tokens + MESSAGE_OVERHEAD_TOKENS
                )
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
            await _warn_if_low(task, progress, events, step)
            if not completion.tool_calls:
                return None
            messages.append(ChatMessage("assistant", completion.content, completion.tool_calls))
            # Sub-agents spend from this task's budget: each delegation of the
            # step gets an equal share of what is left (see agents/delegation.py).
            delegations = sum(tool_list.delegates(call.name) for call in completion.tool_calls)
            share = (task.token_budget - progress.tokens) // max(delegations, 1)
            results = await _interruptible(
                _all_or_none(
                    self._invoke(task, step, index, call, tool_list, deadline, events, share)
                    for index, call in enumerate(completion.tool_calls)
                ),
                interrupt,
            )
            progress.tool_calls += len(completion.tool_calls)
            progress.tokens += sum(result.tokens for result in results)
            messages.extend(
                ChatMessage("tool", result.content, tool_call_id=call.id)
                for call, result in zip(completion.tool_calls, results, strict=True)
            )
            # Until the model answers from them, the sub-agents' answers are the
            # best partial output this task has.
            progress.output = progress.output or " ".join(r.output for r in results if r.output)
            if progress.tokens > task.token_budget or any(r.budget_exhausted for r in results):
                raise _BudgetExceeded  # the tree is out of tokens: stop here
            await _warn_if_low(task, progress, events, step)
        return MAX_STEPS_REACHED

    async def _account_summaries(
        self, context: Context, events: EventRecorder, progress: _Progress
    ) -> None:
        """Summaries written for this packet cost tokens like any call: report and count them."""
        for call in context.summary_calls:
            progress.tokens += call.usage.total_tokens
            metrics.llm_tokens.labels(self.spec.name, "prompt").inc(call.usage.prompt_tokens)
            metrics.llm_tokens.labels(self.spec.name, "completion").inc(
                call.usage.completion_tokens
            )
            await events.emit(
                0,
                llm_call_finished=step_event_pb2.LlmCallFinished(
                    model=call.model,
                    prompt_tokens=call.usage.prompt_tokens,
                    completion_tokens=call.usage.completion_tokens,
                    finish_reason=call.finish_reason,
                    usage_estimated=call.usage.estimated,
                ),
            )

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
        tool_list: TaskToolList,
        deadline: Deadline,
        events: EventRecorder,
        token_share: int = 0,
    ) -> _ToolOutcome:
        """Run one tool call; always returns the text the model will see."""
        versions = {tool.name: tool.version for tool in tool_list.tools}
        delegated: Delegated | None = None
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
                request = tool_registry_service_pb2.InvokeToolRequest(
                    tool_name=call.name,
                    # The exact version whose schema the model was shown.
                    version=versions.get(call.name, ""),
                    arguments_json=call.arguments_json,
                    idempotency_key=key,
                    caller=tool_registry_service_pb2.Caller(
                        agent=self.spec.name,
                        session_id=task.session_id,
                        task_id=task.task_id,
                        lineage=task.lineage,
                    ),
                )
                if tool_list.delegates(call.name):
                    # A sub-task: bounded by this task's deadline and budget share,
                    # not the tool limit; its events join this task's stream.
                    request.token_budget = max(token_share, 1)
                    delegated = await delegate(
                        self._tools,
                        request,
                        timeout=deadline.timeout(),
                        events=events,
                        step=step,
                        call_id=call.id,
                    )
                    response = delegated.response
                else:
                    response = await self._tools.invoke(
                        request, timeout=deadline.timeout(TOOL_CALL_SECONDS)
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
        content = outcome.result_json
        if outcome.HasField("error"):
            content = json.dumps(
                {"error": {"code": outcome.error.code, "message": outcome.error.message}}
            )
        if delegated is None:
            return _ToolOutcome(content)
        return _ToolOutcome(content, delegated.tokens, delegated.budget_exhausted, delegated.output)

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
                    role=memory_pb2.ROLE_ASSISTANT,
                    content=progress.output,
                    task_id=task.task_id,
                    # Memory estimates when this is 0.
                    token_count=progress.output_tokens,
                ),
            ],
            timeout=deadline.timeout(MEMORY_CALL_SECONDS),
        )


@dataclass(frozen=True)
class _ToolOutcome:
    """What one tool call gave the model, and what a delegation cost."""

    content: str
    tokens: int = 0  # spent by a sub-task (and its sub-tasks); charged to this task
    budget_exhausted: bool = False
    output: str = ""  # a sub-task's (partial) answer


# A budget warning is emitted once, when this share of the budget is spent.
BUDGET_WARNING_RATIO = 0.8


async def _warn_if_low(
    task: TaskRequest, progress: _Progress, events: EventRecorder, step: int
) -> None:
    if progress.budget_warned or progress.tokens < task.token_budget * BUDGET_WARNING_RATIO:
        return
    progress.budget_warned = True
    await events.emit(
        step,
        budget_warning=step_event_pb2.BudgetWarning(
            tokens_used=progress.tokens, token_budget=task.token_budget
        ),
    )


async def _all_or_none(work: Iterable[Awaitable[T]]) -> list[T]:
    """Await all of `work` in parallel; if one fails, cancel the others before raising.

    `asyncio.gather` alone would leave the others running after the task ended
    (a delegation relaying events past the task's final event, its sub-task
    uncancelled until its deadline).
    """
    running = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*running))
    finally:
        pending = [r for r in running if not r.done()]
        for r in pending:
            r.cancel()
        if pending:
            await asyncio.wait(pending)  # let them unwind (cancelling their sub-tasks)


async def _interruptible(work: Awaitable[T], interrupt: asyncio.Event | None) -> T:
    """Await `work`, unless `interrupt` is set first: then cancel it and end the task
    CANCELLED (cancelling a delegation's call cancels its sub-task)."""
    if interrupt is None:
        return await work
    running = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(interrupt.wait())
    try:
        await asyncio.wait({running, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not running.done():
            running.cancel()
            await asyncio.wait({running})  # let it unwind; its errors are moot now
    if interrupt.is_set() and (running.cancelled() or running.exception() is not None):
        raise _Cancelled
    return running.result()


def _estimate_prompt(messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]) -> int:
    return sum(estimate_message_tokens(m.content) for m in messages) + sum(
        estimate_tokens(t.parameters_json) for t in tools
    )
