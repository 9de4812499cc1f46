"""A worker process serves its agent's queue gauges on its metrics endpoint."""

from __future__ import annotations

from agentplex.tasks.store import TaskStore, fingerprint
from agentplex.v1 import task_pb2


async def test_a_worker_process_serves_its_queue_gauges(
    mesh, redis_client, worker_processes, eventually
) -> None:
    settings = mesh.settings
    # Tasks of another agent's queue, nobody works on: they wait.
    store = TaskStore(
        redis_client,
        key_prefix=settings.key_prefix,
        agent="researcher",
        queue_limit=100,
        record_ttl_seconds=60,
        event_retention_seconds=60,
    )
    await store.ensure_group()
    for task_id in ("q1", "q2"):
        spec = task_pb2.TaskSpec(task_id=task_id, prompt="waits")
        assert await store.submit(spec, fingerprint(spec))

    worker = await worker_processes.start(
        "researcher", AGENTPLEX_TASK_QUEUE_GAUGE_SECONDS="0.1", AGENTPLEX_WORKER_CONCURRENCY="1"
    )

    async def depth_seen() -> bool:
        return (
            await worker_processes.metric(worker, "agentplex_task_queue_depth", agent="researcher")
            >= 1
        )

    await eventually(depth_seen, timeout=15, message="the queue depth was never served")
    assert (
        await worker_processes.metric(worker, "agentplex_task_dead_letters", agent="researcher")
        == 0
    )
