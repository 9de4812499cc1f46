"""The agent's worker process (`python -m agentplex.agents.worker`) on SIGTERM:
health says NOT_SERVING before the worker drains its tasks."""

from __future__ import annotations

import asyncio
import json
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2

from agentplex.runtime.clients import health_status
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc, task_pb2

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_sigterm_turns_health_not_serving_before_the_drain(
    mesh, channel_to, worker_processes, gated_model, eventually
) -> None:
    stub = agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["assistant"]))
    await stub.SubmitTask(
        pb.SubmitTaskRequest(
            task=task_pb2.TaskSpec(prompt="note", task_id="term-1", session_id="s-term-1")
        ),
        timeout=5,
    )

    async def status() -> int:
        task = (await stub.GetTask(pb.GetTaskRequest(task_id="term-1"), timeout=5)).task
        return task.status

    # The drain delay keeps the listener up after NOT_SERVING; the grace keeps the
    # task (held at the gate) running through the drain until it is handed back.
    worker = await worker_processes.start(AGENTPLEX_DRAIN_SECONDS="2", AGENTPLEX_GRACE_SECONDS="3")
    await eventually(lambda: gated_model.answer_calls >= 1, message="task never reached step 2")
    ready = json.loads((worker_processes._tmp / "worker-0.ready").read_text())
    health = channel_to(ready["address"])
    assert await health_status(health, timeout=2) == SERVING

    worker.send_signal(signal.SIGTERM)
    heard: list[int] = []

    async def not_serving() -> bool:
        try:
            heard.append(await health_status(health, timeout=2))
        except grpc.aio.AioRpcError as exc:
            raise AssertionError(f"health stopped answering before NOT_SERVING: {exc}") from exc
        return heard[-1] == NOT_SERVING

    await eventually(not_serving, timeout=10, message="health never said NOT_SERVING")
    # Heard while the task is still running: the drain had not handed it back yet.
    assert await status() == task_pb2.TASK_STATUS_RUNNING
    assert await asyncio.to_thread(worker.wait, 20) == 0
    assert await status() == task_pb2.TASK_STATUS_PENDING  # handed back by the drain
