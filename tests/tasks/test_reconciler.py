"""The queue reconciles itself: tasks that lost their queue entry are queued
again (unless a live lease says a worker has them), the depth is recounted,
and one worker at a time does it.

The store-level tests drive `TaskStore` and `Reconciler` on real Redis in this
process; the slow ones trim the queue under real worker processes.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentplex.contract.events import is_final
from agentplex.tasks.reconciler import Reconciler
from agentplex.tasks.store import (
    PENDING,
    RUNNING,
    Requeued,
    StaleAttempt,
    Started,
    TaskStore,
    fingerprint,
)
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc, step_event_pb2, task_pb2

AGENT = "assistant"
COMPLETED = task_pb2.TASK_STATUS_COMPLETED
LEASE_MS = 60_000


def make_store(
    redis: aioredis.Redis, key_prefix: str, cls: type[TaskStore] = TaskStore
) -> TaskStore:
    return cls(
        redis,
        key_prefix=key_prefix,
        agent=AGENT,
        queue_limit=100,
        record_ttl_seconds=60,
        event_retention_seconds=60,
    )


@pytest.fixture
async def store(redis_client, key_prefix) -> TaskStore:
    tasks = make_store(redis_client, key_prefix)
    await tasks.ensure_group()
    return tasks


def queue_key(key_prefix: str) -> str:
    return f"{key_prefix}:queue:{AGENT}"


async def submit(store: TaskStore, task_id: str) -> None:
    spec = task_pb2.TaskSpec(task_id=task_id, prompt=f"prompt {task_id}")
    assert await store.submit(spec, fingerprint(spec))


async def trim(redis: aioredis.Redis, key_prefix: str) -> None:
    """What the issue measured: every entry of the queue stream gone."""
    await redis.xtrim(queue_key(key_prefix), maxlen=0, approximate=False)


async def depth(redis: aioredis.Redis, key_prefix: str) -> int:
    return int(await redis.get(f"{queue_key(key_prefix)}:depth") or 0)


async def claim_and_start(store: TaskStore, consumer: str, lease_ms: int) -> tuple[str, Started]:
    claimed = await store.claim_new(consumer, block_ms=100)
    assert claimed is not None
    started = await store.start(claimed.task_id, consumer, lease_ms, max_attempts=3)
    assert isinstance(started, Started)
    return claimed.task_id, started


def final_event(
    task_id: str, sequence: int
) -> tuple[task_pb2.TaskResult, step_event_pb2.StepEvent]:
    result = task_pb2.TaskResult(task_id=task_id, status=COMPLETED, output="done")
    event = step_event_pb2.StepEvent(
        task_id=task_id,
        sequence=sequence,
        final_result=step_event_pb2.TaskFinished(result=result),
    )
    return result, event


# -- the store's re-enqueue: the lease decides, fencing holds --


async def test_running_task_with_a_live_lease_is_not_requeued(
    store, redis_client, key_prefix
) -> None:
    await submit(store, "live-1")
    task_id, started = await claim_and_start(store, "w1", lease_ms=60_000)
    await trim(redis_client, key_prefix)

    assert await store.requeue_lost([task_id], LEASE_MS) == []
    assert (await store.get(task_id)).status == RUNNING
    assert await redis_client.xlen(queue_key(key_prefix)) == 0
    # Its worker carries on and finishes it, entry or no entry.
    await store.heartbeat(task_id, started.attempt, "w1", 60_000)
    result, event = final_event(task_id, started.last_sequence + 1)
    assert await store.finish(task_id, started.attempt, result, event)
    assert await depth(redis_client, key_prefix) == 0
    assert (await store.recount_depth()).after == 0


async def test_running_task_whose_lease_lapsed_is_requeued_and_its_old_attempt_fenced(
    store, redis_client, key_prefix
) -> None:
    await submit(store, "lapsed-1")
    task_id, first = await claim_and_start(store, "w1", lease_ms=60_000)
    await trim(redis_client, key_prefix)
    # The lease runs out, as when its worker died: renewed for no time at all.
    await store.heartbeat(task_id, first.attempt, "w1", 0)

    assert await store.requeue_lost([task_id], LEASE_MS) == [Requeued(task_id, RUNNING)]
    task = await store.get(task_id)
    assert (task.status, task.attempts) == (PENDING, 1)  # the lost attempt counts
    assert await store.requeue_lost([task_id], LEASE_MS) == []  # queued again: nothing left to do

    # The old attempt can no longer write, renew or finish.
    with pytest.raises(StaleAttempt):
        await store.heartbeat(task_id, first.attempt, "w1", 60_000)
    stale = step_event_pb2.StepEvent(task_id=task_id, sequence=first.last_sequence + 1)
    with pytest.raises(StaleAttempt):
        await store.append_events(task_id, first.attempt, [stale])

    # Another worker takes the new entry; one finish, the depth back to 0.
    again, second = await claim_and_start(store, "w2", lease_ms=60_000)
    assert (again, second.attempt) == (task_id, 2)
    result, event = final_event(task_id, second.last_sequence + 1)
    assert not await store.finish(task_id, first.attempt, result, event)
    assert await store.finish(task_id, second.attempt, result, event)
    assert await depth(redis_client, key_prefix) == 0
    assert await redis_client.xlen(queue_key(key_prefix)) == 0
    assert await store.claim_new("w3", block_ms=50) is None


async def claim_idle_ms(redis: aioredis.Redis, key_prefix: str, entry_id: bytes) -> int | None:
    """How long ago a worker claimed the entry; None if no worker holds it."""
    held = await redis.xpending_range(queue_key(key_prefix), "workers", entry_id, entry_id, 1)
    return int(held[0]["time_since_delivered"]) if held else None


async def test_a_pending_task_claimed_but_not_started_is_left_to_its_worker(
    store, redis_client, key_prefix
) -> None:
    """The race: a worker has read the entry (it is in the group's pending list) but
    not yet started the task, and the entry is trimmed. A copy on the queue would
    be started by a second worker while the first starts it too."""
    await submit(store, "claimed-1")
    claimed = await store.claim_new("w1", block_ms=100)
    assert claimed is not None and claimed.task_id == "claimed-1"
    await trim(redis_client, key_prefix)

    assert await store.requeue_lost(["claimed-1"], LEASE_MS) == []
    done = await Reconciler(store, "r1", interval_seconds=60, lease_seconds=60).run_once()
    assert done is not None and done.requeued == 0
    assert await redis_client.xlen(queue_key(key_prefix)) == 0
    assert await store.claim_new("w2", block_ms=50) is None  # nothing for a second worker

    # Its worker starts it and finishes it, from the claim it has.
    started = await store.start("claimed-1", "w1", LEASE_MS, max_attempts=3)
    assert isinstance(started, Started) and started.attempt == 1
    result, event = final_event("claimed-1", started.last_sequence + 1)
    assert await store.finish("claimed-1", started.attempt, result, event)
    assert await depth(redis_client, key_prefix) == 0


async def test_a_claim_older_than_the_lease_no_longer_holds_a_lost_entry(
    store, redis_client, key_prefix, eventually
) -> None:
    """A worker that claimed the entry and then died before the start: once the
    claim is older than the lease, the task is re-enqueued, once."""
    lease_ms = 300
    await submit(store, "abandoned-1")
    claimed = await store.claim_new("w1", block_ms=100)
    assert claimed is not None
    await trim(redis_client, key_prefix)
    assert await store.requeue_lost(["abandoned-1"], lease_ms) == []  # fresh: held

    async def older_than_the_lease() -> bool:
        idle = await claim_idle_ms(redis_client, key_prefix, claimed.entry_id)
        return idle is not None and idle >= lease_ms

    await eventually(older_than_the_lease, message="the claim never aged")
    assert await store.requeue_lost(["abandoned-1"], lease_ms) == [Requeued("abandoned-1", PENDING)]
    assert await store.requeue_lost(["abandoned-1"], lease_ms) == []  # queued again
    # The dead claim is dropped from the pending list; the copy runs as attempt 1.
    assert await claim_idle_ms(redis_client, key_prefix, claimed.entry_id) is None
    again, started = await claim_and_start(store, "w2", lease_ms=LEASE_MS)
    assert (again, started.attempt) == ("abandoned-1", 1)


async def test_the_scan_for_abandoned_entries_drops_a_lost_one(
    store, redis_client, key_prefix, eventually
) -> None:
    """An abandoned claim of a trimmed entry: the scan that would take it over
    drops it from the pending list instead (Redis 6.2 would claim it again and
    again, each time looking freshly held), and the reconciler re-enqueues it."""
    lease_ms = 200
    await submit(store, "swept-1")
    claimed = await store.claim_new("w1", block_ms=100)
    assert claimed is not None
    await trim(redis_client, key_prefix)

    async def older_than_the_lease() -> bool:
        idle = await claim_idle_ms(redis_client, key_prefix, claimed.entry_id)
        return idle is not None and idle >= lease_ms

    await eventually(older_than_the_lease, message="the claim never aged")
    sweep = await store.reclaim_abandoned("w2", lease_ms, None)
    assert sweep.claimed is None
    assert await claim_idle_ms(redis_client, key_prefix, claimed.entry_id) is None
    assert await store.requeue_lost(["swept-1"], LEASE_MS) == [Requeued("swept-1", PENDING)]
    again, _ = await claim_and_start(store, "w2", lease_ms=LEASE_MS)
    assert again == "swept-1"


async def test_concurrent_requeues_queue_each_lost_task_once(
    store, redis_client, key_prefix
) -> None:
    ids = [f"lost-{n}" for n in range(5)]
    for task_id in ids:
        await submit(store, task_id)
    await trim(redis_client, key_prefix)

    passes = await asyncio.gather(*(store.requeue_lost(ids, LEASE_MS) for _ in range(4)))
    requeued = sorted(task.task_id for found in passes for task in found)
    assert requeued == ids
    assert await redis_client.xlen(queue_key(key_prefix)) == len(ids)
    claimed = []
    while (entry := await store.claim_new("w1", block_ms=50)) is not None:
        claimed.append(entry.task_id)
    assert sorted(claimed) == ids


async def test_the_depth_is_recounted_from_the_unfinished_tasks(
    store, redis_client, key_prefix
) -> None:
    ids = [f"count-{n}" for n in range(3)]
    for task_id in ids:
        await submit(store, task_id)
    # A record deleted from under the queue, and a counter gone wrong.
    await redis_client.delete(f"{key_prefix}:task:{AGENT}:count-0")
    await redis_client.set(f"{queue_key(key_prefix)}:depth", 9)

    done = await Reconciler(store, "r1", interval_seconds=60).run_once()
    assert done is not None
    assert (done.depth_before, done.depth_after) == (9, 2)
    assert await depth(redis_client, key_prefix) == 2


async def test_a_task_queued_before_the_open_index_existed_is_indexed_and_counted(
    store, redis_client, key_prefix
) -> None:
    await submit(store, "old-1")
    await redis_client.delete(f"{queue_key(key_prefix)}:open")  # as submitted by an older release

    done = await Reconciler(store, "r1", interval_seconds=60).run_once()
    assert done is not None and done.requeued == 0 and done.depth_after == 1
    # Indexed now: should it lose its entry, the next pass finds it.
    await trim(redis_client, key_prefix)
    assert await store.requeue_lost(["old-1"], LEASE_MS) == [Requeued("old-1", PENDING)]


# -- one reconciler at a time --


class HeldStore(TaskStore):
    """A store whose re-enqueue waits for `release`: a pass held in the middle."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.inside = asyncio.Event()
        self.release = asyncio.Event()
        self.batches = 0

    async def requeue_lost(self, task_ids: Sequence[str], lease_ms: int) -> list[Requeued]:
        self.batches += 1
        self.inside.set()
        await self.release.wait()
        return await super().requeue_lost(task_ids, lease_ms)


async def test_two_reconcilers_racing_make_one_pass(store, redis_client, key_prefix) -> None:
    for n in range(3):
        await submit(store, f"race-{n}")
    await trim(redis_client, key_prefix)
    first = Reconciler(store, "w1", interval_seconds=60)
    second = Reconciler(store, "w2", interval_seconds=60)

    passes = await asyncio.gather(first.run_once(), second.run_once())
    made = [done for done in passes if done is not None]
    assert len(made) == 1 and made[0].requeued == 3
    # The turn is held for the interval: a pass right after is not made again.
    assert await second.run_once() is None
    assert await redis_client.xlen(queue_key(key_prefix)) == 3


async def test_no_pass_starts_while_another_is_in_progress(redis_client, key_prefix) -> None:
    held = make_store(redis_client, key_prefix, HeldStore)
    assert isinstance(held, HeldStore)
    await held.ensure_group()
    await submit(held, "mid-1")
    holder = asyncio.create_task(Reconciler(held, "w1", interval_seconds=60).run_once())
    await asyncio.wait_for(held.inside.wait(), timeout=10)

    other = make_store(redis_client, key_prefix)
    assert await Reconciler(other, "w2", interval_seconds=60).run_once() is None
    held.release.set()
    done = await asyncio.wait_for(holder, timeout=10)
    assert done is not None


async def test_a_pass_that_lost_its_turn_stops_and_a_crashed_holder_frees_it(
    redis_client, key_prefix, eventually
) -> None:
    held = make_store(redis_client, key_prefix, HeldStore)
    assert isinstance(held, HeldStore)
    await held.ensure_group()
    for n in range(2):
        await submit(held, f"turn-{n}")
    await trim(redis_client, key_prefix)
    # Small batches: the turn is checked again before each further batch and the recount.
    holder = asyncio.create_task(Reconciler(held, "w1", interval_seconds=0.3, batch=1).run_once())
    await asyncio.wait_for(held.inside.wait(), timeout=10)

    # The holder stalls past its turn; another worker takes the next one.
    other = Reconciler(make_store(redis_client, key_prefix), "w2", interval_seconds=60)
    passes: list[object] = []

    async def other_passed() -> bool:
        passes.append(await other.run_once())
        return passes[-1] is not None

    await eventually(other_passed, timeout=10, message="the turn never came free")
    held.release.set()
    assert await asyncio.wait_for(holder, timeout=10) is None  # it stopped, not overlapped
    assert held.batches == 1

    # A holder that dies mid-pass (cancelled here) leaves a turn that expires by itself.
    await redis_client.delete(f"{queue_key(key_prefix)}:reconciler")
    crashed = make_store(redis_client, key_prefix, HeldStore)
    assert isinstance(crashed, HeldStore)
    dying = asyncio.create_task(Reconciler(crashed, "w3", interval_seconds=0.3).run_once())
    await asyncio.wait_for(crashed.inside.wait(), timeout=10)
    dying.cancel()
    late = Reconciler(make_store(redis_client, key_prefix), "w4", interval_seconds=60)

    async def late_passed() -> bool:
        return await late.run_once() is not None

    await eventually(late_passed, timeout=10, message="a crashed holder's turn never expired")


# -- the scenario, under real worker processes --


@pytest.fixture
def assistant(mesh, channel_to):
    return agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents[AGENT]))


