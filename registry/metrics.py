"""Prometheus metrics of the Tool Registry: its circuit breakers.

A breaker guards one downstream agent, so the label is the agent's tool name
(`agent.<name>`): as bounded as the agents of the mesh. Each registry replica
keeps its own breakers (breaker.py); aggregate replicas with `max by (tool)`
for the gauge and `sum by (tool)` for the counter.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge

from agentplex.registry.breaker import BreakerState

breaker_opens = Counter(
    "agentplex_registry_breaker_opens_total",
    "Times a circuit breaker opened, by agent tool (a failed half-open probe opens it again).",
    ["tool"],
)
breaker_open = Gauge(
    "agentplex_registry_breaker_open",
    "1 while an agent tool's circuit breaker is open or half-open, 0 once a call closed it.",
    ["tool"],
)


def breaker_transitions(tool: str) -> Callable[[BreakerState], None]:
    """The `on_transition` of the breaker guarding `tool`; its series start at 0,
    so the first opening is already a rise a `rate()` sees."""
    opens, is_open = breaker_opens.labels(tool), breaker_open.labels(tool)
    is_open.set(0)

    def record(state: BreakerState) -> None:
        if state is BreakerState.OPEN:
            opens.inc()
            is_open.set(1)
        else:
            is_open.set(0)

    return record
