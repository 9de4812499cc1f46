"""Unit tests of the plan → act → observe loop, with in-memory collaborators.

The LLM, registry and memory here are small scripted stand-ins for the
runner's three interfaces; the real services are exercised in
test_agent_service.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from agentplex.agents.catalog import AgentSpec
from agentplex.agents.context import unwrap_untrusted
from agentplex.agents.llm.base import (
    Completion,
    CompletionRequest,
    LLMError,
    LLMEvent,
    TextDelta,
    ToolCall,
    TransientLLMError,
    Usage,
)
from agentplex.agents.runner import (
    MAX_STEPS_REACHED,
    TOKEN_BUDGET_EXCEEDED,
    AgentRunner,
    RetryPolicy,
)
from agentplex.contract.task_request import TaskRequest
from agentplex.runtime import errors
from agentplex.runtime.clients import Deadline
from agentplex.v1 import (
    memory_pb2,
    memory_service_pb2,
    step_event_pb2,
    task_pb2,
    tool_pb2,
    tool_registry_service_pb2,
)

SPEC = AgentSpec("tester", "1.0.0", "test agent", "Be precise.", ("echo", "slow"))
NO_WAIT = RetryPolicy(attempts=3, initial_seconds=0.0, max_seconds=0.0)

Step = Callable[[CompletionRequest], AsyncIterator[LLMEvent]]


def answer(text: str, prompt_tokens: int = 10, completion_tokens: int = 5) -> Step:
    async def step(request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        for word in text.split(" "):
            yield TextDelta(word + " ")
        yield Completion(text, (), "stop", Usage(prompt_tokens, completion_tokens), "fake/1")

    return step


def call_tools(*calls: tuple[str, dict[str, object]], tokens: int = 10) -> Step:
    async def step(request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        tool_calls = tuple(
            ToolCall(f"c{i}", name, json.dumps(args)) for i, (name, args) in enumerate(calls)
        )
        yield Completion("", tool_calls, "tool_calls", Usage(tokens, tokens), "fake/1")

    return step


def fail(exc: Exception, after_text: str = "") -> Step:
    async def step(request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        if after_text:
            yield TextDelta(after_text)
        raise exc

    return step


class FakeLLM:
    """Plays one scripted step per call and records every request."""

    model = "fake/1"

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.requests: list[CompletionRequest] = []

    def stream(self, request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        self.requests.append(request)
        return self.steps.pop(0)(request)

    async def aclose(self) -> None:
        return None


class FakeTools:
    def __init__(self) -> None:
        self.invocations: list[tool_registry_service_pb2.InvokeToolRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = asyncio.Event()
        self.release.set()
        self.refuse: dict[str, errors.AgentplexError] = {}
        self.lists = 0
        self.revision = 7

    async def list_tools(
        self, agent: str = "", *, timeout: float
    ) -> tool_registry_service_pb2.ListToolsResponse:
        self.lists += 1
        return tool_registry_service_pb2.ListToolsResponse(
            tools=[
                tool_pb2.ToolDefinition(
                    name=n, version="1.2.3", description=n, input_schema_json="{}"
                )
                for n in SPEC.tools
            ],
            revision=self.revision,
        )

    async def invoke(
        self, request: tool_registry_service_pb2.InvokeToolRequest, *, timeout: float
    ) -> tool_registry_service_pb2.InvokeToolResponse:
        self.invocations.append(request)
        if request.tool_name in self.refuse:
            raise self.refuse[request.tool_name]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        response = tool_registry_service_pb2.InvokeToolResponse(
            tool_name=request.tool_name, tool_version="1.2.3", registry_revision=self.revision
        )
        args = json.loads(request.arguments_json)
        if args.get("fail"):
            response.error.CopyFrom(tool_pb2.ToolError(code="EXECUTION_FAILED", message="boom"))
        elif args.get("backend_down"):
            response.error.CopyFrom(
                tool_pb2.ToolError(
                    code="MESH_UNAVAILABLE",
                    message="could not be run: this backend's Redis is unavailable",
                )
            )
        else:
            response.result_json = json.dumps({"echo": args})
        return response

    def invoke_stream(
        self, request: tool_registry_service_pb2.InvokeToolRequest, *, timeout: float
    ) -> AsyncIterator[tool_registry_service_pb2.InvokeToolStreamResponse]:
        raise AssertionError("not used by these tests: none delegates")


class FakeMemory:
    def __init__(self, history: Sequence[memory_pb2.MemoryMessage] = ()) -> None:
        self.history = list(history)
        self.appended: list[list[memory_pb2.MemoryMessage]] = []

    async def load(
        self, agent: str, session_id: str, max_tokens: int, *, timeout: float
    ) -> memory_service_pb2.LoadContextResponse:
        return memory_service_pb2.LoadContextResponse(messages=self.history)

    async def append(
        self,
        agent: str,
        session_id: str,
        messages: Sequence[memory_pb2.MemoryMessage],
        *,
        timeout: float,
    ) -> int:
        self.appended.append(list(messages))
        return len(messages)

    async def read(
        self, agent: str, session_id: str, start_position: int, max_messages: int, *, timeout: float
    ) -> memory_service_pb2.ReadMessagesResponse:
        raise AssertionError("not used by these tests: none summarizes")

    async def store_summary(
        self,
        agent: str,
        session_id: str,
        summary: memory_pb2.ContextSummary,
        expected_through_position: int,
        *,
        timeout: float,
    ) -> memory_service_pb2.StoreSummaryResponse:
        raise AssertionError("not used by these tests: none summarizes")


def task(**overrides: Any) -> TaskRequest:
    fields: dict[str, Any] = {
        "task_id": "t1",
        "prompt": "do it",
        "session_id": "s1",
        "max_steps": 10,
        "token_budget": 8192,
    }
    fields.update(overrides)
    return TaskRequest(**fields)


class Recorder:
    def __init__(self) -> None:
        self.events: list[step_event_pb2.StepEvent] = []

    async def __call__(self, event: step_event_pb2.StepEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [str(e.WhichOneof("kind")) for e in self.events]


def runner(llm: FakeLLM, tools: FakeTools | None = None, memory: FakeMemory | None = None):
    return AgentRunner(
        spec=SPEC,
        llm=llm,
        tools=tools or FakeTools(),
        memory=memory or FakeMemory(),
        context_tokens=1000,
        retry=NO_WAIT,
    )


async def test_answers_after_tool_call_and_saves_the_turn() -> None:
    llm = FakeLLM(call_tools(("echo", {"x": 1})), answer("all done"))
    memory = FakeMemory()
    events = Recorder()
    outcome = await runner(llm, memory=memory).run(task(), Deadline.after(10), events)

    result = outcome.result
    assert outcome.failure is None
    assert result.status == task_pb2.TASK_STATUS_COMPLETED
    assert (result.output, result.steps_used, result.tool_calls, result.error) == (
        "all done",
        2,
        1,
        "",
    )
    assert result.tokens_used == 20 + 15
    assert events.kinds() == [
        "task_accepted",
        "step_started",
        "llm_call_finished",
        "tool_call",
        "tool_result",
        "step_started",
        "llm_output_delta",
        "llm_output_delta",
        "llm_call_finished",
        "final_result",
    ]
    assert [e.sequence for e in events.events] == list(range(1, len(events.events) + 1))
    assert events.events[3].tool_call.tool_version == "1.2.3"
    # The observation reached the model's second call.
    tool_message = llm.requests[1].messages[-1]
    assert tool_message.role == "tool"
    assert unwrap_untrusted(tool_message.content) == {"echo": {"x": 1}}
    [saved] = memory.appended
    assert [(m.role, m.content) for m in saved] == [
        (memory_pb2.ROLE_USER, "do it"),
        (memory_pb2.ROLE_ASSISTANT, "all done"),
    ]


async def test_context_from_memory_precedes_the_prompt() -> None:
    history = [
        memory_pb2.MemoryMessage(role=memory_pb2.ROLE_USER, content="earlier question"),
        memory_pb2.MemoryMessage(role=memory_pb2.ROLE_ASSISTANT, content="earlier answer"),
    ]
    llm = FakeLLM(answer("ok"))
    await runner(llm, memory=FakeMemory(history)).run(task(), Deadline.after(10), Recorder())
    roles = [(m.role, m.content) for m in llm.requests[0].messages]
    assert roles == [
        ("system", "Be precise."),
        ("user", "earlier question"),
        ("assistant", "earlier answer"),
        ("user", "do it"),
    ]


async def test_tool_calls_of_one_step_run_in_parallel(eventually) -> None:
    tools = FakeTools()
    tools.release.clear()
    llm = FakeLLM(call_tools(("echo", {"a": 1}), ("echo", {"b": 2}), ("slow", {})), answer("ok"))
    running = asyncio.create_task(runner(llm, tools).run(task(), Deadline.after(10), Recorder()))
    await eventually(lambda: tools.in_flight == 3 or running.done(), message="calls not parallel")
    assert tools.max_in_flight == 3
    tools.release.set()
    outcome = await running
    assert outcome.result.tool_calls == 3
    keys = [inv.idempotency_key for inv in tools.invocations]
    assert keys == ["t1:1:0", "t1:1:1", "t1:1:2"]


async def test_tool_error_is_fed_back_to_the_model_not_fatal() -> None:
    tools = FakeTools()
    tools.refuse["slow"] = errors.InvalidArgument("bad args: $.x", reason="INVALID_ARGUMENT")
    llm = FakeLLM(call_tools(("echo", {"fail": True}), ("slow", {})), answer("recovered"))
    events = Recorder()
    outcome = await runner(llm, tools).run(task(), Deadline.after(10), events)
    assert outcome.result.status == task_pb2.TASK_STATUS_COMPLETED
    assert outcome.result.output == "recovered"
    results = [e.tool_result for e in events.events if e.HasField("tool_result")]
    assert {(r.tool_name, r.error.code) for r in results} == {
        ("echo", "EXECUTION_FAILED"),
        ("slow", "INVALID_ARGUMENT"),
    }
    observations = [
        unwrap_untrusted(m.content) for m in llm.requests[1].messages if m.role == "tool"
    ]
    assert observations[1] == {"error": {"code": "INVALID_ARGUMENT", "message": "bad args: $.x"}}


async def test_max_steps_completes_with_best_output() -> None:
    async def talk_and_call(request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        yield Completion(
            "thinking", (ToolCall("c", "echo", "{}"),), "tool_calls", Usage(5, 5), "fake/1"
        )

    llm = FakeLLM(talk_and_call, talk_and_call)
    outcome = await runner(llm).run(task(max_steps=2), Deadline.after(10), Recorder())
    assert outcome.result.status == task_pb2.TASK_STATUS_COMPLETED
    assert outcome.result.error == MAX_STEPS_REACHED
    assert outcome.result.steps_used == 2
    assert outcome.result.output == "thinking"


async def test_token_budget_stops_with_partial_output() -> None:
    llm = FakeLLM(answer("a long partial answer", prompt_tokens=500, completion_tokens=100))
    memory = FakeMemory()
    outcome = await runner(llm, memory=memory).run(
        task(token_budget=512), Deadline.after(10), Recorder()
    )
    assert outcome.result.status == task_pb2.TASK_STATUS_COMPLETED
    assert outcome.result.error == TOKEN_BUDGET_EXCEEDED
    assert outcome.result.output == "a long partial answer"
    assert outcome.result.tokens_used == 600


async def test_no_call_starts_when_the_prompt_cannot_fit_the_budget() -> None:
    llm = FakeLLM(answer("never"))
    outcome = await runner(llm).run(
        task(prompt="word " * 3000, token_budget=512), Deadline.after(10), Recorder()
    )
    assert outcome.result.error == TOKEN_BUDGET_EXCEEDED
    assert llm.requests == []


async def test_transient_llm_errors_are_retried() -> None:
    llm = FakeLLM(fail(TransientLLMError("503")), fail(TransientLLMError("reset")), answer("ok"))
    outcome = await runner(llm).run(task(), Deadline.after(10), Recorder())
    assert outcome.result.output == "ok"
    assert len(llm.requests) == 3


async def test_retries_give_up_after_three_attempts_as_unavailable() -> None:
    llm = FakeLLM(*(fail(TransientLLMError("503")) for _ in range(3)), answer("never"))
    events = Recorder()
    outcome = await runner(llm).run(task(), Deadline.after(10), events)
    assert outcome.result.status == task_pb2.TASK_STATUS_FAILED
    assert isinstance(outcome.failure, errors.Unavailable)
    assert len(llm.requests) == 3
    assert events.events[-1].error.code == "UNAVAILABLE"


async def test_permanent_llm_errors_are_not_retried() -> None:
    llm = FakeLLM(fail(LLMError("401 bad key")), answer("never"))
    outcome = await runner(llm).run(task(), Deadline.after(10), Recorder())
    assert outcome.result.status == task_pb2.TASK_STATUS_FAILED
    assert isinstance(outcome.failure, errors.FailedPrecondition)
    assert "401 bad key" in outcome.result.error
    assert len(llm.requests) == 1


async def test_no_retry_once_output_was_streamed() -> None:
    llm = FakeLLM(fail(TransientLLMError("cut"), after_text="half an ans"), answer("again"))
    outcome = await runner(llm).run(task(), Deadline.after(10), Recorder())
    assert outcome.result.status == task_pb2.TASK_STATUS_FAILED
    assert len(llm.requests) == 1


async def test_memory_outage_fails_the_task_as_unavailable() -> None:
    class DownMemory(FakeMemory):
        async def load(self, *args: object, **kwargs: object):
            raise errors.Unavailable("memory is down")

    outcome = await runner(FakeLLM(answer("x")), memory=DownMemory()).run(
        task(), Deadline.after(10), Recorder()
    )
    assert outcome.result.status == task_pb2.TASK_STATUS_FAILED
    assert isinstance(outcome.failure, errors.Unavailable)


async def test_passed_deadline_fails_before_any_work() -> None:
    llm = FakeLLM(answer("never"))
    outcome = await runner(llm).run(task(), Deadline.after(-1), Recorder())
    assert isinstance(outcome.failure, errors.DeadlineExceeded)
    assert llm.requests == []


async def test_cancellation_stops_the_loop_and_saves_nothing() -> None:
    started = asyncio.Event()

    async def hang(request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        started.set()
        await asyncio.Event().wait()
        yield TextDelta("never")

    memory = FakeMemory()
    llm = FakeLLM(hang, answer("never"))
    running = asyncio.create_task(
        runner(llm, memory=memory).run(task(), Deadline.after(10), Recorder())
    )
    await started.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert memory.appended == []
    assert len(llm.requests) == 1


async def test_cancellation_during_tool_calls_cancels_them(eventually) -> None:
    tools = FakeTools()
    tools.release.clear()
    llm = FakeLLM(call_tools(("echo", {}), ("slow", {})), answer("never"))
    memory = FakeMemory()
    running = asyncio.create_task(
        runner(llm, tools, memory).run(task(), Deadline.after(10), Recorder())
    )
    await eventually(lambda: tools.in_flight == 2, message="tool calls did not start")
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert tools.in_flight == 0
    assert memory.appended == []


async def test_tool_list_is_read_again_only_when_the_registry_moved_on() -> None:
    tools = FakeTools()
    llm = FakeLLM(call_tools(("echo", {})), call_tools(("echo", {})), answer("done"))
    await runner(llm, tools).run(task(), Deadline.after(10), Recorder())
    assert tools.lists == 1  # three steps, one list: nothing changed

    tools = FakeTools()

    def bump_after_first_call(step: Step) -> Step:
        async def wrapped(request: CompletionRequest) -> AsyncIterator[LLMEvent]:
            tools.revision = 8  # something was published while the task ran
            async for event in step(request):
                yield event

        return wrapped

    llm = FakeLLM(
        call_tools(("echo", {})), bump_after_first_call(call_tools(("echo", {}))), answer("done")
    )
    await runner(llm, tools).run(task(), Deadline.after(10), Recorder())
    assert tools.lists == 2  # the newer revision reported by a call triggers one re-read


async def test_a_failing_tool_call_cancels_its_siblings() -> None:
    """A step's calls run in parallel; when one fails the task, none outlives it."""
    from agentplex.agents.runner import _all_or_none

    sibling_cancelled = asyncio.Event()

    async def slow() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            sibling_cancelled.set()
            raise
        return "late"

    async def failing() -> str:
        await asyncio.sleep(0.01)
        raise errors.DeadlineExceeded("out of time")

    with pytest.raises(errors.DeadlineExceeded):
        await _all_or_none([slow(), failing()])
    assert sibling_cancelled.is_set()  # already unwound when the failure surfaced
    assert await _all_or_none([asyncio.sleep(0, result=1), asyncio.sleep(0, result=2)]) == [1, 2]


