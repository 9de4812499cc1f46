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
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeVar

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
from agentplex.agents.context import (
    Context,
    ContextManager,
    ContextMemory,
    ContextPolicy,
    untrusted,
)
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
    Usage,
)
from agentplex.agents.quota import TokenQuota
from agentplex.agents.tool_list import SharedToolList, TaskToolList
from agentplex.contract.reasons import Reason, ToolErrorCode
from agentplex.contract.task_request import TaskRequest
from agentplex.runtime import errors, principal
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
# A budget warning is emitted once, when this share of the budget is spent.
BUDGET_WARNING_RATIO = 0.8


@dataclass
class _Progress:
    steps: int = 0
    tokens: int = 0
    tool_calls: int = 0
    output: str = ""
    # The provider's token count of `output`, framing included; 0 when it reported none.
    output_tokens: int = 0
    budget_warned: bool = False


class _Ending(NamedTuple):
    """How a task ended: its status, its result's error text, and the failure to report."""

    status: task_pb2.TaskStatus
    error: str = ""
    failure: errors.AgentplexError | None = None

    @property
    def label(self) -> str:
        """The status as metrics and spans name it: COMPLETED, FAILED, CANCELLED."""
        return task_pb2.TaskStatus.Name(self.status).removeprefix("TASK_STATUS_")


@dataclass(frozen=True)
class _ToolOutcome:
    """What one tool call gave the model, and what a delegation cost."""

    content: str
    tokens: int = 0  # spent by a sub-task (and its sub-tasks); charged to this task
    budget_exhausted: bool = False
    output: str = ""  # a sub-task's (partial) answer
    # The mesh could not run the call (MESH_UNAVAILABLE): no answer for the model,
    # the attempt fails with this once the step's other calls are done.
    outage: errors.Unavailable | None = None


def _now() -> timestamp_pb2.Timestamp:
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    return now


