"""Redis restarted under a running mesh: with AOF, accepted tasks still finish."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agentplex.mesh.redis_process import EmbeddedRedis
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc, task_pb2

pytestmark = pytest.mark.slow


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[list[EmbeddedRedis]]:
    """This module's own Redis (it gets restarted), keeping its data dir."""
    servers = [EmbeddedRedis(data_dir=tmp_path / "redis")]
    await servers[0].start()
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop()


@pytest.fixture
def redis_url(own_redis: list[EmbeddedRedis]) -> str:
    return own_redis[0].url


async def test_tasks_finish_across_a_redis_restart(
    own_redis, mesh, channel_to, worker_processes, gated_model, eventually, tmp_path
) -> None:
    stub = agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["assistant"]))
    ids = [f"r-{n}" for n in range(3)]
    for task_id in ids:
        await stub.SubmitTask(
            pb.SubmitTaskRequest(
                task=task_pb2.TaskSpec(
                    prompt=f"note {task_id}", task_id=task_id, session_id=f"s-{task_id}"
                )
            ),
            timeout=5,
        )
    await worker_processes.start()
    await eventually(lambda: gated_model.answer_calls >= 1, message="no task reached step 2")

    # Restart Redis mid-run, on the same port and data directory.
    old = own_redis[0]
    await old.stop()
    restarted = EmbeddedRedis(port=old.port, data_dir=tmp_path / "redis")
    own_redis.append(restarted)
    await restarted.start()
    gated_model.gate.set()

    async def all_done() -> bool:
        try:
            for task_id in ids:
                task = (await stub.GetTask(pb.GetTaskRequest(task_id=task_id), timeout=5)).task
                if task.status != task_pb2.TASK_STATUS_COMPLETED:
                    return False
        except grpc.aio.AioRpcError:  # the mesh reconnects to Redis at its own pace
            return False
        return True

    await eventually(all_done, timeout=60, message="tasks did not finish after the restart")
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(restarted.url)
    try:
        for task_id in ids:
            notes = await client.lrange(f"{mesh.settings.key_prefix}:notes:s-{task_id}", 0, -1)
            assert notes == [f"note {task_id}".encode()]
    finally:
        await client.aclose()