def tool_results(events: Recorder) -> dict[str, step_event_pb2.ToolCallResult]:
    return {
        e.tool_result.tool_name: e.tool_result for e in events.events if e.HasField("tool_result")
    }


async def test_an_unavailable_registry_fails_the_attempt_not_the_model(eventually) -> None:
    """The registry (or its Redis) down is no tool answer: the task fails UNAVAILABLE,
    to be run again, instead of the model answering from an outage message. The
    step's other calls finish first, so their outcomes are stored, not cut short."""
    tools = FakeTools()
    tools.release.clear()
    tools.refuse["slow"] = errors.Unavailable(
        "Redis is unavailable: connection refused", reason="REDIS_UNAVAILABLE"
    )
    llm = FakeLLM(call_tools(("echo", {}), ("slow", {})), answer("slow failed: Redis is down"))
    memory, events = FakeMemory(), Recorder()
    running = asyncio.create_task(
        runner(llm, tools, memory).run(task(), Deadline.after(10), events)
    )
    await eventually(
        lambda: "slow" in tool_results(events) and tools.in_flight == 1,
        message="the outage was not reported while the sibling ran",
    )
    assert not running.done()  # waits for the sibling instead of cancelling it
    tools.release.set()
    outcome = await running

    assert outcome.result.status == task_pb2.TASK_STATUS_FAILED
    assert isinstance(outcome.failure, errors.Unavailable)
    assert outcome.failure.reason == "TOOL_UNAVAILABLE"
    assert "Redis is unavailable" in outcome.result.error
    assert len(llm.requests) == 1  # the model never saw the outage
    assert memory.appended == []
    results = tool_results(events)
    assert results["slow"].error.code == "MESH_UNAVAILABLE"
    assert not results["echo"].HasField("error")  # the sibling finished
    assert events.events[-1].error.code == "UNAVAILABLE"


