"""Workers as real processes, killed, stopped and drained mid-task.

The gated model holds each task between its side effect (a note written
through the registry) and its end, so the failure lands exactly there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import grpc
import pytest

from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc, step_event_pb2, task_pb2

pytestmark = pytest.mark.slow

COMPLETED = task_pb2.TASK_STATUS_COMPLETED
FAILED = task_pb2.TASK_STATUS_FAILED


@pytest.fixture
def assistant(mesh, channel_to):
    return agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["assistant"]))


async def submit(stub, task_id: str) -> None:
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


async def wait_status(stub, task_id, status, eventually, timeout=30.0) -> task_pb2.Task:
    async def reached() -> bool:
        return (await get(stub, task_id)).status == status

    await eventually(reached, timeout=timeout, message=f"{task_id} never reached {status}")
    return await get(stub, task_id)


async def notes(redis_client, mesh, task_id: str) -> list[bytes]:
    return await redis_client.lrange(f"{mesh.settings.key_prefix}:notes:s-{task_id}", 0, -1)


async def watch_all(stub, task_id: str, after: int = 0) -> list[step_event_pb2.StepEvent]:
    call = stub.WatchTask(pb.WatchTaskRequest(task_id=task_id, after_sequence=after), timeout=60)
    return [r.event async for r in call]


async def test_sigkill_mid_task_completes_once_with_one_side_effect(
    assistant, worker_processes, gated_model, mesh, redis_client, eventually
) -> None:
    await submit(assistant, "kill-1")
    first = await worker_processes.start()
    await eventually(lambda: gated_model.answer_calls >= 1, message="task never reached step 2")
    assert await notes(redis_client, mesh, "kill-1") == [b"note for kill-1"]

    # A watcher reads what happened so far, then disconnects.
    seen: list[step_event_pb2.StepEvent] = []
    call = assistant.WatchTask(pb.WatchTaskRequest(task_id="kill-1"), timeout=60)
    async for response in call:
        seen.append(response.event)
        if response.event.HasField("tool_result"):
            break
    call.cancel()

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    await worker_processes.start()
    gated_model.gate.set()
    task = await wait_status(assistant, "kill-1", COMPLETED, eventually)

    assert task.attempts == 2 and task.result.output == "saved"
    assert await notes(redis_client, mesh, "kill-1") == [b"note for kill-1"]
    rest = await watch_all(assistant, "kill-1", after=seen[-1].sequence)
    everything = await watch_all(assistant, "kill-1")
    assert seen + rest == everything
    assert [e.sequence for e in everything] == list(range(1, len(everything) + 1))
    results = [e.tool_result.result_json for e in everything if e.HasField("tool_result")]
    assert len(results) == 2 and results[0] == results[1]  # the retry replayed the stored result


async def test_stalled_worker_is_superseded_and_its_late_result_refused(
    assistant, worker_processes, gated_model, mesh, redis_client, eventually
) -> None:
    await submit(assistant, "stall-1")
    stalled = await worker_processes.start()
    await eventually(lambda: gated_model.answer_calls >= 1, message="task never reached step 2")
    os.kill(stalled.pid, signal.SIGSTOP)
    try:
        await worker_processes.start()
        await eventually(
            lambda: gated_model.answer_calls >= 2,
            timeout=20,
            message="the task was not reclaimed from the stalled worker",
        )
        gated_model.gate.set()
        task = await wait_status(assistant, "stall-1", COMPLETED, eventually)
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
    assert task.attempts == 2

    async def refused() -> bool:
        return (
            await worker_processes.metric(
                stalled, "agentplex_worker_task_outcomes_total", outcome="stale"
            )
            == 1
        )

    await eventually(refused, timeout=20, message="the stale attempt was not refused")
    after = await get(assistant, "stall-1")
    assert (after.status, after.attempts, after.last_sequence) == (COMPLETED, 2, task.last_sequence)
    assert await notes(redis_client, mesh, "stall-1") == [b"note for stall-1"]


async def test_task_that_keeps_killing_workers_is_dead_lettered(
    assistant, worker_processes, gated_model, mesh, redis_client, eventually
) -> None:
    await submit(assistant, "poison-1")
    for attempt in range(1, 4):
        worker = await worker_processes.start()
        await eventually(
            lambda n=attempt: gated_model.answer_calls >= n,
            timeout=20,
            message=f"attempt {attempt} never started",
        )
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
    await worker_processes.start()
    task = await wait_status(assistant, "poison-1", FAILED, eventually)
    assert "dead-letter" in task.result.error
    assert task.attempts == 3 and gated_model.answer_calls == 3  # no fourth run, no hot loop
    prefix = mesh.settings.key_prefix
    assert await redis_client.xlen(f"{prefix}:queue:assistant:dead") == 1
    assert int(await redis_client.get(f"{prefix}:queue:assistant:depth")) == 0
    assert await notes(redis_client, mesh, "poison-1") == [b"note for poison-1"]
    events = await watch_all(assistant, "poison-1")
    assert events[-1].error.code == "ABORTED"


async def test_sigterm_drains_and_hands_the_task_back(
    assistant, worker_processes, gated_model, mesh, redis_client, eventually
) -> None:
    await submit(assistant, "drain-1")
    draining = await worker_processes.start()
    await eventually(lambda: gated_model.answer_calls >= 1, message="task never reached step 2")
    draining.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(draining.wait, 20) == 0
    assert (await get(assistant, "drain-1")).status == task_pb2.TASK_STATUS_PENDING
    gated_model.gate.set()
    await worker_processes.start()
    task = await wait_status(assistant, "drain-1", COMPLETED, eventually)
    assert task.attempts == 2
    assert await notes(redis_client, mesh, "drain-1") == [b"note for drain-1"]


async def test_worker_health_and_metrics(worker_processes, eventually) -> None:
    worker = await worker_processes.start()
    ready = worker_processes._tmp / "worker-0.ready"
    import json

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = json.loads(ready.read_text())["address"]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def serving() -> bool:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)  # type: ignore[attr-defined]  # types-grpcio-health-checking's HealthStub declares no methods
            return response.status == health_pb2.HealthCheckResponse.SERVING

        await eventually(serving, message="worker never became healthy")
    with contextlib.suppress(ProcessLookupError):
        worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 20) == 0
