"""The circuit breaker per downstream agent: opens, probes, closes."""

from __future__ import annotations

import json

from agentplex.agents.app import agent_tool
from agentplex.agents.catalog import ASSISTANT
from agentplex.mesh.redis_process import free_port
from agentplex.registry.backends import BackendRouter, Invocation, _failure
from agentplex.registry.breaker import BreakerState, CircuitBreaker
from agentplex.runtime.clients import Deadline
from agentplex.v1 import tool_pb2
from agentplex.v1 import tool_registry_service_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def delegation(tool: tool_pb2.ToolDefinition, caller: pb.Caller) -> Invocation:
    return Invocation(
        tool=tool,
        arguments={"prompt": "hi"},
        caller=caller,
        deadline=Deadline.after(10),
        idempotency_key="t:1:0",
    )


def state_of(breaker: CircuitBreaker) -> BreakerState:
    """Read afresh: mypy would keep `breaker.state` narrowed across the calls that change it."""
    return breaker.state


def test_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_seconds=30, clock=Clock())
    for _ in range(2):
        assert breaker.allow()
        breaker.record(False)
    assert breaker.allow()
    breaker.record(True)  # a success resets the count
    for _ in range(2):
        assert breaker.allow()
        breaker.record(False)
    assert state_of(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    breaker.record(False)
    assert state_of(breaker) is BreakerState.OPEN
    assert not breaker.allow()


def test_half_open_admits_one_probe_and_closes_on_success() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, reset_seconds=30, clock=clock)
    breaker.record(False)
    clock.now += 29.9
    assert not breaker.allow() and breaker.retry_after() > 0
    clock.now += 0.1
    assert state_of(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.record(True)
    assert state_of(breaker) is BreakerState.CLOSED
    assert breaker.allow() and breaker.allow()


def test_a_failed_probe_opens_it_for_another_cool_down() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=5, reset_seconds=10, clock=clock)
    for _ in range(5):
        breaker.record(False)
    clock.now += 10
    assert breaker.allow()
    breaker.record(False)  # one failed probe is enough
    assert state_of(breaker) is BreakerState.OPEN
    clock.now += 9
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()


def test_a_probe_without_a_verdict_frees_the_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, reset_seconds=10, clock=clock)
    breaker.record(False)
    clock.now += 10
    assert breaker.allow()
    breaker.record(None)  # the caller gave up: says nothing about the peer
    assert state_of(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow()


async def test_a_dead_sub_agent_is_the_meshs_failure_even_once_its_circuit_is_open() -> None:
    """Through the router: an unreachable agent is MESH_UNAVAILABLE (the caller's
    attempt fails and is retried, its model is not told); once open, the agent is
    not even called, and the refusal says the same, since it is open for that."""
    clock = Clock()
    router = BackendRouter(
        tool_timeout_seconds=5, breaker_failure_threshold=2, breaker_reset_seconds=30, clock=clock
    )
    tool = agent_tool(ASSISTANT)
    tool.backend_kind = tool_pb2.BACKEND_KIND_AGENT
    dead = f"127.0.0.1:{free_port()}"
    caller = pb.Caller(agent="supervisor", session_id="s", task_id="t")

    async def call() -> tool_pb2.ToolError:
        response = await router.execute(delegation(tool, caller), [dead])
        assert response.HasField("error")
        return response.error

    try:
        assert (await call()).code == "MESH_UNAVAILABLE"
        assert (await call()).code == "MESH_UNAVAILABLE"
        refused = await call()
        assert refused.code == "MESH_UNAVAILABLE"
        assert "agent.assistant failed 2 times in a row" in refused.message
        assert "unreachable" in refused.message
        assert router.agents.breaker(tool.name).state is BreakerState.OPEN
        clock.now += 30
        assert (await call()).code == "MESH_UNAVAILABLE"  # the probe went through, and failed
        assert (await call()).code == "MESH_UNAVAILABLE"
    finally:
        await router.close()
    assert json.loads(tool.input_schema_json)["required"] == ["prompt"]


async def test_refusals_cancellations_and_budget_limits_give_no_verdict(monkeypatch) -> None:
    """Only failures of the agent itself count; a refused, cancelled or unaffordable
    call neither counts nor resets the count, and a full queue counts."""
    clock = Clock()
    router = BackendRouter(
        tool_timeout_seconds=5, breaker_failure_threshold=3, breaker_reset_seconds=30, clock=clock
    )
    tool = agent_tool(ASSISTANT)
    tool.backend_kind = tool_pb2.BACKEND_KIND_AGENT
    caller = pb.Caller(agent="supervisor", session_id="s", task_id="t")
    codes: list[str] = []

    async def fake_execute(*args, **kwargs):
        return _failure(codes.pop(0), "scripted")

    monkeypatch.setattr(router.agents, "_execute", fake_execute)

    async def call(code: str) -> str:
        codes.append(code)
        response = await router.execute(delegation(tool, caller), ["127.0.0.1:1"])
        return response.error.code

    breaker = router.agents.breaker(tool.name)
    assert await call("UNAVAILABLE") == "UNAVAILABLE"
    assert await call("QUEUE_FULL") == "QUEUE_FULL"
    for harmless in ("TOKEN_BUDGET_EXCEEDED", "CANCELLED", "DELEGATION_CYCLE"):
        assert await call(harmless) == harmless
        assert breaker.consecutive_failures == 2  # not reset, not counted
    assert await call("AGENT_FAILED") == "AGENT_FAILED"
    assert state_of(breaker) is BreakerState.OPEN
    # Open because the agent's work failed, not because it was unreachable: the
    # calling model is told, and does without it.
    assert await call("never sent") == "CIRCUIT_OPEN"
    codes.clear()

    clock.now += 30
    assert await call("CANCELLED") == "CANCELLED"  # the probe ended without a verdict
    assert state_of(breaker) is BreakerState.HALF_OPEN  # ... so it did not close the breaker
    assert await call("UNAVAILABLE") == "UNAVAILABLE"  # the next probe is admitted, and fails
    assert state_of(breaker) is BreakerState.OPEN


def test_a_sub_task_out_of_its_tenant_s_quota_does_not_count_against_the_agent() -> None:
    from agentplex.contract.reasons import Reason
    from agentplex.registry.backends import breaker_verdict, subtask_answer
    from agentplex.v1 import step_event_pb2

    def failed(code: str, reason: str = "") -> step_event_pb2.StepEvent:
        return step_event_pb2.StepEvent(
            error=step_event_pb2.TaskFailed(code=code, message="no", reason=reason)
        )

    out_of_quota = subtask_answer("researcher", failed("RESOURCE_EXHAUSTED", "QUOTA_EXHAUSTED"))
    assert out_of_quota.error.code == Reason.QUOTA_EXHAUSTED
    assert breaker_verdict(out_of_quota) is None
    # Any other exhaustion (a full queue, say) still does.
    overloaded = subtask_answer("researcher", failed("RESOURCE_EXHAUSTED", "QUEUE_FULL"))
    assert breaker_verdict(overloaded) is False
