"""The tenant token quota over real gRPC: the tenant comes from the call's principal
headers, and the refusal reaches the caller as RESOURCE_EXHAUSTED with its reset
time in the status (RunTask) and in the task's failure event (StreamSteps)."""

from __future__ import annotations

import time

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from agentplex.agents.quota import Window
from agentplex.runtime import errors
from agentplex.runtime import principal as principals
from agentplex.runtime.settings import Settings
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc, task_pb2

PERIOD = 24 * 3600


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The mesh of this module: every tenant may spend one token a day, so a tenant's
    first task runs (nothing used yet) and its next is refused."""
    return settings.model_copy(
        update={"tenant_token_quota": 1, "tenant_token_quota_period_seconds": PERIOD}
    )


def acting_for(tenant: str) -> tuple[tuple[str, str], ...]:
    """Headers of a call made for `tenant` by a service of the mesh (no mTLS here, so
    the delegated principal is taken as stated)."""
    return (
        (principals.TENANT_HEADER, tenant),
        (principals.PRINCIPAL_HEADER, principals.DELEGATED),
    )


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            info = error_details_pb2.ErrorInfo()
            assert status_pb2.Status.FromString(value).details[0].Unpack(info)
            return info
    raise AssertionError("no rich status")


async def test_the_quota_refuses_a_tenant_over_grpc_and_spares_the_others(mesh, channel_to) -> None:
    assistant = agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["assistant"]))
    acme = acting_for("acme")
    started = time.time()
    first = await assistant.RunTask(pb.RunTaskRequest(prompt="hello"), metadata=acme, timeout=10)
    assert first.result.status == task_pb2.TASK_STATUS_COMPLETED
    assert first.result.tokens_used > 0

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await assistant.RunTask(pb.RunTaskRequest(prompt="again"), metadata=acme, timeout=10)
    err = refused.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    resets_at = Window.at(started, PERIOD).resets_at()
    assert f"resets at {resets_at}" in (err.details() or "")
    info = error_info(err)
    assert info.reason == "QUOTA_EXHAUSTED"
    assert info.metadata["tenant"] == "acme"
    assert info.metadata["resets_at"] == resets_at
    assert int(info.metadata["retry_after_seconds"]) > 0
    # A client of the mesh reads the same facts back.
    mapped = errors.from_rpc_error(err)
    assert isinstance(mapped, errors.ResourceExhausted)
    assert mapped.metadata["resets_at"] == resets_at

    # Streamed: the failure event says it, then the stream ends with the same status.
    call = assistant.StreamSteps(pb.StreamStepsRequest(prompt="once more"), metadata=acme)
    events = []
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for response in call:
            events.append(response.event)
    assert streamed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(streamed.value).metadata["resets_at"] == resets_at
    final = events[-1]
    assert final.WhichOneof("kind") == "error"
    assert final.error.code == "RESOURCE_EXHAUSTED"
    assert resets_at in final.error.message

    # Another tenant, and the mesh itself, still run.
    other = await assistant.RunTask(
        pb.RunTaskRequest(prompt="hello"), metadata=acting_for("globex"), timeout=10
    )
    assert other.result.status == task_pb2.TASK_STATUS_COMPLETED
    for _ in range(2):
        mesh_task = await assistant.RunTask(pb.RunTaskRequest(prompt="hello"), timeout=10)
        assert mesh_task.result.status == task_pb2.TASK_STATUS_COMPLETED


async def test_a_queued_task_over_the_quota_is_recorded_failed_with_its_usage(
    mesh, channel_to, start_worker, eventually
) -> None:
    assistant = agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["assistant"]))
    await start_worker("assistant")
    acme = acting_for("acme")

    async def ended(task_id: str) -> task_pb2.Task:
        async def done() -> bool:
            response = await assistant.GetTask(
                pb.GetTaskRequest(task_id=task_id), metadata=acme, timeout=5
            )
            return response.task.status in (
                task_pb2.TASK_STATUS_COMPLETED,
                task_pb2.TASK_STATUS_FAILED,
            )

        await eventually(done, message=f"{task_id} did not end")
        response = await assistant.GetTask(
            pb.GetTaskRequest(task_id=task_id), metadata=acme, timeout=5
        )
        return response.task

    async def submit(task_id: str) -> task_pb2.Task:
        await assistant.SubmitTask(
            pb.SubmitTaskRequest(task=task_pb2.TaskSpec(prompt="what is 6*7", task_id=task_id)),
            metadata=acme,
            timeout=5,
        )
        return await ended(task_id)

    # One token a day: the first model call runs (nothing used yet), and the next one,
    # after the calculator's answer, is refused. The record keeps what the task used.
    first = await submit("q-1")
    assert first.status == task_pb2.TASK_STATUS_FAILED
    assert first.attempts == 1  # a quota is no outage: not retried
    assert first.result.error.startswith("tenant 'acme' has used ")
    assert "resets at" in first.result.error
    assert (first.result.steps_used, first.result.tool_calls) == (2, 1)
    assert first.result.tokens_used > 0
    # The next task is refused before its first step (before loading its context too).
    second = await submit("q-2")
    assert second.status == task_pb2.TASK_STATUS_FAILED
    assert (second.result.steps_used, second.result.tokens_used) == (0, 0)
