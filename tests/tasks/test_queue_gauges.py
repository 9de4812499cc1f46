"""Queue gauges: depth, the oldest unclaimed task's wait and dead letters, read from
real Redis by `TaskStore.queue_gauges` and kept fresh by `QueueGauges`."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from agentplex.tasks.metrics import QueueGauges
from agentplex.tasks.store import TaskStore, fingerprint
from agentplex.v1 import step_event_pb2, task_pb2

AGENT = "gauged"
FAILED = task_pb2.TASK_STATUS_FAILED


@pytest.fixture
async def store(redis_client, key_prefix) -> TaskStore:
    tasks = TaskStore(
        redis_client,
        key_prefix=key_prefix,
        agent=AGENT,
        queue_limit=100,
        record_ttl_seconds=60,
        event_retention_seconds=60,
    )
    await tasks.ensure_group()
    return tasks


async def submit(store: TaskStore, task_id: str) -> None:
    spec = task_pb2.TaskSpec(task_id=task_id, prompt=f"prompt {task_id}")
    assert await store.submit(spec, fingerprint(spec))


async def dead_letter(store: TaskStore, task_id: str) -> None:
    result = task_pb2.TaskResult(task_id=task_id, status=FAILED, error="kept crashing")
    event = step_event_pb2.StepEvent(
        task_id=task_id,
        agent=AGENT,
        sequence=await store.last_sequence(task_id) + 1,
        error=step_event_pb2.TaskFailed(code="ABORTED", message="kept crashing", result=result),
    )
    assert await store.finish(task_id, None, result, event, dead_letter_reason="kept crashing")


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"agent": AGENT})


async def test_an_empty_queue_reads_zero(store: TaskStore) -> None:
    gauges = await store.queue_gauges()
    assert (gauges.depth, gauges.dead_letters, gauges.oldest_pending_seconds) == (0, 0, 0)


async def test_depth_wait_and_dead_letters(store: TaskStore) -> None:
    for task_id in ("t1", "t2", "t3"):
        await submit(store, task_id)
    await asyncio.sleep(0.05)  # the oldest entry's id is its enqueue time
    gauges = await store.queue_gauges()
    assert gauges.depth == 3
    assert gauges.dead_letters == 0
    assert 0.04 <= gauges.oldest_pending_seconds < 5

    # A claimed task no longer waits: the wait is the oldest unclaimed one's.
    claimed = await store.claim_new("w1", block_ms=10)
    assert claimed is not None and claimed.task_id == "t1"
    await dead_letter(store, "t2")
    gauges = await store.queue_gauges()
    assert gauges.depth == 2  # t1 runs, t3 waits
    assert gauges.dead_letters == 1
    assert 0 < gauges.oldest_pending_seconds < 5

    assert await store.claim_new("w1", block_ms=10) is not None  # t3
    gauges = await store.queue_gauges()
    assert (gauges.depth, gauges.oldest_pending_seconds) == (2, 0)


async def test_the_refresher_sets_the_gauges_and_stops(store: TaskStore) -> None:
    await submit(store, "a")
    await dead_letter(store, "a")
    await submit(store, "b")
    refresher = QueueGauges(store, interval_seconds=0.05)
    stop = asyncio.Event()
    running = asyncio.create_task(refresher.run(stop))
    try:
        for _ in range(100):
            if gauge("agentplex_task_dead_letters") == 1:
                break
            await asyncio.sleep(0.02)
        assert gauge("agentplex_task_queue_depth") == 1
        assert gauge("agentplex_task_dead_letters") == 1
        assert (gauge("agentplex_task_queue_oldest_pending_seconds") or 0) >= 0
        await submit(store, "c")
        for _ in range(100):
            if gauge("agentplex_task_queue_depth") == 2:
                break
            await asyncio.sleep(0.02)
        assert gauge("agentplex_task_queue_depth") == 2
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=2)
