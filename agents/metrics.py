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
