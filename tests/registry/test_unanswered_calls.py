"""Calls that end without the tool's answer, and what their idempotency key keeps.

The registry is driven as a plain class over real Redis; the backend is a real
gRPC ToolExecutorService behind the mesh's own edge interceptor, scripted call
by call: answer, hang past the tool's limit, report its own Redis down (as the
built-in backend does), or fail mid-call without saying anything more. A
registry that never settles its claim (killed mid-call, or its Redis failing
as it stores the answer) is played by a second registry on the same Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from agentplex.contract.reasons import Reason
from agentplex.mesh.redis_process import free_port
from agentplex.registry.backends import BackendRouter
from agentplex.registry.ledger import Claim, IdempotencyLedger, fingerprint, ledger_key
from agentplex.registry.service import ToolRegistry
from agentplex.registry.store import RegistryStore
from agentplex.runtime import errors
from agentplex.runtime.clients import Deadline
from agentplex.runtime.interceptors import EdgeInterceptor
from agentplex.v1 import tool_executor_service_pb2 as ex
from agentplex.v1 import tool_executor_service_pb2_grpc as ex_grpc
from agentplex.v1 import tool_pb2
from agentplex.v1 import tool_registry_service_pb2 as pb

TOOL_TIMEOUT = 0.5
READ_ONLY = tool_pb2.SIDE_EFFECT_READ_ONLY
IDEMPOTENT = tool_pb2.SIDE_EFFECT_IDEMPOTENT
SIDE_EFFECTING = tool_pb2.SIDE_EFFECT_SIDE_EFFECTING


class ScriptedBackend(ex_grpc.ToolExecutorServiceServicer):
    """Plays one behaviour per call (then answers): 'ok', 'hang', 'redis-down', 'cut'."""

    def __init__(self) -> None:
        self.script: list[str] = []
        self.calls = 0

    async def ExecuteTool(self, request, context):
        self.calls += 1
        behaviour = self.script.pop(0) if self.script else "ok"
        if behaviour == "hang":
            await asyncio.sleep(TOOL_TIMEOUT * 4)
        elif behaviour == "redis-down":
            raise errors.Unavailable(
                "this backend's Redis is unavailable",
                reason=Reason.BACKEND_DEPENDENCY_UNAVAILABLE,
            )
        elif behaviour == "cut":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        return ex.ExecuteToolResponse(result_json=json.dumps({"ok": True}))


@pytest.fixture
async def backend() -> AsyncIterator[tuple[ScriptedBackend, str]]:
    servicer = ScriptedBackend()
    server = grpc.aio.server(interceptors=[EdgeInterceptor()])
    ex_grpc.add_ToolExecutorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


class LostLedger(IdempotencyLedger):
    """A ledger whose Redis fails just as a claim is to be settled: the claim stays."""

    async def complete(self, claim: Claim, fp: str, response: pb.InvokeToolResponse) -> None:
        raise RedisConnectionError("Connection reset by peer")

    async def release(self, claim: Claim) -> None:
        raise RedisConnectionError("Connection reset by peer")


@contextlib.asynccontextmanager
async def make_registry(
    redis_client: aioredis.Redis, key_prefix: str, ledger: type[IdempotencyLedger]
) -> AsyncIterator[ToolRegistry]:
    router = BackendRouter(tool_timeout_seconds=TOOL_TIMEOUT, retry_wait_seconds=0.01)
    try:
        yield ToolRegistry(
            store=RegistryStore(redis_client, key_prefix=key_prefix),
            ledger=ledger(
                redis_client, key_prefix=key_prefix, pending_ttl_seconds=TOOL_TIMEOUT * 2
            ),
            router=router,
        )
    finally:
        await router.close()


@pytest.fixture
async def registry(redis_client: aioredis.Redis, key_prefix: str) -> AsyncIterator[ToolRegistry]:
    async with make_registry(redis_client, key_prefix, IdempotencyLedger) as made:
        yield made


@pytest.fixture
async def lost_registry(
    redis_client: aioredis.Redis, key_prefix: str
) -> AsyncIterator[ToolRegistry]:
    """A registry on the same Redis that claims and dispatches, but never settles."""
    async with make_registry(redis_client, key_prefix, LostLedger) as made:
        yield made


async def publish(
    registry: ToolRegistry, name: str, endpoint: str, side_effect: tool_pb2.SideEffect
) -> None:
    await registry.register(
        tool_pb2.ToolDefinition(
            name=name,
            version="1.0.0",
            description="Scripted.",
            input_schema_json=json.dumps({"type": "object", "properties": {}}),
            output_schema_json=json.dumps({"type": "object"}),
            side_effect=side_effect,
            endpoint=endpoint,
        )
    )


async def invoke(registry: ToolRegistry, name: str, key: str = "t-1:1:0") -> pb.InvokeToolResponse:
    request = pb.InvokeToolRequest(tool_name=name, idempotency_key=key, caller=pb.Caller())
    return await registry.invoke(request, Deadline.after(10))


@pytest.mark.parametrize("side_effect", [READ_ONLY, IDEMPOTENT])
async def test_a_timeout_of_a_tool_safe_to_repeat_is_not_replayed(
    registry, backend, side_effect
) -> None:
    """A TIMEOUT says nothing of the result: the retried step runs the tool again
    instead of being handed the old failure for a day."""
    servicer, endpoint = backend
    await publish(registry, "slow.lookup", endpoint, side_effect)
    servicer.script = ["hang"]
    first = await invoke(registry, "slow.lookup")
    assert first.error.code == "TIMEOUT"  # the tool's own limit: the model is told
    retried = await invoke(registry, "slow.lookup")
    assert not retried.replayed and json.loads(retried.result_json) == {"ok": True}
    assert servicer.calls == 2
    # An answer is kept as ever: the next repeat is a replay.
    assert (await invoke(registry, "slow.lookup")).replayed and servicer.calls == 2


async def test_a_side_effecting_timeout_keeps_its_key(registry, backend) -> None:
    """It may have taken effect: at most once means it never runs again under the key."""
    servicer, endpoint = backend
    await publish(registry, "slow.write", endpoint, SIDE_EFFECTING)
    servicer.script = ["hang"]
    assert (await invoke(registry, "slow.write")).error.code == "TIMEOUT"
    again = await invoke(registry, "slow.write")
    assert again.replayed and again.error.code == "TIMEOUT" and servicer.calls == 1


async def test_a_backend_whose_own_redis_is_down_gives_the_key_back(registry, backend) -> None:
    """The backend says it could not run the call: the mesh's failure, kept by no
    key, so the retried attempt runs even a side-effecting tool."""
    servicer, endpoint = backend
    await publish(registry, "notes.like", endpoint, SIDE_EFFECTING)
    servicer.script = ["redis-down"]
    failed = await invoke(registry, "notes.like")
    assert failed.error.code == "MESH_UNAVAILABLE"
    assert "Redis is unavailable" in failed.error.message
    retried = await invoke(registry, "notes.like")
    assert not retried.replayed and json.loads(retried.result_json) == {"ok": True}
    assert servicer.calls == 2


async def test_a_side_effecting_call_cut_off_mid_call_is_outcome_unknown(registry, backend) -> None:
    """UNAVAILABLE with no word that nothing happened: it may have; the model is told."""
    servicer, endpoint = backend
    await publish(registry, "cut.write", endpoint, SIDE_EFFECTING)
    servicer.script = ["cut"]
    failed = await invoke(registry, "cut.write")
    assert failed.error.code == "OUTCOME_UNKNOWN"
    again = await invoke(registry, "cut.write")
    assert again.replayed and again.error.code == "OUTCOME_UNKNOWN" and servicer.calls == 1


async def test_no_backend_accepting_a_connection_claims_nothing(
    registry, redis_client, key_prefix
) -> None:
    """Nothing was sent: MESH_UNAVAILABLE even for a side-effecting tool, and no entry
    is left under the key."""
    await publish(registry, "gone.write", f"127.0.0.1:{free_port()}", SIDE_EFFECTING)
    failed = await invoke(registry, "gone.write", key="t-2:1:0")
    assert failed.error.code == "MESH_UNAVAILABLE"
    assert "accepted a connection" in failed.error.message
    assert not await redis_client.exists(ledger_key(key_prefix, "", "", "t-2:1:0"))


# -- claims nobody settles: the registry killed mid-call, or its Redis failing --


async def test_a_side_effect_whose_answer_was_lost_never_runs_again(
    registry, lost_registry, backend
) -> None:
    """The tool ran, but the registry's Redis failed as it stored the answer (the
    caller sees the registry's failure, MESH_UNAVAILABLE, and retries): the retry
    must not run it again. Once the claim's hold is out it gets OUTCOME_UNKNOWN."""
    servicer, endpoint = backend
    await publish(registry, "lost.write", endpoint, SIDE_EFFECTING)
    with pytest.raises(RedisConnectionError):
        await invoke(lost_registry, "lost.write")
    assert servicer.calls == 1
    retried = await invoke(registry, "lost.write")
    assert retried.replayed and retried.error.code == "OUTCOME_UNKNOWN"
    assert "will not run again" in retried.error.message
    assert retried.tool_name == "lost.write" and servicer.calls == 1
    again = await invoke(registry, "lost.write")
    assert again.replayed and again.error.code == "OUTCOME_UNKNOWN" and servicer.calls == 1


