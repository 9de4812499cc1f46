"""The supervisor over real gRPC: delegation to the assistant and the researcher,
the live tree of events, and what follows a task down the tree (cancellation,
deadline, budget, depth, trace)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan

from agentplex.agents.delegation import TOKEN_BUDGET_EXCEEDED
from agentplex.agents.llm.base import CompletionRequest, LLMError, LLMEvent
from agentplex.agents.llm.scripted import ScriptedLLM
from agentplex.runtime.errors import from_rpc_error
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc, step_event_pb2, task_pb2

PROMPT = "what is 17*23 and how does the tool registry validate arguments?"
TERMINAL = (
    task_pb2.TASK_STATUS_COMPLETED,
    task_pb2.TASK_STATUS_FAILED,
    task_pb2.TASK_STATUS_CANCELLED,
)


@pytest.fixture
def agents(mesh, channel_to):
    return {
        name: agent_service_pb2_grpc.AgentServiceStub(channel_to(address))
        for name, address in mesh.agents.items()
    }


async def collect(call) -> list[step_event_pb2.StepEvent]:
    return [response.event async for response in call]


def kinds(events: list[step_event_pb2.StepEvent], kind: str) -> list[step_event_pb2.StepEvent]:
    return [e for e in events if e.WhichOneof("kind") == kind]


async def delegations_started(call, count: int) -> list[step_event_pb2.StepEvent]:
    """Read a stream until `count` delegations have started; returns the events so far."""
    seen: list[step_event_pb2.StepEvent] = []
    async for response in call:
        seen.append(response.event)
        if len(kinds(seen, "delegation_started")) == count:
            return seen
    raise AssertionError(f"the stream ended after {len(seen)} events")


async def test_supervisor_delegates_in_parallel_and_streams_the_whole_tree(
    agents, start_worker, make_gate, gated
) -> None:
    # Each sub-agent's first model call waits until both are waiting: if the
    # supervisor ran them one after the other, this would never open.
    gate = make_gate(open_at=2)
    await start_worker("assistant", llm=gated(gate))
    await start_worker("researcher", llm=gated(gate))

    events = await collect(
        agents["supervisor"].StreamSteps(pb.StreamStepsRequest(prompt=PROMPT), timeout=30)
    )

    root = events[0].task_id
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert all(e.task_id == root for e in events)
    calls = [c for c in kinds(events, "tool_call") if c.depth == 0]
    assert [c.tool_call.tool_name for c in calls] == ["agent.assistant", "agent.researcher"]
    assert {c.step for c in calls} == {1}  # one step: planned together
    started = kinds(events, "delegation_started")
    finished = kinds(events, "delegation_finished")
    assert {s.delegation_started.agent for s in started} == {"assistant", "researcher"}
    # Both sub-tasks were under way before either ended.
    assert max(s.sequence for s in started) < min(f.sequence for f in finished)

    children = {s.delegation_started.agent: s.delegation_started.task_id for s in started}
    nested = [e for e in events if e.source_task_id]
    assert {e.agent for e in nested} == {"assistant", "researcher"}
    assert all(e.depth == 1 and e.source_task_id == children[e.agent] for e in nested)
    assert {e.agent for e in kinds(nested, "tool_call")} == {"assistant", "researcher"}
    assert not kinds(nested, "final_result")  # a stream's final event is its own task's

    [final] = kinds(events, "final_result")
    result = final.final_result.result
    assert events[-1] is final and final.depth == 0
    assert result.status == task_pb2.TASK_STATUS_COMPLETED and result.error == ""
    assert "17*23 = 391." in result.output and "researcher: From " in result.output
    spent = sum(f.delegation_finished.result.tokens_used for f in finished)
    assert result.tokens_used > spent > 0  # sub-agents spend from the supervisor's budget

    # Each sub-task has its own record, with its place in the tree.
    for agent, child_id in children.items():
        record = (await agents[agent].GetTask(pb.GetTaskRequest(task_id=child_id), timeout=5)).task
        assert record.status == task_pb2.TASK_STATUS_COMPLETED
        assert record.lineage.parent_task_id == root and record.lineage.root_task_id == root
        assert (record.lineage.depth, list(record.lineage.agents)) == (1, ["supervisor"])


async def test_hanging_up_cancels_every_running_child(
    agents, start_worker, make_gate, gated, eventually
) -> None:
    gate = make_gate()  # never opens: the children are stuck in their first model call
    await start_worker("assistant", llm=gated(gate))
    await start_worker("researcher", llm=gated(gate))
    call = agents["supervisor"].StreamSteps(pb.StreamStepsRequest(prompt=PROMPT), timeout=30)
    seen = await delegations_started(call, 2)
    children = {
        e.delegation_started.agent: e.delegation_started.task_id
        for e in kinds(seen, "delegation_started")
    }

    async def status(agent: str) -> int:
        request = pb.GetTaskRequest(task_id=children[agent])
        return (await agents[agent].GetTask(request, timeout=5)).task.status

    await eventually(lambda: gate.waiting == 2, message="both children running")
    call.cancel()

    for agent in children:
        await eventually(
            lambda agent=agent: _is(status(agent), task_pb2.TASK_STATUS_CANCELLED),
            message=f"the {agent} sub-task cancelled on its own record",
        )


async def test_cancelling_a_durable_parent_cancels_its_children(
    agents, start_worker, make_gate, gated, eventually
) -> None:
    gate = make_gate()
    await start_worker("supervisor")
    await start_worker("assistant", llm=gated(gate))
    await start_worker("researcher", llm=gated(gate))
    supervisor = agents["supervisor"]
    await supervisor.SubmitTask(
        pb.SubmitTaskRequest(task=task_pb2.TaskSpec(prompt=PROMPT, task_id="parent-1")), timeout=5
    )
    seen = await delegations_started(
        supervisor.WatchTask(pb.WatchTaskRequest(task_id="parent-1"), timeout=30), 2
    )
    children = {
        e.delegation_started.agent: e.delegation_started.task_id
        for e in kinds(seen, "delegation_started")
    }
    await eventually(lambda: gate.waiting == 2, message="both children running")

    await supervisor.CancelTask(pb.CancelTaskRequest(task_id="parent-1"), timeout=5)

    async def record(agent: str, task_id: str) -> task_pb2.Task:
        return (await agents[agent].GetTask(pb.GetTaskRequest(task_id=task_id), timeout=5)).task

    await eventually(
        lambda: _is(_status(record("supervisor", "parent-1")), task_pb2.TASK_STATUS_CANCELLED),
        message="the parent cancelled",
    )
    for agent, child_id in children.items():
        await eventually(
            lambda agent=agent, child_id=child_id: _is(
                _status(record(agent, child_id)), task_pb2.TASK_STATUS_CANCELLED
            ),
            message=f"the {agent} sub-task cancelled on its own record",
        )
        child = await record(agent, child_id)
        assert child.lineage.parent_task_id == "parent-1"
    assert gate.arrived == 2  # neither child made another model call


async def test_sub_tasks_carry_the_callers_deadline_and_end_with_it(
    agents, start_worker, make_gate, gated, eventually
) -> None:
    gate = make_gate()
    await start_worker("assistant", llm=gated(gate))
    await start_worker("researcher", llm=gated(gate))
    timeout = 3.0
    caller_deadline = time.time() + timeout
    call = agents["supervisor"].StreamSteps(pb.StreamStepsRequest(prompt=PROMPT), timeout=timeout)
    seen: list[step_event_pb2.StepEvent] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for response in call:
            seen.append(response.event)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    children = {
        e.delegation_started.agent: e.delegation_started.task_id
        for e in kinds(seen, "delegation_started")
    }
    assert set(children) == {"assistant", "researcher"}
    for agent, child_id in children.items():
        request = pb.GetTaskRequest(task_id=child_id)
        child = (await agents[agent].GetTask(request, timeout=5)).task
        # Never later than the caller's own deadline (clock reads differ by the test's overhead).
        assert child.deadline.ToMicroseconds() / 1e6 <= caller_deadline + 0.5
        await eventually(
            lambda agent=agent, request=request: _in(
                _status_of(agents[agent].GetTask(request, timeout=5)), TERMINAL
            ),
            message=f"the {agent} sub-task ended with the caller's deadline",
        )


async def test_a_sub_task_that_reaches_a_worker_after_its_deadline_never_starts(
    agents, workers, eventually
) -> None:
    spec = task_pb2.TaskSpec(prompt="what is 2+2", task_id="too-late")
    spec.deadline.FromSeconds(int(time.time()) - 1)
    assistant = agents["assistant"]
    await assistant.SubmitTask(pb.SubmitTaskRequest(task=spec), timeout=5)
    request = pb.GetTaskRequest(task_id="too-late")
    await eventually(lambda: _in(_status_of(assistant.GetTask(request, timeout=5)), TERMINAL))
    task = (await assistant.GetTask(request, timeout=5)).task
    assert task.status == task_pb2.TASK_STATUS_FAILED
    assert task.result.steps_used == 0 and task.result.tokens_used == 0
    events = await collect(assistant.WatchTask(pb.WatchTaskRequest(task_id="too-late"), timeout=5))
    assert not kinds(events, "step_started")


async def test_sub_agents_spend_from_the_callers_budget(agents, workers) -> None:
    budget = 1400
    events = await collect(
        agents["supervisor"].StreamSteps(
            pb.StreamStepsRequest(prompt=PROMPT, token_budget=budget), timeout=30
        )
    )
    planned = kinds(events, "llm_call_finished")[0].llm_call_finished
    share = (budget - planned.prompt_tokens - planned.completion_tokens) // 2
    started = kinds(events, "delegation_started")
    assert [s.delegation_started.token_budget for s in started] == [share, share]
    accepted = [e for e in kinds(events, "task_accepted") if e.depth == 1]
    assert [a.task_accepted.token_budget for a in accepted] == [share, share]
    result = events[-1].final_result.result
    # A sub-task ran out of its share: the whole tree stops, with what it has.
    assert result.status == task_pb2.TASK_STATUS_COMPLETED
    assert result.error == TOKEN_BUDGET_EXCEEDED
    assert result.tokens_used <= budget
    finished = kinds(events, "delegation_finished")
    assert TOKEN_BUDGET_EXCEEDED in {f.delegation_finished.result.error for f in finished}


async def test_a_budget_warning_comes_once_most_of_it_is_spent(agents, workers) -> None:
    async def run(budget: int) -> list[step_event_pb2.StepEvent]:
        request = pb.StreamStepsRequest(prompt=PROMPT, token_budget=budget)
        return await collect(agents["supervisor"].StreamSteps(request, timeout=30))

    unbounded = await run(8192)
    assert not kinds(unbounded, "budget_warning")
    needed = unbounded[-1].final_result.result.tokens_used
    budget = int(needed / 0.85)  # the same deterministic run now spends 85% of it
    events = await run(budget)
    [warning] = kinds(events, "budget_warning")
    assert warning.depth == 0 and warning.budget_warning.token_budget == budget
    assert warning.budget_warning.tokens_used >= 0.8 * budget
    result = events[-1].final_result.result
    assert (result.error, result.tokens_used) == ("", needed)


async def test_no_sub_task_starts_without_a_budget_to_give_it(agents, workers) -> None:
    events = await collect(
        agents["supervisor"].StreamSteps(
            pb.StreamStepsRequest(prompt=PROMPT, token_budget=600), timeout=30
        )
    )
    assert not kinds(events, "delegation_started")
    errors = [r.tool_result.error for r in kinds(events, "tool_result")]
    assert [e.code for e in errors] == ["TOKEN_BUDGET_EXCEEDED"] * 2
    assert events[-1].final_result.result.error == TOKEN_BUDGET_EXCEEDED


def lineage(*agents: str) -> task_pb2.TaskLineage:
    return task_pb2.TaskLineage(
        parent_task_id="p-1", root_task_id="r-1", depth=len(agents), agents=list(agents)
    )


async def test_too_deep_a_delegation_is_a_tool_error_not_a_failed_task(agents, workers) -> None:
    events = await collect(
        agents["supervisor"].StreamSteps(
            pb.StreamStepsRequest(prompt=PROMPT, lineage=lineage("a", "b", "c")), timeout=30
        )
    )
    assert all(e.depth == 3 for e in events)
    errors = [r.tool_result.error for r in kinds(events, "tool_result")]
    assert [e.code for e in errors] == ["DELEGATION_DEPTH_EXCEEDED"] * 2
    # The two calls run in parallel: their errors arrive in either order.
    messages = sorted(e.message for e in errors)
    assert "a → b → c → supervisor → assistant would be depth 4" in messages[0]
    assert "a → b → c → supervisor → researcher would be depth 4" in messages[1]
    result = events[-1].final_result.result
    assert result.status == task_pb2.TASK_STATUS_COMPLETED
    assert "agent.assistant failed: delegation depth limit reached" in result.output


async def test_a_cycle_is_refused_and_the_model_routes_around_it(agents, workers) -> None:
    events = await collect(
        agents["supervisor"].StreamSteps(
            pb.StreamStepsRequest(prompt=PROMPT, lineage=lineage("assistant")), timeout=30
        )
    )
    results = {r.tool_result.tool_name: r.tool_result for r in kinds(events, "tool_result")}
    assert results["agent.assistant"].error.code == "DELEGATION_CYCLE"
    assert "assistant → supervisor → assistant" in results["agent.assistant"].error.message
    assert results["agent.researcher"].WhichOneof("outcome") == "result_json"
    result = events[-1].final_result.result
    assert result.status == task_pb2.TASK_STATUS_COMPLETED
    assert "researcher: From " in result.output


async def test_an_agent_refuses_a_task_that_would_close_a_cycle(agents) -> None:
    request = pb.RunTaskRequest(prompt="what is 1+1", lineage=lineage("assistant"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await agents["assistant"].RunTask(request, timeout=10)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert from_rpc_error(raised.value).reason == "DELEGATION_CYCLE"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await agents["assistant"].RunTask(
            pb.RunTaskRequest(prompt="hi", lineage=task_pb2.TaskLineage(depth=2)), timeout=10
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _status(record) -> int:
    return (await record).status


async def _status_of(response) -> int:
    return (await response).task.status


async def _is(status, wanted: int) -> bool:
    return await status == wanted


async def _in(status, wanted: tuple[int, ...]) -> bool:
    return await status in wanted


class BrokenModel(ScriptedLLM):
    """A model backend that refuses every call (a misconfigured sub-agent)."""

    async def stream(self, request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        raise LLMError("401 Unauthorized: bad API key")
        yield  # type: ignore[unreachable]  # an async generator, as stream() is: fails when iterated


async def test_a_failing_sub_agent_is_a_tool_error_the_model_routes_around(
    agents, start_worker
) -> None:
    await start_worker("assistant", llm=BrokenModel())
    await start_worker("researcher")
    events = await collect(
        agents["supervisor"].StreamSteps(pb.StreamStepsRequest(prompt=PROMPT), timeout=30)
    )
    results = {
        r.tool_result.tool_name: r.tool_result for r in kinds(events, "tool_result") if not r.depth
    }
    assert results["agent.assistant"].error.code == "FAILED_PRECONDITION"
    assert "the assistant agent failed: LLM call failed" in results["agent.assistant"].error.message
    result = events[-1].final_result.result
    assert result.status == task_pb2.TASK_STATUS_COMPLETED  # not a failed task
    assert "agent.assistant failed" in result.output and "researcher: From " in result.output


async def test_one_trace_id_across_supervisor_registry_queue_and_sub_agents(
    spans, agents, workers, eventually
) -> None:
    spans.clear()
    events = await collect(
        agents["supervisor"].StreamSteps(pb.StreamStepsRequest(prompt=PROMPT), timeout=30)
    )
    children = {e.delegation_started.task_id for e in kinds(events, "delegation_started")}

    def tasks() -> dict[object, ReadableSpan]:
        return {
            (s.attributes or {}).get("agent.task_id"): s
            for s in spans.get_finished_spans()
            if s.name == "agent.task"
        }

    await eventually(lambda: children <= set(tasks()), message="the sub-tasks' spans")
    root = tasks()[events[0].task_id]
    trace_id = root.context.trace_id
    for child in children:
        span = tasks()[child]
        # Sub-tasks ran on workers, after a hop through Redis; still the same trace.
        assert span.context.trace_id == trace_id, child
    services = {s.name for s in spans.get_finished_spans() if s.context.trace_id == trace_id}
    assert {"agent.task", "agent.tool_call", "registry.invoke", "agent.llm_call"} <= services
    assert any("InvokeToolStream" in name for name in services)
    assert any("SubmitTask" in name for name in services)
