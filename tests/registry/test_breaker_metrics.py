"""The registry's circuit breakers report their openings and whether they are open."""

from __future__ import annotations

from prometheus_client import REGISTRY

from agentplex.agents.app import agent_tool
from agentplex.agents.catalog import ASSISTANT
from agentplex.registry import metrics
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


def opens(tool: str) -> float:
    return REGISTRY.get_sample_value("agentplex_registry_breaker_opens_total", {"tool": tool}) or 0


def is_open(tool: str) -> float | None:
    return REGISTRY.get_sample_value("agentplex_registry_breaker_open", {"tool": tool})


def test_transitions_are_told_once_each() -> None:
    clock = Clock()
    told: list[BreakerState] = []
    breaker = CircuitBreaker(
        failure_threshold=2, reset_seconds=10, clock=clock, on_transition=told.append
    )
    breaker.record(False)
    assert told == []
    breaker.record(False)
    breaker.record(False)  # a call let through before the opening: no new opening
    assert told == [BreakerState.OPEN]
    clock.now += 10
    assert breaker.allow()
    breaker.record(False)  # the failed probe opens it again
    clock.now += 10
    assert breaker.allow()
    breaker.record(True)
    breaker.record(True)  # already closed: nothing to tell
    assert told == [BreakerState.OPEN, BreakerState.OPEN, BreakerState.CLOSED]


def test_the_series_start_at_zero() -> None:
    metrics.breaker_transitions("agent.fresh")
    assert opens("agent.fresh") == 0
    assert is_open("agent.fresh") == 0


async def test_a_failing_agent_opens_its_breaker_on_the_metrics(monkeypatch) -> None:
    clock = Clock()
    router = BackendRouter(
        tool_timeout_seconds=5, breaker_failure_threshold=3, breaker_reset_seconds=30, clock=clock
    )
    tool = agent_tool(ASSISTANT)
    tool.backend_kind = tool_pb2.BACKEND_KIND_AGENT
    caller = pb.Caller(agent="supervisor", session_id="s", task_id="t")
    codes: list[str] = []

    async def fake_execute(*args: object, **kwargs: object) -> object:
        return _failure(codes.pop(0), "scripted") if codes else pb.InvokeToolResponse()

    monkeypatch.setattr(router.agents, "_execute", fake_execute)

    async def call(code: str = "") -> None:
        if code:
            codes.append(code)
        invocation = Invocation(
            tool=tool,
            arguments={"prompt": "hi"},
            caller=caller,
            deadline=Deadline.after(10),
            idempotency_key="t:1:0",
        )
        await router.execute(invocation, ["127.0.0.1:1"])

    before = opens(tool.name)
    try:
        for _ in range(2):
            await call("AGENT_FAILED")
        assert (opens(tool.name), is_open(tool.name)) == (before, 0)
        await call("AGENT_FAILED")  # the threshold
        assert (opens(tool.name), is_open(tool.name)) == (before + 1, 1)
        await call()  # refused while open: it would have succeeded
        assert (opens(tool.name), is_open(tool.name)) == (before + 1, 1)
        clock.now += 30
        await call("UNAVAILABLE")  # the probe fails: open again
        assert (opens(tool.name), is_open(tool.name)) == (before + 2, 1)
        clock.now += 30
        await call()  # the probe succeeds
        assert (opens(tool.name), is_open(tool.name)) == (before + 2, 0)
    finally:
        await router.close()
