"""A real Redis outage under `notes.write` is not an answer.

The tool backend runs on a Redis of its own here, which the tests stop and
restart (same port, same data directory), while the agent, Memory, the
registry and the task queue keep theirs: so the outage hits the tool call and
nothing else, and a task that treated it as the tool's answer would complete
("notes.write failed: … Redis is unavailable") with no note written. Instead a
direct call ends UNAVAILABLE and a queued task is retried until the note is
written once, or fails after its attempt budget — never COMPLETED without it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from agentplex.agents.llm.base import CompletionRequest, LLMEvent, LLMProvider
from agentplex.agents.llm.scripted import ScriptedLLM
from agentplex.mesh.redis_process import EmbeddedRedis
from agentplex.runtime import errors
from agentplex.runtime.settings import Settings
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc, step_event_pb2, task_pb2

pytestmark = pytest.mark.slow

NOTE = "the door code is 4711"
PROMPT = f"remember {NOTE}"


class OutageRedis:
    """A Redis the test stops, and starts again on its port and data directory (AOF)."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self.server = EmbeddedRedis(data_dir=data_dir)

    @property
    def url(self) -> str:
        return self.server.url

    async def stop(self) -> None:
        await self.server.stop()

    async def restart(self) -> None:
        self.server = EmbeddedRedis(port=self.server.port, data_dir=self._data_dir)
        await self.server.start()

    async def notes(self, prefix: str, session: str) -> list[bytes]:
        client = aioredis.Redis.from_url(self.url)
        try:
            raw = await client.lrange(f"{prefix}:notes:{session}", 0, -1)
            return [note if isinstance(note, bytes) else note.encode() for note in raw]
        finally:
            await client.aclose()


@pytest.fixture
async def tools_redis(tmp_path: Path) -> AsyncIterator[OutageRedis]:
    redis = OutageRedis(tmp_path / "tools-redis")
    await redis.server.start()
    try:
        yield redis
    finally:
        await redis.stop()


@dataclass
class OutageMesh:
    """What the tests (and the suite's `worker_processes`) need of the mesh."""

    agents: dict[str, str]
    settings: Settings


@contextlib.asynccontextmanager
async def started_mesh(
    settings: Settings, tools_redis_url: str, llm: LLMProvider | None = None
) -> AsyncIterator[OutageMesh]:
    """Memory, the registry, the tool backend (on `tools_redis_url`) and the assistant."""
    from agentplex.agents import app as agents_app
    from agentplex.agents.catalog import ASSISTANT
    from agentplex.memory import app as memory_app
    from agentplex.registry import app as registry_app
    from agentplex.tools import app as tools_app

    hosts = []
    try:
        memory_host = memory_app.build_host(settings, metrics_port=None)
        hosts.append(memory_host)
        memory = (await memory_host.start()).address
        registry_host = await registry_app.build_host(settings, metrics_port=None)
        hosts.append(registry_host)
        registry = (await registry_host.start()).address
        agent_settings = settings.model_copy(
            update={"memory_address": memory, "registry_address": registry}
        )
        tools_host = await tools_app.build_host(
            agent_settings.model_copy(update={"redis_url": tools_redis_url}), metrics_port=None
        )
        hosts.append(tools_host)
        await tools_host.start()
        assistant_host = agents_app.build_host(
            ASSISTANT, agent_settings, metrics_port=None, llm=llm
        )
        hosts.append(assistant_host)
        assistant = (await assistant_host.start()).address
        yield OutageMesh(agents={"assistant": assistant}, settings=agent_settings)
    finally:
        for host in reversed(hosts):
            await host.stop()


@pytest.fixture
async def mesh(settings: Settings, tools_redis: OutageRedis) -> AsyncIterator[OutageMesh]:
    """The suite's mesh, except that the tool backend keeps its notes in its own Redis."""
    async with started_mesh(settings, tools_redis.url) as started:
        yield started


@pytest.fixture
def assistant(mesh, channel_to) -> agent_service_pb2_grpc.AgentServiceStub:
    return agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["assistant"]))


def run_request(task_id: str) -> pb.RunTaskRequest:
    return pb.RunTaskRequest(prompt=PROMPT, task_id=task_id, session_id=f"s-{task_id}")


