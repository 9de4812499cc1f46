"""The dev overlay's manifests, run as a mesh over namespace hosts (see conftest.py).

One test, in three acts on the same cluster, because starting it is the cost:
a task through the gateway (JSON, and gRPC streaming); a whole host killed
while it holds durable tasks, which finish on another host's worker; a worker
cut off from the network until its lease lapses, whose task another worker
finishes and whose late writes are refused. Every accepted task completes
once, and every side effect (a note, written through the registry's
idempotency ledger) happens once.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import httpx
import pytest
import redis.asyncio as aioredis

from agentplex.clients.agent import AgentClient
from agentplex.v1 import task_pb2

pytestmark = pytest.mark.slow

QUEUE = "agentplex:queue:assistant"
GROUP = "workers"
LEASE_SECONDS = 3
# Each model call takes this long, so a task is still running when its host dies.
MODEL_DELAY_SECONDS = 1.0
TASKS_WHEN_A_HOST_DIES = 4


async def holders(redis: aioredis.Redis) -> dict[str, int]:
    """Which worker pods hold assistant tasks now: {pod name: tasks} (consumer names are
    agent-hostname-pid, and each pod's hostname is its name)."""
    pending = await redis.xpending_range(QUEUE, GROUP, min="-", max="+", count=100)
    held: dict[str, int] = {}
    for entry in pending:
        consumer = entry["consumer"]
        consumer = consumer.decode() if isinstance(consumer, bytes) else str(consumer)
        pod = consumer.removeprefix("assistant-").rsplit("-", 1)[0]
        held[pod] = held.get(pod, 0) + 1
    return held


async def finished(client: AgentClient, task_ids: list[str]) -> dict[str, task_pb2.Task]:
    return {task_id: await client.get(task_id) for task_id in task_ids}


async def test_the_manifests_run_as_a_mesh_over_hosts_that_die_and_split(
    overlay, cluster_of, eventually
) -> None:
    # Every check asks the mesh across hosts: ten times a second is often enough.
    poll = functools.partial(eventually, interval=0.1)
    objects = overlay(
        "dev",
        {
            # Two workers for the assistant, so one can die; short leases and a slow model,
            # so the test sees tasks change hands in seconds.
            "replicas": [{"name": "worker-assistant", "count": 2}],
            "patches": [
                {
                    "target": {"kind": "ConfigMap", "name": "agentplex-config"},
                    "patch": (
                        "- {op: add, path: /data/AGENTPLEX_TASK_LEASE_SECONDS, "
                        f'value: "{LEASE_SECONDS}"}}\n'
                        "- {op: add, path: /data/AGENTPLEX_SCRIPTED_DELAY_SECONDS, "
                        f'value: "{MODEL_DELAY_SECONDS}"}}\n'
                    ),
                }
            ],
        },
    )
    cluster = await cluster_of(objects)
    hosts = {pod.netns for pod in cluster.pods}
    assert len(hosts) >= 3 and len(hosts) == len(cluster.pods)
    gateway = cluster.address("gateway", 8080)
    redis = aioredis.Redis.from_url(f"redis://{cluster.address('redis', 6379)}/0")
    client = AgentClient(gateway, agent="assistant")
    try:
        # -- act 1: through the gateway, JSON and gRPC streaming, across hosts ---------
        async with httpx.AsyncClient(timeout=60) as http:
            answer = await http.post(
                f"http://{gateway}/v1/agents/assistant/tasks:run",
                json={"prompt": "what is 17*23?"},
            )
        assert answer.status_code == 200, answer.text
        assert "391" in answer.json()["result"]["output"]
        kinds = [event.WhichOneof("kind") async for event in client.stream("what is 2+3?")]
        assert kinds[-1] == "final_result" and "tool_result" in kinds

        # -- act 2: a host dies holding durable tasks ----------------------------------
        ids = [f"host-dies-{n}" for n in range(TASKS_WHEN_A_HOST_DIES)]
        for task_id in ids:
            await client.submit(
                f"remember that {task_id} ran", task_id=task_id, session_id=f"s-{task_id}"
            )

        async def someone_holds_tasks() -> bool:
            return bool(await holders(redis))

        await poll(someone_holds_tasks, timeout=20, message="no worker claimed a task")
        held = await holders(redis)
        busiest = max(held, key=lambda pod: held[pod])
        victim = next(p for p in cluster.pod("worker-assistant") if p.name == busiest)
        cluster.kill_host(victim)
        replacement = await cluster.reschedule(victim)

        async def all_done() -> bool:
            tasks = await finished(client, ids)
            return all(t.status == task_pb2.TASK_STATUS_COMPLETED for t in tasks.values())

        await poll(all_done, timeout=90, message="the dead host's tasks did not finish elsewhere")
        tasks = await finished(client, ids)
        assert sum(t.attempts > 1 for t in tasks.values()) >= held[victim.name], (
            "the tasks the dead host held were not taken over"
        )
        for task_id in ids:
            assert await redis.llen(f"agentplex:notes:s-{task_id}") == 1, task_id

        # -- act 3: a worker cut off from Redis (and everything) until its lease lapses --
        await cut_off_then_taken_over(cluster, client, redis, "partitioned", stall=False, poll=poll)
        # -- act 4: a worker frozen past its lease (a stalled VM) wakes and writes late ----
        await cut_off_then_taken_over(cluster, client, redis, "stalled", stall=True, poll=poll)
        assert replacement.alive and victim not in cluster.pod("worker-assistant")
    finally:
        await client.close()
        await redis.aclose()


async def cut_off_then_taken_over(
    cluster,
    client: AgentClient,
    redis: aioredis.Redis,
    task_id: str,
    *,
    stall: bool,
    poll: Callable[..., Awaitable[None]],
) -> None:
    """The worker running `task_id` loses its network (or, with `stall`, is frozen
    instead) until another worker has finished the task; then it comes back.

    Cut off but running, it notices Redis is gone within its lease and gives the task
    up. Frozen, it cannot notice: it wakes with a lease long lost, carries on, and
    its writes are refused (the attempt is superseded). Either way the task completes
    once, its note is written once, its events have no gap or repeat."""
    await client.submit(f"remember that {task_id} ran", task_id=task_id, session_id=f"s-{task_id}")

    async def claimed() -> bool:
        return bool(await holders(redis))

    await poll(claimed, timeout=20, message=f"no worker claimed {task_id}")
    holder = next(iter(await holders(redis)))

    async def running() -> bool:
        # Started (its attempt holds the lease) and into its first step, not just claimed.
        task = await client.get(task_id)
        return task.status == task_pb2.TASK_STATUS_RUNNING and task.last_sequence >= 2

    await poll(running, timeout=20, message=f"{task_id} never started")
    pod = next(p for p in cluster.pod("worker-assistant") if p.name == holder)
    if stall:
        cluster.freeze(pod)
    else:
        cluster.partition(pod)
    try:

        async def done() -> bool:
            return (await client.get(task_id)).status == task_pb2.TASK_STATUS_COMPLETED

        await poll(done, timeout=60, message=f"no other worker finished {task_id}")
        finished = await client.get(task_id)
        assert finished.attempts >= 2
    finally:
        if stall:
            cluster.thaw(pod)
        else:
            cluster.heal(pod)
    noticed = "attempt superseded" if stall else "task interrupted by a Redis failure"

    async def said_so() -> bool:
        return noticed in pod.log()

    try:
        await poll(said_so, timeout=60, message=f"{pod.name} never logged {noticed!r}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{pod.log()[-4000:]}") from None
    # Whatever it did late changed nothing: same outcome, one side effect, no event twice.
    after = await client.get(task_id)
    assert after.status == task_pb2.TASK_STATUS_COMPLETED
    assert after.result.output == finished.result.output
    assert await redis.llen(f"agentplex:notes:s-{task_id}") == 1
    sequences = [event.sequence async for event in client.watch(task_id)]
    assert sequences == list(range(1, len(sequences) + 1))
