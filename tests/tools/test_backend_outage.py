"""The built-in backend when its own Redis goes away, and `notes.write` under a key.

A Redis outage is not the tool's answer: the backend fails the RPC with
UNAVAILABLE and `BACKEND_DEPENDENCY_UNAVAILABLE`, which tells the registry the
call may be run again under its key. That promise holds because a write
dedupes on its key, even when Redis applied it and the reply was lost.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from agentplex.mesh.redis_process import EmbeddedRedis
from agentplex.runtime import errors, redis_client
from agentplex.runtime.clients import call_with_deadline
from agentplex.runtime.interceptors import EdgeInterceptor
from agentplex.tools.base import Tool, ToolContext
from agentplex.tools.calculator import Calculator
from agentplex.tools.executor import ToolExecutorServicer
from agentplex.tools.notes import NotesRead, NotesWrite
from agentplex.v1 import tool_executor_service_pb2 as ex
from agentplex.v1 import tool_executor_service_pb2_grpc as ex_grpc
from agentplex.v1 import tool_registry_service_pb2


def context(redis: aioredis.Redis, prefix: str, key: str = "", agent: str = "a") -> ToolContext:
    return ToolContext(
        agent=agent,
        session_id="s",
        task_id="t",
        redis=redis,
        key_prefix=prefix,
        idempotency_key=key,
    )


async def test_a_write_repeated_under_its_key_adds_nothing(redis_client, key_prefix) -> None:
    write = NotesWrite()
    first = await write.run({"text": "door code 4711"}, context(redis_client, key_prefix, "t:1:0"))
    again = await write.run({"text": "door code 4711"}, context(redis_client, key_prefix, "t:1:0"))
    assert first == again == {"saved": True, "note_count": 1}
    # Another caller's key, another request under the same key, or no key: new writes.
    await write.run({"text": "door code 4711"}, context(redis_client, key_prefix, "t:1:0", "b"))
    await write.run({"text": "buy milk"}, context(redis_client, key_prefix, "t:1:0"))
    await write.run({"text": "no key"}, context(redis_client, key_prefix))
    await write.run({"text": "no key"}, context(redis_client, key_prefix))
    notes = await NotesRead().run({}, context(redis_client, key_prefix))
    assert notes == {"notes": ["door code 4711", "door code 4711", "buy milk", "no key", "no key"]}


@pytest.fixture
async def backend(tmp_path: Path, key_prefix: str) -> AsyncIterator[tuple[EmbeddedRedis, str]]:
    """The built-in backend on a Redis of its own (stopped by the test), over real gRPC."""
    own = EmbeddedRedis(data_dir=tmp_path / "redis")
    await own.start()
    redis = redis_client.connect(own.url)
    server = grpc.aio.server(interceptors=[EdgeInterceptor()])
    tools: list[Tool] = [Calculator(), NotesWrite(), NotesRead()]
    ex_grpc.add_ToolExecutorServiceServicer_to_server(
        ToolExecutorServicer(tools, redis=redis, key_prefix=key_prefix), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield own, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
        await redis.aclose()
        await own.stop()


async def test_a_redis_outage_fails_the_call_as_unavailable_not_as_a_tool_error(
    backend,
) -> None:
    own, address = backend
    channel = grpc.aio.insecure_channel(address)
    stub = ex_grpc.ToolExecutorServiceStub(channel)

    def request(tool: str, arguments: dict[str, object]) -> ex.ExecuteToolRequest:
        return ex.ExecuteToolRequest(
            tool_name=tool,
            tool_version="1.0.0",
            arguments_json=json.dumps(arguments),
            caller=tool_registry_service_pb2.Caller(agent="a", session_id="s"),
            idempotency_key="t:1:0",
        )

    try:
        saved = await call_with_deadline(
            stub.ExecuteTool, request("notes.write", {"text": "x"}), timeout=5
        )
        assert json.loads(saved.result_json) == {"saved": True, "note_count": 1}
        await own.stop()
        with pytest.raises(errors.Unavailable) as caught:
            await call_with_deadline(
                stub.ExecuteTool, request("notes.write", {"text": "y"}), timeout=5
            )
        assert caught.value.reason == "BACKEND_DEPENDENCY_UNAVAILABLE"
        assert "Redis is unavailable" in caught.value.message
        # A tool that needs no Redis still answers: the backend itself is up.
        sum_ = await call_with_deadline(
            stub.ExecuteTool, request("calculator", {"expression": "2+2"}), timeout=5
        )
        assert json.loads(sum_.result_json)["result"] == 4
    finally:
        await channel.close()