async def test_a_direct_call_ends_unavailable_and_a_retry_writes_the_note_once(
    mesh, assistant, tools_redis, eventually
) -> None:
    prefix = mesh.settings.key_prefix
    await tools_redis.stop()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await assistant.RunTask(run_request("direct-1"), timeout=30)
    failure = errors.from_rpc_error(caught.value)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # not COMPLETED
    assert failure.reason == "TOOL_UNAVAILABLE"
    assert "notes.write" in failure.message and "Redis is unavailable" in failure.message

    # The stream says the same: the attempt's tool result, then UNAVAILABLE.
    stream = assistant.StreamSteps(
        pb.StreamStepsRequest(prompt=PROMPT, task_id="direct-2", session_id="s-direct-2"),
        timeout=30,
    )
    events: list[step_event_pb2.StepEvent] = []
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for response in stream:
            events.append(response.event)
    assert streamed.value.code() == grpc.StatusCode.UNAVAILABLE
    [result] = [e.tool_result for e in events if e.HasField("tool_result")]
    assert result.error.code == "MESH_UNAVAILABLE"
    assert events[-1].error.code == "UNAVAILABLE"
    assert not any(e.HasField("final_result") for e in events)

    # Redis back: the caller retries the same task (so the same idempotency key).
    # The failed call left its key free, so the note is written now, and once.
    await tools_redis.restart()
    answers: list[pb.RunTaskResponse] = []

    async def retried() -> bool:
        try:
            answers.append(await assistant.RunTask(run_request("direct-1"), timeout=30))
        except grpc.aio.AioRpcError as err:
            # Stale pooled connections may fail once more: still an outage, never an answer.
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            return False
        return True

    await eventually(retried, timeout=30, interval=0.2, message="the retry did not complete")
    result_ = answers[-1].result
    assert result_.status == task_pb2.TASK_STATUS_COMPLETED
    assert result_.output == f"Noted: {NOTE}."
    assert await tools_redis.notes(prefix, "s-direct-1") == [NOTE.encode()]
    assert await tools_redis.notes(prefix, "s-direct-2") == []


async def test_a_genuine_tool_error_still_reaches_the_model(assistant, tools_redis) -> None:
    """The tool ran and could not do it: the model is told, and the task completes,
    outage elsewhere or not."""
    await tools_redis.stop()
    response = await assistant.RunTask(
        pb.RunTaskRequest(prompt="what is 1/0?", session_id="s-calc"), timeout=30
    )
    assert response.result.status == task_pb2.TASK_STATUS_COMPLETED
    assert response.result.output.startswith("calculator failed: ")
    assert "division by zero" in response.result.output


