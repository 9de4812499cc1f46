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
