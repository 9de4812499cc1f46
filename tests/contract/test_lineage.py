"""Lineage rules: a sub-task's place in the tree, depth limit, cycles."""

from __future__ import annotations

import pytest

from agentplex.contract import lineage
from agentplex.runtime.errors import FailedPrecondition, InvalidArgument
from agentplex.v1 import task_pb2


def test_a_root_tasks_child_starts_the_chain() -> None:
    child = lineage.child_lineage(
        caller_agent="supervisor", caller_task_id="t-1", caller=task_pb2.TaskLineage()
    )
    assert (child.parent_task_id, child.root_task_id, child.depth) == ("t-1", "t-1", 1)
    assert list(child.agents) == ["supervisor"]
    grandchild = lineage.child_lineage(caller_agent="assistant", caller_task_id="d-2", caller=child)
    assert (grandchild.parent_task_id, grandchild.root_task_id, grandchild.depth) == (
        "d-2",
        "t-1",
        2,
    )
    assert list(grandchild.agents) == ["supervisor", "assistant"]


def test_a_call_for_no_task_starts_a_tree_of_its_own() -> None:
    assert (
        lineage.child_lineage(caller_agent="", caller_task_id="", caller=task_pb2.TaskLineage())
        == task_pb2.TaskLineage()
    )


def test_depth_limit() -> None:
    at_two = task_pb2.TaskLineage(parent_task_id="p", root_task_id="r", depth=2, agents=["a", "b"])
    lineage.check_delegation(caller_agent="c", caller=at_two, target="d", max_depth=3)
    at_three = task_pb2.TaskLineage(
        parent_task_id="p", root_task_id="r", depth=3, agents=["a", "b", "c"]
    )
    with pytest.raises(FailedPrecondition) as refused:
        lineage.check_delegation(caller_agent="d", caller=at_three, target="e", max_depth=3)
    assert refused.value.reason == "DELEGATION_DEPTH_EXCEEDED"


@pytest.mark.parametrize("target", ["supervisor", "assistant"])
def test_cycles(target: str) -> None:
    above = task_pb2.TaskLineage(
        parent_task_id="p", root_task_id="r", depth=1, agents=["supervisor"]
    )
    with pytest.raises(FailedPrecondition) as refused:
        lineage.check_delegation(caller_agent="assistant", caller=above, target=target, max_depth=9)
    assert refused.value.reason == "DELEGATION_CYCLE"
    with pytest.raises(FailedPrecondition):
        lineage.check_accepts("supervisor", above)
    lineage.check_accepts("assistant", above)


def test_malformed_lineage_is_invalid() -> None:
    with pytest.raises(InvalidArgument):
        lineage.check_shape(task_pb2.TaskLineage(depth=1, agents=["a"]))  # no parent, no root
    with pytest.raises(InvalidArgument):
        lineage.check_shape(task_pb2.TaskLineage(depth=2, agents=["a"]))
