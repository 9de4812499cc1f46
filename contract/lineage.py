"""Lineage: where a task sits in a delegation tree, and the limits that follow from it.

A task's lineage names its parent, the tree's root, its depth and the agents
above it. The registry derives a sub-task's lineage from the caller's when an
agent delegates (`agent.<name>` tools, `contract/agent_tool.py`) and refuses
delegations that would go deeper than the mesh allows or come back to an
agent already in the chain;
an agent refuses a task whose lineage already lists it. Both are
FAILED_PRECONDITION: the calling model sees a tool error, its task goes on.
"""

from __future__ import annotations

from agentplex.contract.reasons import Reason
from agentplex.runtime.errors import FailedPrecondition, InvalidArgument
from agentplex.v1 import task_pb2

# Stands in the chain for a caller that is not an agent.
OPERATOR = "operator"


def check_shape(lineage: task_pb2.TaskLineage) -> None:
    """A lineage lists exactly one agent per level above the task."""
    if len(lineage.agents) != lineage.depth:
        raise InvalidArgument(
            f"lineage: agents must name one agent per level of depth "
            f"(depth {lineage.depth}, {len(lineage.agents)} agents)"
        )
    if lineage.depth and not (lineage.parent_task_id and lineage.root_task_id):
        raise InvalidArgument("lineage: a sub-task needs parent_task_id and root_task_id")


def check_accepts(agent: str, lineage: task_pb2.TaskLineage) -> None:
    """An agent may not run a task that it (further up the tree) delegated itself."""
    check_shape(lineage)
    if agent in lineage.agents:
        raise FailedPrecondition(
            f"delegation cycle: {_chain([*lineage.agents, agent])}",
            reason=Reason.DELEGATION_CYCLE,
        )


def child_lineage(
    *, caller_agent: str, caller_task_id: str, caller: task_pb2.TaskLineage
) -> task_pb2.TaskLineage:
    """The lineage of a sub-task the caller's task delegates. A call made for no
    task (an operator's, a script's) starts a tree of its own."""
    if not caller_task_id:
        return task_pb2.TaskLineage()
    return task_pb2.TaskLineage(
        parent_task_id=caller_task_id,
        root_task_id=caller.root_task_id or caller_task_id,
        depth=caller.depth + 1,
        agents=[*caller.agents, caller_agent or OPERATOR],
    )


def check_delegation(
    *, caller_agent: str, caller: task_pb2.TaskLineage, target: str, max_depth: int
) -> None:
    """Refuse a delegation that would loop back or go deeper than `max_depth`."""
    check_shape(caller)
    chain = [*caller.agents, caller_agent] if caller_agent else list(caller.agents)
    if target in chain:
        raise FailedPrecondition(
            f"delegation cycle: {_chain([*chain, target])} ({target} is already working "
            "on this task further up; answer from what you have instead)",
            reason=Reason.DELEGATION_CYCLE,
        )
    if caller.depth + 1 > max_depth:
        raise FailedPrecondition(
            f"delegation depth limit reached: {_chain([*chain, target])} would be depth "
            f"{caller.depth + 1}, the limit is {max_depth}",
            reason=Reason.DELEGATION_DEPTH_EXCEEDED,
        )


def _chain(agents: list[str]) -> str:
    return " → ".join(agents)
