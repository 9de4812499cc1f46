"""The tool list shared by one agent process's tasks: when it is reused, when read again."""

from __future__ import annotations

from agentplex.agents.tool_list import SharedToolList, TaskToolList
from agentplex.v1 import tool_pb2, tool_registry_service_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def listing(revision: int, *names: str) -> tool_registry_service_pb2.ListToolsResponse:
    return tool_registry_service_pb2.ListToolsResponse(
        tools=[tool_pb2.ToolDefinition(name=name, version="1.0.0") for name in names],
        revision=revision,
    )


def shared(max_age: float = 1.0) -> tuple[SharedToolList, Clock]:
    clock = Clock()
    return SharedToolList(max_age=max_age, clock=clock), clock


def test_the_first_task_reads_and_the_next_reuses_within_max_age() -> None:
    cache, clock = shared()
    first = TaskToolList(cache)
    assert first.stale()
    first.read(listing(7, "calculator"))
    assert not first.stale()
    clock.now += 0.9
    second = TaskToolList(cache)
    assert not second.stale()
    assert [t.name for t in second.tools] == ["calculator"]
    assert second.revision == 7


def test_past_max_age_a_new_task_reads_again() -> None:
    cache, clock = shared(max_age=1.0)
    TaskToolList(cache).read(listing(7, "calculator"))
    clock.now += 1.01
    assert TaskToolList(cache).stale()


def test_a_newer_revision_reported_by_any_task_ends_the_reuse_at_once() -> None:
    cache, _clock = shared()
    first = TaskToolList(cache)
    first.read(listing(7, "calculator"))
    first.saw(8)  # a tool call of this task reported that the registry moved on
    assert first.stale()  # this task reads again before its next step
    assert TaskToolList(cache).stale()  # and so does the next task


def test_a_failed_call_drops_the_shared_list() -> None:
    cache, _clock = shared()
    first = TaskToolList(cache)
    first.read(listing(7, "calculator"))
    first.saw(None)
    assert first.stale()
    assert TaskToolList(cache).stale()


def test_the_same_revision_keeps_the_list() -> None:
    cache, _clock = shared()
    first = TaskToolList(cache)
    first.read(listing(7, "calculator"))
    first.saw(7)
    assert not first.stale()
    assert not TaskToolList(cache).stale()


def test_max_age_zero_reads_at_the_start_of_every_task() -> None:
    cache, _clock = shared(max_age=0)
    TaskToolList(cache).read(listing(7, "calculator"))
    assert TaskToolList(cache).stale()


def test_a_task_that_read_a_newer_list_moves_the_shared_one_forward() -> None:
    cache, clock = shared()
    TaskToolList(cache).read(listing(7, "calculator"))
    clock.now += 0.5
    TaskToolList(cache).read(listing(9, "calculator", "notes.read"))
    later = TaskToolList(cache)
    assert not later.stale()
    assert later.revision == 9
    assert [t.name for t in later.tools] == ["calculator", "notes.read"]