async def test_a_backend_the_mesh_could_not_run_fails_the_attempt() -> None:
    """MESH_UNAVAILABLE from the registry (the backend or its Redis down) likewise."""
    llm = FakeLLM(call_tools(("echo", {"backend_down": True})), answer("never"))
    events = Recorder()
    outcome = await runner(llm).run(task(), Deadline.after(10), events)
    assert isinstance(outcome.failure, errors.Unavailable)
    assert outcome.failure.reason == "TOOL_UNAVAILABLE"
    assert outcome.result.tool_calls == 1
    assert len(llm.requests) == 1
    assert tool_results(events)["echo"].error.code == "MESH_UNAVAILABLE"


def tasks_counted(status: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "agentplex_tasks_total", {"agent": SPEC.name, "status": status}
    )
    return value or 0.0


async def test_an_unexpected_exception_is_counted_as_an_error_not_a_cancel() -> None:
    before = {status: tasks_counted(status) for status in ("error", "cancelled")}
    with pytest.raises(RuntimeError, match="a bug"):
        await runner(FakeLLM(fail(RuntimeError("a bug")))).run(
            task(), Deadline.after(10), Recorder()
        )
    assert tasks_counted("error") == before["error"] + 1
    assert tasks_counted("cancelled") == before["cancelled"]

    started = asyncio.Event()

    async def hang(request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        started.set()
        await asyncio.Event().wait()
        yield TextDelta("never")

    running = asyncio.create_task(runner(FakeLLM(hang)).run(task(), Deadline.after(10), Recorder()))
    await started.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert tasks_counted("cancelled") == before["cancelled"] + 1
    assert tasks_counted("error") == before["error"] + 1
