"""CancelWatch: a running attempt's one cancel signal, and the flag's only reader."""

from __future__ import annotations

import asyncio

from agentplex.tasks.worker import CancelWatch


class FlagStore:
    """Stands in for TaskStore.cancel_flag: a flag, and how often it was read."""

    def __init__(self, flag: bool = False) -> None:
        self.flag = flag
        self.reads = 0

    async def cancel_flag(self, task_id: str) -> bool:
        self.reads += 1
        return self.flag


def watch(store: FlagStore, *, at_start: bool = False, poll: float = 0.01) -> CancelWatch:
    return CancelWatch(
        store,
        "t",
        requested_at_start=at_start,
        poll_seconds=poll,
    )


async def test_a_cancel_recorded_before_the_start_interrupts_without_a_read() -> None:
    store = FlagStore()
    cancel = watch(store, at_start=True)
    assert cancel.interrupt.is_set()
    assert await cancel.requested()
    await asyncio.wait_for(cancel.poll(), timeout=1)  # returns at once: nothing to watch
    assert store.reads == 0


async def test_the_runner_asking_at_a_step_boundary_sets_the_interrupt() -> None:
    store = FlagStore()
    cancel = watch(store)
    assert not await cancel.requested()
    store.flag = True
    assert await cancel.requested()
    assert cancel.interrupt.is_set()
    assert await cancel.requested()  # once seen, not read again
    assert store.reads == 2


async def test_the_poll_interrupts_a_step_in_flight_and_stops_reading() -> None:
    store = FlagStore()
    cancel = watch(store)
    polling = asyncio.create_task(cancel.poll())
    await asyncio.sleep(0.05)
    assert not cancel.interrupt.is_set() and store.reads >= 1
    store.flag = True
    await asyncio.wait_for(cancel.interrupt.wait(), timeout=1)
    await asyncio.wait_for(polling, timeout=1)  # done: the flag is read no more
    reads = store.reads
    assert await cancel.requested()
    assert store.reads == reads
