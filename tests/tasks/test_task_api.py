"""SubmitTask / GetTask / CancelTask / WatchTask over real gRPC, with in-process workers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from agentplex.agents.catalog import ASSISTANT
from agentplex.agents.llm.base import CompletionRequest, LLMEvent
from agentplex.agents.llm.scripted import ScriptedLLM
from agentplex.agents.worker import build_worker
from agentplex.runtime.errors import from_rpc_error
from agentplex.runtime.server import ServiceHost
from agentplex.tasks.event_feed import READER_NAME
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc, step_event_pb2, task_pb2

COMPLETED = task_pb2.TASK_STATUS_COMPLETED
CANCELLED = task_pb2.TASK_STATUS_CANCELLED


@pytest.fixture
def assistant(mesh, channel_to):
    return agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["assistant"]))


@pytest.fixture
async def start_worker(mesh):
    """Start in-process workers for the assistant; all are stopped after the test."""
    running: list[tuple[asyncio.Event, asyncio.Task[None], ServiceHost]] = []

    async def start(llm=None, **overrides):
        settings = mesh.settings.model_copy(update=overrides)
        worker, host = build_worker(
            ASSISTANT, settings, metrics_port=None, llm=llm, consumer=f"w{len(running)}"
        )
        await host.start()
        stop = asyncio.Event()
        job = asyncio.create_task(worker.run(stop))
        running.append((stop, job, host))
        return worker

    yield start
    for stop, job, host in running:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(job, timeout=15)
        await host.stop()


async def wait_status(stub, task_id: str, statuses, eventually) -> task_pb2.Task:
    found: list[task_pb2.Task] = []

    async def reached() -> bool:
        task = (await stub.GetTask(pb.GetTaskRequest(task_id=task_id), timeout=5)).task
        found[:] = [task]
        return task.status in statuses

    await eventually(reached, timeout=20, message=f"task {task_id} never reached {statuses}")
    return found[0]


async def watch(
    stub, task_id: str, after: int = 0, final_only: bool = False
) -> list[step_event_pb2.StepEvent]:
    call = stub.WatchTask(
        pb.WatchTaskRequest(task_id=task_id, after_sequence=after, final_only=final_only),
        timeout=30,
    )
    return [response.event async for response in call]


async def test_submit_then_watch_until_done(assistant, start_worker, eventually) -> None:
    submitted = await assistant.SubmitTask(
        pb.SubmitTaskRequest(task=task_pb2.TaskSpec(prompt="what is 17*23?")), timeout=5
    )
    assert submitted.created and submitted.task.status == task_pb2.TASK_STATUS_PENDING
    task_id = submitted.task.task_id
    await start_worker()
    events = await watch(assistant, task_id)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].final_result.result.output == "17*23 = 391."
    task = await wait_status(assistant, task_id, [COMPLETED], eventually)
    assert task.attempts == 1 and task.result.output == "17*23 = 391."
    assert task.last_sequence == len(events)
    assert task.finished_at.seconds > 0
    # Watching a finished task replays its events and ends.
    assert await watch(assistant, task_id) == events
    # Resuming after the 3rd event gets exactly the rest.
    assert await watch(assistant, task_id, after=3) == events[3:]


async def test_duplicate_submit_is_one_task_and_conflict_is_refused(assistant) -> None:
    spec = task_pb2.TaskSpec(prompt="what is 1+1", task_id="dup-1")
    first = await assistant.SubmitTask(pb.SubmitTaskRequest(task=spec), timeout=5)
    again = await assistant.SubmitTask(pb.SubmitTaskRequest(task=spec), timeout=5)
    assert first.created and not again.created
    assert again.task.task_id == "dup-1" and again.task.created_at == first.task.created_at
    other = task_pb2.TaskSpec(prompt="what is 2+2", task_id="dup-1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await assistant.SubmitTask(pb.SubmitTaskRequest(task=other), timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert from_rpc_error(caught.value).reason == "TASK_ID_REUSED"


async def test_a_delegation_resubmitted_with_new_limits_is_the_same_task(assistant) -> None:
    """The registry recomputes a sub-task's deadline and budget share each time it
    runs a delegation; a replay under the same id is the same task, not a conflict.
    A task without a parent keeps the strict rule."""
    lineage = task_pb2.TaskLineage(
        parent_task_id="t-parent", root_task_id="t-parent", depth=1, agents=["supervisor"]
    )
    spec = task_pb2.TaskSpec(
        prompt="what is 1+1", task_id="d-1", token_budget=4000, lineage=lineage
    )
    spec.deadline.FromSeconds(4_000_000_000)
    first = await assistant.SubmitTask(pb.SubmitTaskRequest(task=spec), timeout=5)
    replay = task_pb2.TaskSpec()
    replay.CopyFrom(spec)
    replay.token_budget = 3000
    replay.deadline.FromSeconds(4_000_000_060)
    again = await assistant.SubmitTask(pb.SubmitTaskRequest(task=replay), timeout=5)
    assert first.created and not again.created
    assert again.task.task_id == "d-1" and again.task.deadline == first.task.deadline

    for changed in (
        task_pb2.TaskSpec(prompt="what is 2+2", task_id="d-1", lineage=lineage),
        task_pb2.TaskSpec(
            prompt="what is 1+1", task_id="d-1", session_id="s-other", lineage=lineage
        ),
    ):
        changed.token_budget = 4000
        changed.deadline.CopyFrom(spec.deadline)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await assistant.SubmitTask(pb.SubmitTaskRequest(task=changed), timeout=5)
        assert from_rpc_error(caught.value).reason == "TASK_ID_REUSED"

    root = task_pb2.TaskSpec(prompt="what is 1+1", task_id="r-1", token_budget=4000)
    await assistant.SubmitTask(pb.SubmitTaskRequest(task=root), timeout=5)
    root.token_budget = 3000
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await assistant.SubmitTask(pb.SubmitTaskRequest(task=root), timeout=5)
    assert from_rpc_error(caught.value).reason == "TASK_ID_REUSED"


async def test_bad_submit_is_invalid_argument_and_queues_nothing(
    mesh, assistant, redis_client
) -> None:
    for spec in (
        task_pb2.TaskSpec(prompt=""),
        task_pb2.TaskSpec(prompt="hi", max_steps=26),
        task_pb2.TaskSpec(prompt="hi", token_budget=100),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await assistant.SubmitTask(pb.SubmitTaskRequest(task=spec), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await assistant.SubmitTask(pb.SubmitTaskRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    prefix = mesh.settings.key_prefix
    assert await redis_client.xlen(f"{prefix}:queue:assistant") == 0


async def test_unknown_task_is_not_found(assistant) -> None:
    for call in (
        assistant.GetTask(pb.GetTaskRequest(task_id="nope"), timeout=5),
        assistant.CancelTask(pb.CancelTaskRequest(task_id="nope"), timeout=5),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch(assistant, "nope")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_queue_full_is_resource_exhausted(mesh, channel_to) -> None:
    from agentplex.agents import app as agents_app

    host = agents_app.build_host(
        ASSISTANT, mesh.settings.model_copy(update={"task_queue_limit": 2}), metrics_port=None
    )
    endpoint = await host.start()
    try:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel_to(endpoint.address))
        for n in range(2):
            await stub.SubmitTask(
                pb.SubmitTaskRequest(task=task_pb2.TaskSpec(prompt=f"{n}+1")), timeout=5
            )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SubmitTask(
                pb.SubmitTaskRequest(task=task_pb2.TaskSpec(prompt="3+1")), timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in (caught.value.details() or "")
    finally:
        await host.stop()


async def test_cancel_pending_task_never_starts(assistant, start_worker, eventually) -> None:
    submitted = await assistant.SubmitTask(
        pb.SubmitTaskRequest(task=task_pb2.TaskSpec(prompt="what is 5*5", task_id="c-1")), timeout=5
    )
    cancelled = await assistant.CancelTask(pb.CancelTaskRequest(task_id="c-1"), timeout=5)
    assert cancelled.task.status == CANCELLED
    assert submitted.task.status == task_pb2.TASK_STATUS_PENDING
    await start_worker()
    events = await watch(assistant, "c-1")
    assert [e.WhichOneof("kind") for e in events] == ["final_result"]
    task = await wait_status(assistant, "c-1", [CANCELLED], eventually)
    assert task.attempts == 0
    # Cancelling again is a no-op returning the final state.
    again = await assistant.CancelTask(pb.CancelTaskRequest(task_id="c-1"), timeout=5)
    assert again.task.status == CANCELLED


class SlowLLM(ScriptedLLM):
    """The scripted model, but each call waits until released."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.release = asyncio.Event()

    async def stream(self, request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        self.calls += 1
        await self.release.wait()
        async for event in super().stream(request):
            yield event


async def test_cancel_running_task_stops_at_the_next_step(
    assistant, start_worker, eventually
) -> None:
    llm = SlowLLM()
    await start_worker(llm=llm)
    await assistant.SubmitTask(
        pb.SubmitTaskRequest(
            task=task_pb2.TaskSpec(prompt="what is 6*7", task_id="c-2", session_id="cancelled")
        ),
        timeout=5,
    )
    await eventually(lambda: llm.calls == 1, message="the task did not start")
    response = await assistant.CancelTask(pb.CancelTaskRequest(task_id="c-2"), timeout=5)
    assert response.task.status == task_pb2.TASK_STATUS_RUNNING and response.task.cancel_requested
    llm.release.set()  # the step in flight finishes (its tool call too), then the task stops
    task = await wait_status(assistant, "c-2", [CANCELLED], eventually)
    assert task.result.error == "cancelled"
    assert task.result.tool_calls == 1 and llm.calls == 1
    events = await watch(assistant, "c-2")
    assert events[-1].final_result.result.status == CANCELLED


async def test_several_watchers_see_the_same_events(assistant, start_worker) -> None:
    await assistant.SubmitTask(
        pb.SubmitTaskRequest(task=task_pb2.TaskSpec(prompt="what is 2*21", task_id="w-1")),
        timeout=5,
    )
    watchers = [asyncio.create_task(watch(assistant, "w-1")) for _ in range(3)]
    await start_worker()
    results = await asyncio.gather(*watchers)
    assert results[0] == results[1] == results[2]
    assert results[0][-1].final_result.result.output == "2*21 = 42."


async def test_a_final_only_watch_gets_just_the_outcome_live_or_after_the_end(
    assistant, start_worker
) -> None:
    await assistant.SubmitTask(
        pb.SubmitTaskRequest(task=task_pb2.TaskSpec(prompt="what is 6*7", task_id="f-1")),
        timeout=5,
    )
    # Waiting before any worker runs it: the one message comes when the task ends.
    live = asyncio.create_task(watch(assistant, "f-1", final_only=True))
    everything = asyncio.create_task(watch(assistant, "f-1"))
    await start_worker()
    events = await everything
    assert len(events) > 2
    assert await live == [events[-1]]
    assert events[-1].final_result.result.output == "6*7 = 42."
    # After the end: the final event at once; after the final event itself: nothing.
    assert await watch(assistant, "f-1", final_only=True) == [events[-1]]
    assert await watch(assistant, "f-1", after=2, final_only=True) == [events[-1]]
    assert await watch(assistant, "f-1", after=len(events), final_only=True) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch(assistant, "f-1", after=len(events) + 1, final_only=True)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_final_only_watch_of_a_cancelled_task_gets_the_cancellation(
    assistant,
) -> None:
    await assistant.SubmitTask(
        pb.SubmitTaskRequest(task=task_pb2.TaskSpec(prompt="what is 1*1", task_id="f-2")),
        timeout=5,
    )
    live = asyncio.create_task(watch(assistant, "f-2", final_only=True))
    await assistant.CancelTask(pb.CancelTaskRequest(task_id="f-2"), timeout=5)
    (final,) = await live
    assert final.WhichOneof("kind") == "final_result"
    assert final.final_result.result.status == CANCELLED


async def test_many_watchers_hold_one_blocked_redis_connection_and_miss_nothing(
    assistant, start_worker, redis_client, eventually
) -> None:
    ids = [f"many-{n}" for n in range(30)]
    for task_id in ids:
        await assistant.SubmitTask(
            pb.SubmitTaskRequest(task=task_pb2.TaskSpec(prompt="what is 4*4", task_id=task_id)),
            timeout=5,
        )
    watchers = [asyncio.create_task(watch(assistant, task_id)) for task_id in ids]

    async def one_blocked_reader() -> bool:
        blocked = [c for c in await redis_client.client_list() if "b" in c.get("flags", "")]
        return [c.get("name") for c in blocked] == [READER_NAME]

    await eventually(one_blocked_reader, timeout=10, message="watchers did not share one read")
    await start_worker()
    for events in await asyncio.gather(*watchers):
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert events[-1].final_result.result.output == "4*4 = 16."


async def test_events_past_retention_are_out_of_range(
    assistant, start_worker, mesh, redis_client, eventually
) -> None:
    await assistant.SubmitTask(
        pb.SubmitTaskRequest(task=task_pb2.TaskSpec(prompt="what is 3*3", task_id="r-1")), timeout=5
    )
    await start_worker(task_event_retention_seconds=1)
    done = await watch(assistant, "r-1")
    events_key = f"{mesh.settings.key_prefix}:task:assistant:r-1:events"
    await eventually(
        lambda: _gone(redis_client, events_key), timeout=10, message="events never expired"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch(assistant, "r-1")
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert f"first still available is {len(done) + 1}" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch(assistant, "r-1", final_only=True)
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "read the result with GetTask" in (caught.value.details() or "")
    # The result outlives the events.
    task = (await assistant.GetTask(pb.GetTaskRequest(task_id="r-1"), timeout=5)).task
    assert task.status == COMPLETED


async def _gone(redis_client, key: str) -> bool:
    return not await redis_client.exists(key)


async def test_parallel_tool_calls_keep_their_event_order(
    assistant, start_worker, eventually
) -> None:
    """Tool calls of one step emit events concurrently; none may be refused as stale."""
    await start_worker()
    ids = [f"par-{n}" for n in range(8)]
    for task_id in ids:
        await assistant.SubmitTask(
            pb.SubmitTaskRequest(
                task=task_pb2.TaskSpec(prompt="what is 1+1, 2+2, 3+3 and 4+4?", task_id=task_id)
            ),
            timeout=5,
        )
    for task_id in ids:
        task = await wait_status(assistant, task_id, [COMPLETED], eventually)
        assert task.attempts == 1 and task.result.tool_calls == 4
        events = await watch(assistant, task_id)
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert sum(e.HasField("tool_result") for e in events) == 4
