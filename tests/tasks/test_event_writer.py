"""EventWriter: order, batching, linger, and a close that never waits out the linger."""

from __future__ import annotations

import asyncio

from agentplex.tasks.events import EventWriter
from agentplex.v1 import step_event_pb2


class RecordingStore:
    """Stands in for TaskStore.append_events: records each write's sequences."""

    def __init__(self) -> None:
        self.writes: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.written = asyncio.Event()

    async def append_events(
        self, task_id: str, attempt: int, events: list[step_event_pb2.StepEvent]
    ) -> None:
        await self.release.wait()
        self.writes.append([event.sequence for event in events])
        self.written.set()


def event(sequence: int) -> step_event_pb2.StepEvent:
    return step_event_pb2.StepEvent(task_id="t", sequence=sequence)


def writer(store: RecordingStore, linger: float = 0.0) -> EventWriter:
    return EventWriter(store, "t", 1, on_error=lambda: None, linger=linger)  # type: ignore[arg-type]  # a stand-in: the writer calls only append_events


async def test_without_linger_events_that_pile_up_during_a_write_go_in_the_next() -> None:
    store = RecordingStore()
    store.release.clear()
    events = writer(store)
    events.add(event(1))
    await asyncio.sleep(0)  # the writer takes event 1 and waits on Redis
    events.add(event(2))
    events.add(event(3))
    store.release.set()
    await events.close()
    assert store.writes == [[1], [2, 3]]


async def test_with_linger_a_burst_shares_one_write() -> None:
    store = RecordingStore()
    events = writer(store, linger=60.0)
    events.add(event(1))
    for sequence in (2, 3, 4):
        await asyncio.sleep(0)  # other work between events, as across a hop
        events.add(event(sequence))
    assert store.writes == []  # still lingering
    await asyncio.wait_for(events.close(), timeout=10)  # close cuts the linger short
    assert store.writes == [[1, 2, 3, 4]]


async def test_a_lingering_batch_is_written_once_the_linger_is_over() -> None:
    store = RecordingStore()
    events = writer(store, linger=0.01)
    events.add(event(1))
    events.add(event(2))
    await asyncio.wait_for(store.written.wait(), timeout=10)  # no close: the linger ends it
    assert store.writes == [[1, 2]]
    events.add(event(3))
    await events.close()
    assert store.writes == [[1, 2], [3]]