async def submit_rpc(stub, task_id: str) -> None:
    await stub.SubmitTask(
        pb.SubmitTaskRequest(
            task=task_pb2.TaskSpec(
                prompt=f"note for {task_id}", task_id=task_id, session_id=f"s-{task_id}"
            )
        ),
        timeout=5,
    )


async def get(stub, task_id: str) -> task_pb2.Task:
    return (await stub.GetTask(pb.GetTaskRequest(task_id=task_id), timeout=5)).task


async def events_of(stub, task_id: str) -> list[step_event_pb2.StepEvent]:
    call = stub.WatchTask(pb.WatchTaskRequest(task_id=task_id), timeout=60)
    return [response.event async for response in call]


async def three_running_three_queued(
    stub: agent_service_pb2_grpc.AgentServiceStub,
    gated_model: Any,
    worker_processes: Any,
    eventually: Any,
) -> tuple[subprocess.Popen[bytes], list[str], list[str]]:
    """Six tasks on a worker that runs three at once, held at the gate; returns
    the worker and the ids of those running and those waiting in the queue."""
    ids = [f"trim-{n}" for n in range(6)]
    for task_id in ids:
        await submit_rpc(stub, task_id)
    worker = await worker_processes.start(
        AGENTPLEX_WORKER_CONCURRENCY="3", AGENTPLEX_TASK_RECONCILE_SECONDS="0.2"
    )
    await eventually(lambda: gated_model.answer_calls >= 3, message="three tasks never ran")
    tasks = {task_id: await get(stub, task_id) for task_id in ids}
    running = [t for t, task in tasks.items() if task.status == task_pb2.TASK_STATUS_RUNNING]
    queued = [t for t, task in tasks.items() if task.status == task_pb2.TASK_STATUS_PENDING]
    assert len(running) == 3 and len(queued) == 3
    return worker, running, queued