@dataclass(eq=False)
class _TaskRun:
    """One task while it runs: what was asked, where its events go, what it has
    done so far and how it is stopped.

    Made by `AgentRunner.run` and dropped when the task ends, so the runner
    itself keeps nothing between tasks.
    """

    task: TaskRequest
    deadline: Deadline
    events: EventRecorder
    tools: TaskToolList
    interrupt: asyncio.Event | None = None
    cancel_requested: CancelCheck | None = None
    progress: _Progress = field(default_factory=_Progress)
    # The conversation the model is shown: the context packet, the prompt, then each step.
    messages: list[ChatMessage] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    started_at: timestamp_pb2.Timestamp = field(default_factory=_now)

    async def accept(self) -> None:
        """The first event: what the task was given to work with."""
        await self.events.emit(
            0,
            task_accepted=step_event_pb2.TaskAccepted(
                session_id=self.task.session_id,
                max_steps=self.task.max_steps,
                token_budget=self.task.token_budget,
                principal=principal.as_proto(principal.current()),
            ),
        )

    async def interruptible(self, work: Awaitable[T]) -> T:
        return await _interruptible(work, self.interrupt)

    async def cancel_asked(self) -> bool:
        """Whether a cancel came in; asked at each step boundary."""
        return (self.interrupt is not None and self.interrupt.is_set()) or (
            self.cancel_requested is not None and await self.cancel_requested()
        )

    def tokens_left(self) -> int:
        return self.task.token_budget - self.progress.tokens

    def check_budget(self) -> None:
        """Stop the task once it has spent more than its budget."""
        if self.progress.tokens > self.task.token_budget:
            raise _BudgetExceeded

    async def warn_if_low(self, step: int) -> None:
        progress, budget = self.progress, self.task.token_budget
        if progress.budget_warned or progress.tokens < budget * BUDGET_WARNING_RATIO:
            return
        progress.budget_warned = True
        await self.events.emit(
            step,
            budget_warning=step_event_pb2.BudgetWarning(
                tokens_used=progress.tokens, token_budget=budget
            ),
        )

    def delegation_share(self, calls: Sequence[ToolCall]) -> int:
        """Sub-agents spend from this task's budget: each delegation of a step gets
        an equal share of what is left (see agents/delegation.py)."""
        delegations = sum(self.tools.delegates(call.name) for call in calls)
        return self.tokens_left() // max(delegations, 1)

    def observe(self, calls: Sequence[ToolCall], results: Sequence[_ToolOutcome]) -> None:
        """Count a step's tool calls and what they cost; their results join the conversation."""
        progress = self.progress
        progress.tool_calls += len(calls)
        progress.tokens += sum(result.tokens for result in results)
        self.messages.extend(
            ChatMessage("tool", result.content, tool_call_id=call.id)
            for call, result in zip(calls, results, strict=True)
        )
        # Until the model answers from them, the sub-agents' answers are the
        # best partial output this task has.
        progress.output = progress.output or " ".join(r.output for r in results if r.output)

    def result(self, ending: _Ending) -> task_pb2.TaskResult:
        progress = self.progress
        result = task_pb2.TaskResult(
            task_id=self.task.task_id,
            status=ending.status,
            output=progress.output,
            steps_used=progress.steps,
            tokens_used=progress.tokens,
            tool_calls=progress.tool_calls,
            error=ending.error,
            session_id=self.task.session_id,
            started_at=self.started_at,
        )
        result.duration_ms = int((time.monotonic() - self.started) * 1000)
        return result


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
        quota: TokenQuota | None = None,
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
        # The tenant's token quota (agents/quota.py); None: no tenant is limited.
        self._quota = quota

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
        agent = self.spec.name
        run = _TaskRun(
            task=task,
            deadline=deadline,
            events=EventRecorder(
                task_id=task.task_id,
                agent=agent,
                sink=sink,
                depth=task.depth,
                last_sequence=last_sequence,
            ),
            tools=TaskToolList(self._shared_tools),
            interrupt=interrupt,
            cancel_requested=cancel_requested,
        )
        metrics.tasks_in_flight.labels(agent).inc()
        # What the tasks metric counts when no ending was reached: a cancel of the
        # run itself (the caller hung up, a worker draining), or else an error no
        # ending accounts for (a bug, a lost event sink).
        status_label = "error"
        with tracer.start_as_current_span("agent.task") as span:
            span.set_attributes(
                {
                    "agent.name": agent,
                    "agent.task_id": task.task_id,
                    "agent.session_id": task.session_id,
                }
            )
            try:
                await run.accept()
                ending = await self._end(run)
                outcome = await self._finish(run, ending, span)
                status_label = ending.label
                return outcome
            except asyncio.CancelledError:
                status_label = "cancelled"
                raise
            finally:
                metrics.tasks_in_flight.labels(agent).dec()
                metrics.tasks_finished.labels(agent, status_label.lower()).inc()
                metrics.task_duration.labels(agent).observe(time.monotonic() - run.started)

    async def _end(self, run: _TaskRun) -> _Ending:
        """Run the loop and save the turn; how the task ended.

        A budget run out still completes (with its partial output); a cancel
        ends it CANCELLED; a domain or model error, FAILED. The caller hanging
        up is no ending: it propagates, and nothing is saved."""
        try:
            try:
                error = await self._loop(run) or ""
            except _BudgetExceeded:
                error = TOKEN_BUDGET_EXCEEDED
            if run.progress.output:
                await self._save(run)
        except _Cancelled:
            return _Ending(task_pb2.TASK_STATUS_CANCELLED, CANCELLED)
        except errors.AgentplexError as exc:
            return _Ending(task_pb2.TASK_STATUS_FAILED, exc.message, exc)
        except LLMError as exc:
            failure = _llm_failure(exc)
            return _Ending(task_pb2.TASK_STATUS_FAILED, failure.message, failure)
        return _Ending(task_pb2.TASK_STATUS_COMPLETED, error)

    async def _finish(self, run: _TaskRun, ending: _Ending, span: trace.Span) -> TaskOutcome:
        """Report the ending: the final event (the result, or the failure together
        with the result so far) and the task span's status."""
        outcome = TaskOutcome(run.result(ending), ending.failure)
        failure, progress = ending.failure, run.progress
        if failure is None:
            await run.events.emit(
                progress.steps, final_result=step_event_pb2.TaskFinished(result=outcome.result)
            )
        else:
            span.set_status(trace.Status(trace.StatusCode.ERROR, failure.message))
            await run.events.emit(
                progress.steps,
                error=step_event_pb2.TaskFailed(
                    code=errors.status_code_for(failure).name,
                    message=failure.message,
                    result=outcome.result,
                    reason=failure.reason,
                ),
            )
        span.set_attributes(
            {
                "agent.status": ending.label,
                "agent.tokens_used": progress.tokens,
                "agent.steps_used": progress.steps,
            }
        )
        return outcome

    async def _loop(self, run: _TaskRun) -> str | None:
        """Steps until the model answers without tool calls (None) or `max_steps` is
        used up; raises to stop early (cancelled, out of budget, failed)."""
        await self._open(run)
        for step in range(1, run.task.max_steps + 1):
            if await run.cancel_asked():
                raise _Cancelled
            run.progress.steps = step
            # Observed however the step ends: a step cut short is still time spent.
            with metrics.step_duration.labels(self.spec.name).time():
                completion = await self._plan(run, step)
                if not completion.tool_calls:
                    return None
                await self._act(run, step, completion)
        return MAX_STEPS_REACHED

    async def _open(self, run: _TaskRun) -> None:
        """Start the conversation: the session's context packet, then the prompt."""
        task = run.task
        await self._check_quota()  # loading the packet may summarize: model calls
        context = await run.interruptible(
            # Summarizing is model calls too: a cancel stops it at once.
            self._context.load(
                self.spec.name,
                task.session_id,
                run.deadline,
                # Summaries are paid from the task's budget, but never most of it.
                spend_limit=task.token_budget // 4,
            )
        )
        await self._account_summaries(context, run)
        run.messages = context.chat_messages(self.spec.instructions)
        run.messages.append(ChatMessage("user", task.prompt))

    async def _plan(self, run: _TaskRun, step: int) -> Completion:
        """One model call, shown the tools it may use; accounted and reported."""
        tool_specs = await self._tool_specs(run)
        await run.events.emit(
            step, step_started=step_event_pb2.StepStarted(tokens_used=run.progress.tokens)
        )
        remaining = run.tokens_left()
        # Do not start a call whose prompt alone cannot fit in the budget.
        if _estimate_prompt(run.messages, tool_specs) >= remaining:
            raise _BudgetExceeded
        await self._check_quota()
        completion = await run.interruptible(self._complete(run, step, tool_specs, remaining))
        await self._account_completion(run, step, completion)
        run.check_budget()
        await run.warn_if_low(step)
        return completion

    async def _act(self, run: _TaskRun, step: int, completion: Completion) -> None:
        """Run the step's tool calls in parallel and feed their results back."""
        calls = completion.tool_calls
        run.messages.append(ChatMessage("assistant", completion.content, calls))
        share = run.delegation_share(calls)
        results = await run.interruptible(
            _all_or_none(
                self._invoke(run, step, index, call, share) for index, call in enumerate(calls)
            )
        )
        run.observe(calls, results)
        # Only now, with the step's other calls done: cancelling them mid-call
        # would leave a side effect's outcome unknown instead of stored.
        outage = next((result.outage for result in results if result.outage), None)
        if outage is not None:
            raise outage
        if any(result.budget_exhausted for result in results):
            raise _BudgetExceeded  # the tree is out of tokens: stop here
        run.check_budget()
        await run.warn_if_low(step)

    async def _tool_specs(self, run: _TaskRun) -> list[ToolSpec]:
        """The tools the model is shown: the list, read again when the registry moved on."""
        if run.tools.stale():
            run.tools.read(
                await self._tools.list_tools(
                    self.spec.name, timeout=run.deadline.timeout(REGISTRY_CALL_SECONDS)
                )
            )
        return [ToolSpec(t.name, t.description, t.input_schema_json) for t in run.tools.tools]

    async def _account_summaries(self, context: Context, run: _TaskRun) -> None:
        """Summaries written for this packet cost tokens like any call: report and count them."""
        for call in context.summary_calls:
            run.progress.tokens += call.usage.total_tokens
            await self._charge(call.usage)
            metrics.llm_tokens.labels(self.spec.name, "prompt").inc(call.usage.prompt_tokens)
            metrics.llm_tokens.labels(self.spec.name, "completion").inc(
                call.usage.completion_tokens
            )
            await run.events.emit(
                0,
                llm_call_finished=step_event_pb2.LlmCallFinished(
                    model=call.model,
                    prompt_tokens=call.usage.prompt_tokens,
                    completion_tokens=call.usage.completion_tokens,
                    finish_reason=call.finish_reason,
                    usage_estimated=call.usage.estimated,
                ),
            )

    async def _account_completion(self, run: _TaskRun, step: int, completion: Completion) -> None:
        """Count a model call's tokens, keep its text as the best output so far, report it."""
        progress = run.progress
        progress.tokens += completion.usage.total_tokens
        await self._charge(completion.usage)
        if completion.content:
            progress.output = completion.content
            progress.output_tokens = (
                0
                if completion.usage.estimated or completion.tool_calls
                else completion.usage.completion_tokens + MESSAGE_OVERHEAD_TOKENS
            )
        await run.events.emit(
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

    async def _check_quota(self) -> None:
        """Before a model call: refuse it (RESOURCE_EXHAUSTED, QUOTA_EXHAUSTED) once the
        tenant has used its token quota for the period. The task then fails like any
        domain error: its failure event and RunTask's status say when the quota resets."""
        if self._quota is None:
            return
        try:
            await self._quota.check()
        except errors.ResourceExhausted:
            tenant = principal.current().tenant
            metrics.tenant_quota_rejections.labels(tenant, self.spec.name).inc()
            raise

    async def _charge(self, usage: Usage) -> None:
        """Attribute a returned model call to the tenant it ran for: the usage metrics,
        and the tenant's quota counter. Only this agent's own calls: a delegation's
        sub-task is charged by the agent that ran it, so nothing is counted twice."""
        tenant, agent, model = principal.current().tenant, self.spec.name, self._llm.model
        metrics.tenant_model_calls.labels(tenant, agent, model).inc()
        metrics.tenant_tokens.labels(tenant, agent, model).inc(usage.total_tokens)
        if self._quota is not None:
            await self._quota.record(usage.total_tokens)

    async def _complete(
        self, run: _TaskRun, step: int, tools: list[ToolSpec], remaining_tokens: int
    ) -> Completion:
        request = CompletionRequest(
            messages=tuple(run.messages), tools=tuple(tools), max_tokens=remaining_tokens
        )
        agent = self.spec.name
        call_duration = metrics.llm_call_duration.labels(agent, self._llm.model)
        async for attempt in self._llm_retrying():
            with attempt, tracer.start_as_current_span("agent.llm_call") as span:
                span.set_attributes(
                    {
                        "llm.model": self._llm.model,
                        "agent.step": step,
                        "llm.attempt": attempt.retry_state.attempt_number,
                    }
                )
                with call_duration.time():  # each attempt, failed ones too
                    completion = await self._stream_once(run, step, request)
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

    def _llm_retrying(self) -> AsyncRetrying:
        """Transient model errors only, with backoff; each retry counted and logged."""
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

        return AsyncRetrying(
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

    async def _stream_once(
        self, run: _TaskRun, step: int, request: CompletionRequest
    ) -> Completion:
        streamed = False
        try:
            async with asyncio.timeout(run.deadline.timeout()):
                async for event in self._llm.stream(request):
                    if isinstance(event, TextDelta):
                        if event.text:
                            streamed = True
                            await run.events.emit(
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
        self, run: _TaskRun, step: int, index: int, call: ToolCall, token_share: int = 0
    ) -> _ToolOutcome:
        """Run one tool call; always returns the text the model will see."""
        # The exact version whose schema the model was shown.
        version = {tool.name: tool.version for tool in run.tools.tools}.get(call.name, "")
        # Derived, not random: a retried step reuses the key, so the registry
        # replays a side effect instead of repeating it.
        key = f"{run.task.task_id}:{step}:{index}"
        await run.events.emit(
            step,
            tool_call=step_event_pb2.ToolCallStarted(
                call_id=call.id,
                tool_name=call.name,
                tool_version=version,
                arguments_json=call.arguments_json,
                idempotency_key=key,
            ),
        )
        started = time.monotonic()
        with tracer.start_as_current_span("agent.tool_call") as span:
            span.set_attributes({"tool.name": call.name, "tool.call_id": call.id})
            outcome, delegated = await self._call_tool(
                run, step, call, self._tool_request(run, call, version, key), token_share
            )
            outage = _outage(outcome)
            label = _outcome_label(outcome)
            span.set_attribute("tool.outcome", label)
        metrics.tool_calls.labels(self.spec.name, call.name, label).inc()
        listed = any(tool.name == call.name for tool in run.tools.tools)
        metrics.tenant_tool_calls.labels(
            principal.current().tenant,
            self.spec.name,
            call.name if listed else metrics.UNLISTED_TOOL,
        ).inc()
        outcome.duration_ms = int((time.monotonic() - started) * 1000)
        # Recorded even for an outage: a watcher sees which call failed the attempt.
        await run.events.emit(step, tool_result=outcome)
        content = _model_view(outcome)
        if delegated is None:
            return _ToolOutcome(content, outage=outage)
        return _ToolOutcome(
            content, delegated.tokens, delegated.budget_exhausted, delegated.output, outage
        )

    def _tool_request(
        self, run: _TaskRun, call: ToolCall, version: str, key: str
    ) -> tool_registry_service_pb2.InvokeToolRequest:
        task = run.task
        return tool_registry_service_pb2.InvokeToolRequest(
            tool_name=call.name,
            version=version,
            arguments_json=call.arguments_json,
            idempotency_key=key,
            caller=tool_registry_service_pb2.Caller(
                agent=self.spec.name,
                session_id=task.session_id,
                task_id=task.task_id,
                lineage=task.lineage,
            ),
        )

    async def _call_tool(
        self,
        run: _TaskRun,
        step: int,
        call: ToolCall,
        request: tool_registry_service_pb2.InvokeToolRequest,
        token_share: int,
    ) -> tuple[step_event_pb2.ToolCallResult, Delegated | None]:
        """The registry's answer as this task's tool result (and the delegation, if
        it was one). Refusals become tool errors; an unavailable registry becomes
        MESH_UNAVAILABLE, like a backend the registry could not reach; only the
        deadline ends the task here."""
        outcome = step_event_pb2.ToolCallResult(call_id=call.id, tool_name=call.name)
        delegated: Delegated | None = None
        try:
            if run.tools.delegates(call.name):
                # A sub-task: bounded by this task's deadline and budget share,
                # not the tool limit; its events join this task's stream.
                request.token_budget = max(token_share, 1)
                delegated = await delegate(
                    self._tools,
                    request,
                    timeout=run.deadline.timeout(),
                    events=run.events,
                    step=step,
                    call_id=call.id,
                )
                response = delegated.response
            else:
                response = await self._tools.invoke(
                    request, timeout=run.deadline.timeout(TOOL_CALL_SECONDS)
                )
            run.tools.saw(response.registry_revision)
            if response.HasField("error"):
                outcome.error.CopyFrom(response.error)
            else:
                outcome.result_json = response.result_json
        except errors.DeadlineExceeded:
            raise
        except errors.Unavailable as exc:
            # The registry (or its Redis) is down: no answer at all, let alone the
            # tool's. It may still have claimed the key, even run the tool, before
            # it went (killed mid-call, or its Redis failing as the answer was
            # stored): the retried attempt's call finds that claim, and once the
            # claim's hold runs out a side-effecting tool answers OUTCOME_UNKNOWN
            # instead of running twice (registry/ledger.py).
            outcome.error.CopyFrom(
                tool_pb2.ToolError(
                    code=ToolErrorCode.MESH_UNAVAILABLE,
                    message=f"the tool registry is unavailable: {exc.message}",
                )
            )
        except errors.AgentplexError as exc:
            run.tools.saw(None)  # the list may be out of date: read it again
            # Refusals (bad arguments, unknown or forbidden tool, no backend
            # published) go back to the model, which may correct itself.
            outcome.error.CopyFrom(tool_pb2.ToolError(code=exc.reason, message=exc.message))
        return outcome, delegated

    async def _save(self, run: _TaskRun) -> None:
        """Save the finished turn: prompt and answer, in one atomic append."""
        task = run.task
        await self._memory.append(
            self.spec.name,
            task.session_id,
            [
                memory_pb2.MemoryMessage(
                    role=memory_pb2.ROLE_USER, content=task.prompt, task_id=task.task_id
                ),
                memory_pb2.MemoryMessage(
                    role=memory_pb2.ROLE_ASSISTANT,
                    content=run.progress.output,
                    task_id=task.task_id,
                    # Memory estimates when this is 0.
                    token_count=run.progress.output_tokens,
                ),
            ],
            timeout=run.deadline.timeout(MEMORY_CALL_SECONDS),
        )


def _model_view(outcome: step_event_pb2.ToolCallResult) -> str:
    """What the model reads of a tool call: its result, or its error as JSON, marked
    as data (an error's message may quote what the tool was sent or returned)."""
    if not outcome.HasField("error"):
        return untrusted(outcome.result_json)
    return untrusted(
        json.dumps({"error": {"code": outcome.error.code, "message": outcome.error.message}})
    )


def _outage(outcome: step_event_pb2.ToolCallResult) -> errors.Unavailable | None:
    """The attempt's failure when the mesh could not run the call (MESH_UNAVAILABLE).

    Not an answer to show the model: it would answer from an outage message and
    the task would complete without the tool's effect. UNAVAILABLE instead, which
    a worker retries on another attempt and a direct caller can retry on.
    """
    if outcome.error.code != ToolErrorCode.MESH_UNAVAILABLE:
        return None
    return errors.Unavailable(
        f"{outcome.tool_name} could not be run: {outcome.error.message}",
        reason=Reason.TOOL_UNAVAILABLE,
    )


def _outcome_label(outcome: step_event_pb2.ToolCallResult) -> str:
    """The tool-calls metric's outcome: ok, error (the tool's or a refusal), unavailable."""
    if not outcome.HasField("error"):
        return "ok"
    return "unavailable" if outcome.error.code == ToolErrorCode.MESH_UNAVAILABLE else "error"


def _llm_failure(exc: LLMError) -> errors.AgentplexError:
    """A model error as the task's failure: UNAVAILABLE when a later try may succeed."""
    kind = errors.Unavailable if isinstance(exc, TransientLLMError) else errors.FailedPrecondition
    return kind(f"LLM call failed: {exc}", reason=Reason.LLM_FAILED)


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
