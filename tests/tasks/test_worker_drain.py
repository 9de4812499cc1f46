"""A draining worker hands back every task it holds, even when one hand-back fails."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import ConnectionError as RedisConnectionError

from agentplex.contract.task_request import TaskRequest
from agentplex.runtime.clients import Deadline
from agentplex.tasks.store import PENDING, RUNNING, TaskStore, fingerprint
from agentplex.tasks.worker import EventSink, RunOutcome, Worker
from agentplex.v1 import task_pb2


class HeldRunner:
    """Runs every task until cancelled: what the drain finds still running."""

    async def run(
        self,
        task: TaskRequest,
        deadline: Deadline,
        sink: EventSink,
        *,
        last_sequence: int = 0,
        interrupt: asyncio.Event | None = None,
        cancel_requested: Callable[[], Awaitable[bool]] | None = None,
    ) -> RunOutcome:
        await asyncio.Event().wait()
        raise AssertionError("a held task never ends by itself")


class FirstHandBackFails(TaskStore):
    """Redis fails the first hand-back only (whichever task the drain tries first)."""

    hand_backs: list[str]

    async def hand_back(self, task_id: str, attempt: int, consumer: str, lease_ms: int) -> bool:
        self.hand_backs.append(task_id)
        if len(self.hand_backs) == 1:
            raise RedisConnectionError("connection reset by peer")
        return await super().hand_back(task_id, attempt, consumer, lease_ms)


async def test_one_failing_hand_back_does_not_stop_the_others(
    redis_client, key_prefix, eventually, caplog
) -> None:
    store = FirstHandBackFails(
        redis_client,
        key_prefix=key_prefix,
        agent="assistant",
        queue_limit=10,
        record_ttl_seconds=60,
        event_retention_seconds=60,
    )
    store.hand_backs = []
    ids = [f"held-{n}" for n in range(3)]
    for task_id in ids:
        spec = task_pb2.TaskSpec(task_id=task_id, prompt=f"prompt {task_id}")
        assert await store.submit(spec, fingerprint(spec))
    worker = Worker(
        store=store,
        runner=HeldRunner(),
        consumer="drainer",
        concurrency=3,
        grace_seconds=0.05,
        lease_seconds=30,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))

    async def all_running() -> bool:
        return all([(await store.get(task_id)).status == RUNNING for task_id in ids])

    await eventually(all_running, message="the worker never ran all three")
    stop.set()
    with caplog.at_level(logging.WARNING, logger="agentplex.tasks.worker"):
        await asyncio.wait_for(running, timeout=15)

    assert sorted(store.hand_backs) == ids  # every held task was tried
    failed = store.hand_backs[0]
    statuses = {task_id: (await store.get(task_id)).status for task_id in ids}
    assert statuses == {task_id: RUNNING if task_id == failed else PENDING for task_id in ids}
    [line] = [r for r in caplog.records if r.getMessage().startswith("cannot hand the task back")]
    assert getattr(line, "task_id", None) == failed
    await worker.stopped()  # drained: nothing left running
