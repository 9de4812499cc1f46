"""Prometheus metrics of the agent loop."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

tasks_finished = Counter(
    "agentplex_tasks_total", "Tasks that ended, by agent and final status.", ["agent", "status"]
)
tasks_in_flight = Gauge("agentplex_tasks_in_flight", "Tasks running right now.", ["agent"])
task_duration = Histogram(
    "agentplex_task_duration_seconds",
    "Wall-clock time of a task.",
    ["agent"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
llm_tokens = Counter(
    "agentplex_llm_tokens_total", "LLM tokens spent, by agent and kind.", ["agent", "kind"]
)
llm_retries = Counter(
    "agentplex_llm_retries_total", "LLM calls retried after a transient error.", ["agent"]
)
tool_calls = Counter(
    "agentplex_tool_calls_total",
    "Tool invocations, by agent, tool and outcome.",
    ["agent", "tool", "outcome"],
)
# A step is one model call (with its retries) plus the tool calls it asked for,
# which may be sub-agents' whole tasks: hence the long tail.
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
step_duration = Histogram(
    "agentplex_step_duration_seconds",
    "Wall-clock time of one plan-act-observe step: the model call and the step's tool calls.",
    ["agent"],
    buckets=STEP_BUCKETS,
)
llm_call_duration = Histogram(
    "agentplex_llm_call_duration_seconds",
    "Wall-clock time of one model call attempt, streamed to its end or its error.",
    ["agent", "model"],
    buckets=STEP_BUCKETS,
)

# Usage by tenant (runtime/principal.py; `default` is the mesh acting for itself):
# what each tenant's tasks cost, for showback and for its token quota (agents/quota.py).
# Tenants are as many as the token issuer's tenant claims; models, as the agents'
# configured ones; tools, as the agent's tool list (a name the model made up is
# counted as `unlisted`). Sum over `agent` for a tenant's total: each agent counts
# only its own calls, so a delegation's sub-task is counted once, by its agent.
tenant_tokens = Counter(
    "agentplex_tenant_tokens_total",
    "Model tokens spent (prompt and completion, summaries included), by tenant, agent and model.",
    ["tenant", "agent", "model"],
)
tenant_model_calls = Counter(
    "agentplex_tenant_model_calls_total",
    "Model calls that returned a completion (summaries included), by tenant, agent and model.",
    ["tenant", "agent", "model"],
)
tenant_tool_calls = Counter(
    "agentplex_tenant_tool_calls_total",
    "Tool calls an agent made (delegations included), by tenant, agent and tool.",
    ["tenant", "agent", "tool"],
)
tenant_quota_rejections = Counter(
    "agentplex_tenant_quota_rejections_total",
    "Model calls refused because the tenant had used its token quota for the period.",
    ["tenant", "agent"],
)
UNLISTED_TOOL = "unlisted"