@pytest.mark.parametrize("side_effect", [READ_ONLY, IDEMPOTENT])
async def test_a_call_safe_to_repeat_whose_answer_was_lost_runs_again(
    registry, lost_registry, backend, side_effect
) -> None:
    servicer, endpoint = backend
    await publish(registry, "lost.lookup", endpoint, side_effect)
    with pytest.raises(RedisConnectionError):
        await invoke(lost_registry, "lost.lookup")
    retried = await invoke(registry, "lost.lookup")
    assert not retried.replayed and json.loads(retried.result_json) == {"ok": True}
    assert servicer.calls == 2
    assert (await invoke(registry, "lost.lookup")).replayed and servicer.calls == 2


async def test_a_claim_left_by_a_dead_registry_is_settled_without_running(
    registry, backend, redis_client, key_prefix
) -> None:
    """All a registry killed mid-call leaves behind is its pending claim (played here
    by a claim nobody settles): a side-effecting call may have run, so the retry
    waits out the claim's hold and gets OUTCOME_UNKNOWN, the backend not called."""
    servicer, endpoint = backend
    await publish(registry, "dead.write", endpoint, SIDE_EFFECTING)
    dead = IdempotencyLedger(
        redis_client, key_prefix=key_prefix, pending_ttl_seconds=TOOL_TIMEOUT * 2
    )
    await dead.claim(pb.Caller(), "t-1:1:0", fingerprint("dead.write", {}), Deadline.after(5))
    retried = await invoke(registry, "dead.write")
    assert retried.replayed and retried.error.code == "OUTCOME_UNKNOWN"
    assert servicer.calls == 0