class HeldModel(ScriptedLLM):
    """The scripted model; its first call waits for `plan`, every later one for `answer`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.plan = asyncio.Event()
        self.answer = asyncio.Event()

    async def stream(self, request: CompletionRequest) -> AsyncIterator[LLMEvent]:
        self.calls += 1
        await (self.plan if self.calls == 1 else self.answer).wait()
        async for event in super().stream(request):
            yield event


async def test_one_redis_for_the_whole_mesh_down_just_during_the_call(
    settings, tools_redis, channel_to, eventually
) -> None:
    """The fault as measured: one Redis for everything, down while `notes.write` is
    invoked (the registry cannot even claim its key) and back before the task would
    save its answer. The call must not come back COMPLETED with the outage as text."""
    model = HeldModel()
    shared = settings.model_copy(update={"redis_url": tools_redis.url})
    async with started_mesh(shared, tools_redis.url, llm=model) as mesh:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel_to(mesh.agents["assistant"]))
        call = asyncio.ensure_future(stub.RunTask(run_request("shared-1"), timeout=30))
        try:
            await eventually(lambda: model.calls == 1, message="the task did not reach its model")
            await tools_redis.stop()
            model.plan.set()  # now it asks for notes.write, with Redis down
            await eventually(
                lambda: call.done() or model.calls > 1,
                timeout=30,
                message="the tool call neither failed the task nor reached the model",
            )
            await tools_redis.restart()  # back before the answer would be saved
            model.answer.set()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
        finally:
            model.plan.set()
            model.answer.set()
            if not call.done():
                call.cancel()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert errors.from_rpc_error(caught.value).reason == "TOOL_UNAVAILABLE"
        assert model.calls == 1  # the model never saw the outage

        answers: list[pb.RunTaskResponse] = []

        async def retried() -> bool:
            try:
                answers.append(await stub.RunTask(run_request("shared-1"), timeout=30))
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                return False
            return True

        await eventually(retried, timeout=30, interval=0.2, message="the retry did not complete")
        assert answers[-1].result.output == f"Noted: {NOTE}."
        assert await tools_redis.notes(shared.key_prefix, "s-shared-1") == [NOTE.encode()]


async def submit(assistant, task_id: str) -> None:
    await assistant.SubmitTask(
        pb.SubmitTaskRequest(
            task=task_pb2.TaskSpec(prompt=PROMPT, task_id=task_id, session_id=f"s-{task_id}")
        ),
        timeout=5,
    )


async def get(assistant, task_id: str) -> task_pb2.Task:
    return (await assistant.GetTask(pb.GetTaskRequest(task_id=task_id), timeout=5)).task


async def outage_results(redis_client, prefix: str, task_id: str) -> list[str]:
    """The codes of the tool results recorded so far in the task's event stream."""
    raw = await redis_client.xrange(f"{prefix}:task:assistant:{task_id}:events")
    codes = []
    for _, fields in raw:
        for value in fields.values():
            event = step_event_pb2.StepEvent.FromString(value)
            if event.HasField("tool_result"):
                codes.append(event.tool_result.error.code or "ok")
    return codes


async def test_a_queued_task_is_retried_and_completes_with_the_note_written_once(
    mesh, assistant, tools_redis, worker_processes, redis_client, eventually
) -> None:
    prefix = mesh.settings.key_prefix
    await tools_redis.stop()
    worker = await worker_processes.start(
        AGENTPLEX_LLM_PROVIDER="scripted", AGENTPLEX_TASK_MAX_ATTEMPTS="5"
    )
    await submit(assistant, "queued-1")

    async def outage_seen() -> bool:
        return "MESH_UNAVAILABLE" in await outage_results(redis_client, prefix, "queued-1")

    await eventually(outage_seen, timeout=30, message="the tool call never met the outage")
    assert (await get(assistant, "queued-1")).status != task_pb2.TASK_STATUS_COMPLETED
    await tools_redis.restart()

    async def finished() -> bool:
        return (await get(assistant, "queued-1")).status in (
            task_pb2.TASK_STATUS_COMPLETED,
            task_pb2.TASK_STATUS_FAILED,
        )

    await eventually(finished, timeout=60, interval=0.1, message="the task did not finish")
    task = await get(assistant, "queued-1")
    assert task.status == task_pb2.TASK_STATUS_COMPLETED, (task, worker_processes.log(worker))
    assert task.attempts >= 2
    assert task.result.output == f"Noted: {NOTE}."
    assert await tools_redis.notes(prefix, "s-queued-1") == [NOTE.encode()]
    codes = await outage_results(redis_client, prefix, "queued-1")
    assert codes[0] == "MESH_UNAVAILABLE" and codes[-1] == "ok"


async def test_a_queued_task_that_outlasts_its_attempts_fails_never_completes(
    mesh, assistant, tools_redis, worker_processes, eventually
) -> None:
    prefix = mesh.settings.key_prefix
    await tools_redis.stop()
    worker = await worker_processes.start(
        AGENTPLEX_LLM_PROVIDER="scripted", AGENTPLEX_TASK_MAX_ATTEMPTS="2"
    )
    await submit(assistant, "queued-2")

    async def ended() -> bool:
        return (await get(assistant, "queued-2")).status not in (
            task_pb2.TASK_STATUS_PENDING,
            task_pb2.TASK_STATUS_RUNNING,
        )

    await eventually(ended, timeout=60, interval=0.1, message="the task never ended")
    task = await get(assistant, "queued-2")
    assert task.status == task_pb2.TASK_STATUS_FAILED, (task, worker_processes.log(worker))
    assert "dead-letter" in task.result.error
    await tools_redis.restart()
    assert await tools_redis.notes(prefix, "s-queued-2") == []