async def all_completed_once(stub, ids, redis_client, mesh, eventually) -> dict[str, task_pb2.Task]:
    async def done() -> bool:
        return all([(await get(stub, task_id)).status == COMPLETED for task_id in ids])

    await eventually(done, timeout=60, message="not every task completed")
    tasks = {task_id: await get(stub, task_id) for task_id in ids}
    prefix = mesh.settings.key_prefix
    for task_id in ids:
        events = await events_of(stub, task_id)
        assert [is_final(event) for event in events].count(True) == 1
        assert is_final(events[-1]) and events[-1].final_result.result.output == "saved"
        notes = await redis_client.lrange(f"{prefix}:notes:s-{task_id}", 0, -1)
        assert notes == [f"note for {task_id}".encode()]  # one side effect per task

    async def drained() -> bool:
        return await depth(redis_client, prefix) == 0

    await eventually(drained, message="the queue depth did not return to 0")
    assert await redis_client.xlen(queue_key(prefix)) == 0
    return tasks


@pytest.mark.slow
async def test_trimmed_queue_under_a_live_worker_completes_every_task_once(
    assistant, worker_processes, gated_model, mesh, redis_client, eventually
) -> None:
    worker, running, queued = await three_running_three_queued(
        assistant, gated_model, worker_processes, eventually
    )
    await trim(redis_client, mesh.settings.key_prefix)

    async def requeued() -> bool:
        return (
            await worker_processes.metric(
                worker, "agentplex_worker_tasks_reconciled_total", status="pending"
            )
            == 3
        )

    await eventually(requeued, message="the queued tasks were not re-enqueued")
    # The running ones have a live lease: left to their worker, not run again.
    assert await redis_client.xlen(queue_key(mesh.settings.key_prefix)) == 3
    assert (
        await worker_processes.metric(
            worker, "agentplex_worker_tasks_reconciled_total", status="running"
        )
        == 0
    )
    assert "task re-enqueued" in worker_processes.log(worker)
    gated_model.gate.set()

    tasks = await all_completed_once(assistant, running + queued, redis_client, mesh, eventually)
    assert all(task.attempts == 1 for task in tasks.values())
    assert gated_model.tool_calls == 6 and gated_model.answer_calls == 6  # each ran once


@pytest.mark.slow
async def test_trimmed_queue_whose_worker_died_completes_every_task_once(
    assistant, worker_processes, gated_model, mesh, redis_client, eventually
) -> None:
    worker, running, queued = await three_running_three_queued(
        assistant, gated_model, worker_processes, eventually
    )
    await trim(redis_client, mesh.settings.key_prefix)
    worker.send_signal(signal.SIGKILL)
    # Polled: a blocking wait would stall the loop the in-process mesh runs on.
    await eventually(lambda: worker.poll() is not None, message="the worker did not die")
    # Without a reconciler these stay RUNNING and PENDING for ever, counted in the depth.
    await worker_processes.start(AGENTPLEX_TASK_RECONCILE_SECONDS="0.2")
    gated_model.gate.set()

    tasks = await all_completed_once(assistant, running + queued, redis_client, mesh, eventually)
    assert [tasks[task_id].attempts for task_id in running] == [2, 2, 2]
    assert [tasks[task_id].attempts for task_id in queued] == [1, 1, 1]
