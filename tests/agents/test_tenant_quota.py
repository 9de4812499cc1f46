"""The per-tenant token quota (agents/quota.py) and the usage metrics by tenant.

The window arithmetic is pure; the counter runs against the session's real
Redis; the runner tests drive `AgentRunner` with a scripted model and small
in-memory registry and memory stand-ins, under a bound principal.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from prometheus_client import REGISTRY

from agentplex.agents.catalog import AgentSpec
from agentplex.agents.llm.base import (
    Completion,
    CompletionRequest,
    LLMEvent,
    TextDelta,
    ToolCall,
    Usage,
)
from agentplex.agents.quota import QuotaPolicy, TokenQuota, Window
from agentplex.agents.runner import AgentRunner, RetryPolicy
from agentplex.contract.reasons import Reason
from agentplex.contract.task_request import TaskRequest
from agentplex.runtime import errors, principal, redis_client
from agentplex.runtime.clients import Deadline
from agentplex.runtime.principal import Principal
from agentplex.runtime.settings import Settings
from agentplex.v1 import (
    memory_pb2,
    memory_service_pb2,
    step_event_pb2,
    task_pb2,
    tool_pb2,
    tool_registry_service_pb2,
)

HOUR = 3600
DAY = 86400
MODEL = "fake/quota"

# --- the window arithmetic --------------------------------------------------------------


def test_windows_are_aligned_to_the_epoch() -> None:
    # 2025-01-02T10:17:36Z
    now = 1735813056.25
    day = Window.at(now, DAY)
    assert (day.start, day.end) == (1735776000, 1735862400)
    assert day.resets_at() == "2025-01-03T00:00:00Z"
    hour = Window.at(now, HOUR)
    assert hour.resets_at() == "2025-01-02T11:00:00Z"
    assert hour.seconds_left(now) == 42 * 60 + 24  # 10:17:36.25 → 11:00, rounded up


def test_a_window_ends_where_the_next_begins() -> None:
    first = Window.at(7199.999, HOUR)
    assert (first.start, first.end) == (3600, 7200)
    assert Window.at(7200, HOUR).start == first.end
    # Never "retry in 0 seconds", even a hair before the reset.
    assert first.seconds_left(7199.999) == 1


def test_a_window_needs_a_period() -> None:
    with pytest.raises(ValueError, match="at least 1 second"):
        Window.at(10.0, 0)


# --- whose quota ---------------------------------------------------------------------


ACME = Principal(tenant="acme", subject="alice", scopes=frozenset())


def test_the_quota_applies_to_tenants_not_the_mesh() -> None:
    policy = QuotaPolicy(tokens=100, per_tenant={"big": 1000, "free": 0})
    assert policy.enabled
    assert policy.limit_for(ACME) == 100
    assert policy.limit_for(Principal("big", scopes=frozenset())) == 1000
    assert policy.limit_for(Principal("free", scopes=frozenset())) == 0  # 0: unlimited
    assert policy.limit_for(principal.MESH) == 0
    # A token for the default tenant is a tenant like any other.
    assert policy.limit_for(Principal(principal.DEFAULT_TENANT, scopes=frozenset())) == 100


def test_the_mesh_is_limited_only_by_an_explicit_default_entry() -> None:
    policy = QuotaPolicy(per_tenant={principal.DEFAULT_TENANT: 50})
    assert policy.enabled
    assert policy.limit_for(principal.MESH) == 50
    assert policy.limit_for(ACME) == 0


def test_no_quota_configured_is_no_quota() -> None:
    assert not QuotaPolicy().enabled
    assert not QuotaPolicy(per_tenant={"free": 0}).enabled


def test_settings_carry_the_quota(redis_url: str) -> None:
    settings = Settings(
        redis_url=redis_url,
        tenant_token_quota=10,
        tenant_token_quota_period_seconds=60,
        tenant_token_quotas={"acme": 5},
    )
    policy = QuotaPolicy.from_settings(settings)
    assert (policy.tokens, policy.period_seconds, dict(policy.per_tenant)) == (
        10,
        60,
        {"acme": 5},
    )
    assert Settings(redis_url=redis_url).tenant_token_quota == 0  # unlimited by default


def test_settings_refuse_a_quota_for_no_tenant(redis_url: str) -> None:
    with pytest.raises(ValueError, match="not a tenant name"):
        Settings(redis_url=redis_url, tenant_token_quotas={"a tenant": 5})
    with pytest.raises(ValueError, match="must be ≥ 0"):
        Settings(redis_url=redis_url, tenant_token_quotas={"acme": -1})


# --- the counter, in Redis ---------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def act_as(tenant: str) -> None:
    """Act for `tenant` (a token's principal) for the rest of the test. Each test runs
    in its own asyncio task, with its own copy of the context: the binding ends with it
    (the last test of this module checks that)."""
    principal.bind(Principal(tenant=tenant, scopes=frozenset()))


def quota(
    redis: aioredis.Redis, key_prefix: str, clock: Clock, tokens: int = 100, **per_tenant: int
) -> TokenQuota:
    return TokenQuota(
        redis,
        key_prefix=key_prefix,
        policy=QuotaPolicy(tokens=tokens, period_seconds=HOUR, per_tenant=per_tenant),
        clock=clock,
    )


async def test_usage_is_counted_per_tenant_and_window(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    clock = Clock(10 * HOUR + 5)
    counter = quota(redis_client, key_prefix, clock)
    act_as("acme")
    await counter.record(30)
    await counter.record(12)
    key = f"{key_prefix}@acme:quota:tokens:{10 * HOUR}"
    assert await redis_client.get(key) == b"42"
    # Kept two periods, so it outlives its window whatever the replicas' clocks say.
    assert HOUR < await redis_client.ttl(key) <= 2 * HOUR
    assert await counter.used() == 42
    assert await counter.used("other") == 0
    # The next window starts from nothing.
    clock.now = 11 * HOUR
    assert await counter.used() == 0
    await counter.record(5)
    assert await redis_client.get(f"{key_prefix}@acme:quota:tokens:{11 * HOUR}") == b"5"


async def test_the_default_tenant_counts_under_the_plain_prefix(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    counter = quota(redis_client, key_prefix, Clock(HOUR))
    act_as(principal.DEFAULT_TENANT)
    await counter.record(7)
    assert await redis_client.get(f"{key_prefix}:quota:tokens:{HOUR}") == b"7"


async def test_a_tenant_without_a_quota_costs_no_redis(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    counter = quota(redis_client, key_prefix, Clock(HOUR), free=0)
    act_as("free")
    await counter.record(1_000_000)
    await counter.check()
    # ...and neither does the mesh acting for itself.
    principal.bind(principal.MESH)
    await counter.record(1_000_000)
    await counter.check()
    assert await redis_client.keys(f"{key_prefix}*") == []


async def test_check_refuses_once_the_quota_is_used_and_says_when_it_resets(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    clock = Clock(1735813056.0)  # 2025-01-02T10:17:36Z
    counter = quota(redis_client, key_prefix, clock, tokens=50)
    act_as("acme")
    await counter.record(49)
    await counter.check()  # 49 of 50: one more call may start
    await counter.record(3)
    with pytest.raises(errors.ResourceExhausted) as refused:
        await counter.check()
    error = refused.value
    assert error.reason == Reason.QUOTA_EXHAUSTED
    assert errors.status_code_for(error).name == "RESOURCE_EXHAUSTED"
    assert error.message == (
        "tenant 'acme' has used 52 of its 50 tokens for the 1-hour period; "
        "the quota resets at 2025-01-02T11:00:00Z (in 2544 s)"
    )
    assert error.metadata == {
        "tenant": "acme",
        "quota_tokens": "50",
        "used_tokens": "52",
        "period_seconds": "3600",
        "resets_at": "2025-01-02T11:00:00Z",
        "retry_after_seconds": "2544",
    }
    # The next period, the tenant may call again.
    clock.now = 1735815600.0
    await counter.check()


async def test_a_refusal_reaches_the_caller_with_its_reset_time() -> None:
    """RunTask raises the task's failure; the interceptor sends `to_status` of it."""
    error = errors.ResourceExhausted(
        "tenant 'acme' has used its quota",
        reason=Reason.QUOTA_EXHAUSTED,
        metadata={"resets_at": "2025-01-02T11:00:00Z", "retry_after_seconds": "2544"},
    )
    status = errors.to_status(error)
    assert status.code == 8  # RESOURCE_EXHAUSTED
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "QUOTA_EXHAUSTED"
    assert dict(info.metadata) == {
        "resets_at": "2025-01-02T11:00:00Z",
        "retry_after_seconds": "2544",
    }


async def test_a_quota_that_cannot_be_checked_is_not_waived(key_prefix: str) -> None:
    # Nothing listens on port 1: the connection is refused at once.
    down = redis_client.connect("redis://127.0.0.1:1/0")
    try:
        counter = quota(down, key_prefix, Clock(HOUR))
        act_as("acme")
        with pytest.raises(errors.Unavailable) as failed:
            await counter.check()
        assert failed.value.reason == Reason.REDIS_UNAVAILABLE
        # Recording only logs: the tokens are spent, the task's answer is kept.
        await counter.record(10)
    finally:
        await down.aclose()


# --- the runner: refusing the next model call, metrics by tenant --------------------------

SPEC = AgentSpec("quota-tester", "1.0.0", "test agent", "Be brief.", ("echo",))
AGENT = SPEC.name
Step = Callable[[CompletionRequest], AsyncIterator[LLMEvent]]


def answer(text: str, prompt_tokens: int = 10, completion_tokens: int = 5) -> Step:
    async def step(request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        yield TextDelta(text)
        yield Completion(text, (), "stop", Usage(prompt_tokens, completion_tokens), MODEL)

    return step


def call_tools(*names: str, tokens: int = 10) -> Step:
    async def step(request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        calls = tuple(ToolCall(f"c{i}", name, json.dumps({"i": i})) for i, name in enumerate(names))
        yield Completion("", calls, "tool_calls", Usage(tokens, tokens), MODEL)

    return step


class ScriptedModel:
    """Plays one scripted step per call; counts the calls it was asked for."""

    model = MODEL

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.calls = 0

    def stream(self, request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        self.calls += 1
        return self.steps.pop(0)(request)

    async def aclose(self) -> None:
        return None


class Tools:
    """A registry that lists `echo` and answers every call."""

    async def list_tools(
        self, agent: str = "", *, timeout: float
    ) -> tool_registry_service_pb2.ListToolsResponse:
        return tool_registry_service_pb2.ListToolsResponse(
            tools=[
                tool_pb2.ToolDefinition(
                    name="echo", version="1.0.0", description="echo", input_schema_json="{}"
                )
            ],
            revision=1,
        )

    async def invoke(
        self, request: tool_registry_service_pb2.InvokeToolRequest, *, timeout: float
    ) -> tool_registry_service_pb2.InvokeToolResponse:
        return tool_registry_service_pb2.InvokeToolResponse(
            tool_name=request.tool_name, result_json=request.arguments_json, registry_revision=1
        )

    def invoke_stream(
        self, request: tool_registry_service_pb2.InvokeToolRequest, *, timeout: float
    ) -> AsyncIterator[tool_registry_service_pb2.InvokeToolStreamResponse]:
        raise AssertionError("no delegation here")


class Memory:
    async def load(
        self, agent: str, session_id: str, max_tokens: int, *, timeout: float
    ) -> memory_service_pb2.LoadContextResponse:
        return memory_service_pb2.LoadContextResponse()

    async def append(
        self,
        agent: str,
        session_id: str,
        messages: Sequence[memory_pb2.MemoryMessage],
        *,
        timeout: float,
    ) -> int:
        return len(messages)

    async def read(
        self, agent: str, session_id: str, start_position: int, max_messages: int, *, timeout: float
    ) -> memory_service_pb2.ReadMessagesResponse:
        raise AssertionError("nothing to summarize")

    async def store_summary(
        self,
        agent: str,
        session_id: str,
        summary: memory_pb2.ContextSummary,
        expected_through_position: int,
        *,
        timeout: float,
    ) -> memory_service_pb2.StoreSummaryResponse:
        raise AssertionError("nothing to summarize")


def runner(model: ScriptedModel, counter: TokenQuota | None) -> AgentRunner:
    return AgentRunner(
        spec=SPEC,
        llm=model,
        tools=Tools(),
        memory=Memory(),
        context_tokens=1000,
        retry=RetryPolicy(attempts=1, initial_seconds=0.0, max_seconds=0.0),
        quota=counter,
    )


def task(task_id: str) -> TaskRequest:
    return TaskRequest(
        task_id=task_id, prompt="do it", session_id="s1", max_steps=5, token_budget=8192
    )


class Events:
    def __init__(self) -> None:
        self.events: list[step_event_pb2.StepEvent] = []

    async def __call__(self, event: step_event_pb2.StepEvent) -> None:
        self.events.append(event)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def tenant_name() -> str:
    """A tenant of this test alone: the metrics are process-wide."""
    return f"t{uuid.uuid4().hex[:10]}"


async def test_a_tenant_over_its_quota_is_refused_the_next_model_call(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    tenant, other = tenant_name(), tenant_name()
    counter = TokenQuota(
        redis_client, key_prefix=key_prefix, policy=QuotaPolicy(tokens=20, period_seconds=DAY)
    )
    act_as(tenant)

    # Step 1 spends 20 tokens (the whole quota) and calls a tool; step 2 is refused.
    model = ScriptedModel(call_tools("echo"), answer("never said"))
    events = Events()
    started = time.time()
    outcome = await runner(model, counter).run(task("q1"), Deadline.after(10), events)

    assert model.calls == 1  # the refused call never reached the model
    failure = outcome.failure
    assert isinstance(failure, errors.ResourceExhausted)
    assert failure.reason == Reason.QUOTA_EXHAUSTED
    window = Window.at(started, DAY)
    assert failure.metadata["resets_at"] == window.resets_at()
    assert 0 < int(failure.metadata["retry_after_seconds"]) <= DAY
    assert f"tenant {tenant!r} has used 20 of its 20 tokens for the 1-day period" in (
        failure.message
    )
    assert f"resets at {window.resets_at()}" in failure.message
    # The task's record: FAILED, with what it used before the refusal.
    result = outcome.result
    assert result.status == task_pb2.TASK_STATUS_FAILED
    assert (result.steps_used, result.tokens_used, result.tool_calls) == (2, 20, 1)
    assert result.error == failure.message
    # A streamed run ends with the same failure, as RunTask would answer.
    final = events.events[-1]
    assert final.WhichOneof("kind") == "error"
    assert final.error.code == "RESOURCE_EXHAUSTED"
    assert final.error.message == failure.message
    assert final.error.result == result

    # The next task of the tenant is refused before its first call.
    model = ScriptedModel(answer("never said"))
    outcome = await runner(model, counter).run(task("q2"), Deadline.after(10), Events())
    assert model.calls == 0
    assert isinstance(outcome.failure, errors.ResourceExhausted)
    assert outcome.result.tokens_used == 0

    # Another tenant's tasks are unaffected.
    act_as(other)
    model = ScriptedModel(answer("fine"))
    outcome = await runner(model, counter).run(task("q3"), Deadline.after(10), Events())
    assert outcome.failure is None
    assert outcome.result.status == task_pb2.TASK_STATUS_COMPLETED
    assert outcome.result.output == "fine"
    assert await counter.used(other) == 15
    assert await counter.used(tenant) == 20

    assert sample("agentplex_tenant_quota_rejections_total", tenant=tenant, agent=AGENT) == 2
    assert sample("agentplex_tenant_quota_rejections_total", tenant=other, agent=AGENT) == 0


async def test_usage_metrics_count_by_tenant() -> None:
    acme, beta = tenant_name(), tenant_name()
    act_as(acme)
    # No quota at all: usage is attributed regardless.
    model = ScriptedModel(call_tools("echo", "echo", "ghost", tokens=6), answer("done", 7, 3))
    outcome = await runner(model, None).run(task("u1"), Deadline.after(10), Events())
    assert outcome.result.status == task_pb2.TASK_STATUS_COMPLETED
    assert (outcome.result.tokens_used, outcome.result.tool_calls) == (22, 3)

    act_as(beta)
    model = ScriptedModel(answer("hi", 4, 1))
    await runner(model, None).run(task("u2"), Deadline.after(10), Events())

    by_model = {"agent": AGENT, "model": MODEL}
    assert sample("agentplex_tenant_tokens_total", tenant=acme, **by_model) == 22
    assert sample("agentplex_tenant_model_calls_total", tenant=acme, **by_model) == 2
    assert sample("agentplex_tenant_tokens_total", tenant=beta, **by_model) == 5
    assert sample("agentplex_tenant_model_calls_total", tenant=beta, **by_model) == 1
    tools = "agentplex_tenant_tool_calls_total"
    assert sample(tools, tenant=acme, agent=AGENT, tool="echo") == 2
    # A tool the model made up is counted, under one label for all such names.
    assert sample(tools, tenant=acme, agent=AGENT, tool="unlisted") == 1
    assert sample(tools, tenant=acme, agent=AGENT, tool="ghost") == 0
    assert sample(tools, tenant=beta, agent=AGENT, tool="echo") == 0


async def test_the_mesh_runs_unlimited_under_a_tenant_quota(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    counter = TokenQuota(
        redis_client, key_prefix=key_prefix, policy=QuotaPolicy(tokens=1, period_seconds=DAY)
    )
    assert principal.current().is_mesh
    for n in range(3):
        model = ScriptedModel(answer("ok"))
        outcome = await runner(model, counter).run(task(f"m{n}"), Deadline.after(10), Events())
        assert outcome.failure is None
    assert await redis_client.keys(f"{key_prefix}*") == []
