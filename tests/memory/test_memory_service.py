"""The Memory service over real gRPC: round trips, status codes for bad input, the
server-default token limit, and behaviour when Redis cannot be reached."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentplex.clients.memory import MemoryClient
from agentplex.memory import app as memory_app
from agentplex.mesh.redis_process import free_port
from agentplex.runtime import errors
from agentplex.runtime.settings import Settings
from agentplex.runtime.tokens import estimate_message_tokens
from agentplex.v1 import memory_pb2
from agentplex.v1 import memory_service_pb2 as pb
from agentplex.v1 import memory_service_pb2_grpc as pb_grpc

TIMEOUT = 5.0


def scope(agent: str = "assistant", session_id: str = "s-1") -> memory_pb2.SessionScope:
    return memory_pb2.SessionScope(agent=agent, session_id=session_id)


def msg(
    content: str, *, role: memory_pb2.Role = memory_pb2.ROLE_USER, tokens: int = 0
) -> memory_pb2.MemoryMessage:
    return memory_pb2.MemoryMessage(role=role, content=content, token_count=tokens)


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail the server attached to a failed call."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            assert status.code == err.code().value[0]
            assert status.message == err.details()
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError(f"no ErrorInfo in trailers of {err!r}")


@pytest.fixture
async def memory_address(settings: Settings) -> AsyncIterator[str]:
    """Only the Memory service (cheaper than the whole mesh for input-validation cases)."""
    host = memory_app.build_host(settings, metrics_port=None)
    try:
        yield (await host.start()).address
    finally:
        await host.stop()


@pytest.fixture
def stub(memory_address: str, channel_to) -> pb_grpc.MemoryServiceStub:
    return pb_grpc.MemoryServiceStub(channel_to(memory_address))


# --- round trips on the full mesh -----------------------------------------------------------


async def test_append_load_clear_round_trip(mesh, channel_to) -> None:
    stub = pb_grpc.MemoryServiceStub(channel_to(mesh.memory))

    appended = await stub.AppendMessages(
        pb.AppendMessagesRequest(
            scope=scope(),
            messages=[
                msg("you are helpful", role=memory_pb2.ROLE_SYSTEM),
                msg("hello"),
                msg("hi!", role=memory_pb2.ROLE_ASSISTANT),
            ],
        ),
        timeout=TIMEOUT,
    )
    assert appended.message_count == 3
    appended = await stub.AppendMessages(
        pb.AppendMessagesRequest(scope=scope(), messages=[msg("and again")]), timeout=TIMEOUT
    )
    assert appended.message_count == 4

    loaded = await stub.LoadContext(pb.LoadContextRequest(scope=scope()), timeout=TIMEOUT)
    assert [m.content for m in loaded.messages] == ["you are helpful", "hello", "hi!", "and again"]
    assert [m.role for m in loaded.messages] == [
        memory_pb2.ROLE_SYSTEM,
        memory_pb2.ROLE_USER,
        memory_pb2.ROLE_ASSISTANT,
        memory_pb2.ROLE_USER,
    ]
    assert all(m.HasField("created_at") and m.created_at.seconds > 0 for m in loaded.messages)
    assert [m.token_count for m in loaded.messages] == [
        estimate_message_tokens(m.content) for m in loaded.messages
    ]
    assert loaded.token_count == sum(m.token_count for m in loaded.messages)
    assert loaded.omitted_count == 0

    cleared = await stub.ClearSession(pb.ClearSessionRequest(scope=scope()), timeout=TIMEOUT)
    assert cleared.existed is True
    cleared = await stub.ClearSession(pb.ClearSessionRequest(scope=scope()), timeout=TIMEOUT)
    assert cleared.existed is False
    loaded = await stub.LoadContext(pb.LoadContextRequest(scope=scope()), timeout=TIMEOUT)
    assert list(loaded.messages) == []
    assert loaded.token_count == 0
    assert loaded.omitted_count == 0


async def test_service_writes_under_the_configured_key_prefix(
    mesh, channel_to, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    stub = pb_grpc.MemoryServiceStub(channel_to(mesh.memory))
    await stub.AppendMessages(
        pb.AppendMessagesRequest(scope=scope("researcher", "abc"), messages=[msg("x")]),
        timeout=TIMEOUT,
    )
    key = f"{key_prefix}:memory:researcher:abc"
    assert await redis_client.llen(key) == 1
    assert 0 < await redis_client.ttl(key) <= mesh.settings.memory_ttl_seconds


async def test_memory_client_round_trip(mesh) -> None:
    client = MemoryClient(mesh.memory)
    try:
        count = await client.append(
            "assistant", "client-1", [msg("a", tokens=10), msg("b", tokens=10)], timeout=TIMEOUT
        )
        assert count == 2
        packet = await client.load("assistant", "client-1", 15, timeout=TIMEOUT)
        assert [m.content for m in packet.messages] == ["b"]
        assert packet.omitted_count == 1
        with pytest.raises(errors.InvalidArgument, match="max_tokens"):
            await client.load("assistant", "client-1", 0, timeout=TIMEOUT)
    finally:
        await client.close()


# --- max_tokens: unset means the server default ---------------------------------------------


async def test_max_tokens_unset_uses_server_default(settings: Settings, channel_to) -> None:
    host = memory_app.build_host(
        settings.model_copy(update={"memory_default_context_tokens": 30}), metrics_port=None
    )
    try:
        stub = pb_grpc.MemoryServiceStub(channel_to((await host.start()).address))
        await stub.AppendMessages(
            pb.AppendMessagesRequest(
                scope=scope(), messages=[msg(f"m{i}", tokens=10) for i in range(5)]
            ),
            timeout=TIMEOUT,
        )

        unset = await stub.LoadContext(pb.LoadContextRequest(scope=scope()), timeout=TIMEOUT)
        assert [m.content for m in unset.messages] == ["m2", "m3", "m4"]
        assert unset.token_count == 30
        assert unset.omitted_count == 2

        explicit = await stub.LoadContext(
            pb.LoadContextRequest(scope=scope(), max_tokens=45), timeout=TIMEOUT
        )
        assert [m.content for m in explicit.messages] == ["m1", "m2", "m3", "m4"]
        assert explicit.token_count == 40
        assert explicit.omitted_count == 1

        larger = await stub.LoadContext(
            pb.LoadContextRequest(scope=scope(), max_tokens=1000), timeout=TIMEOUT
        )
        assert len(larger.messages) == 5
        assert larger.omitted_count == 0
    finally:
        await host.stop()


async def test_max_tokens_explicit_zero_is_not_treated_as_unset(
    stub: pb_grpc.MemoryServiceStub,
) -> None:
    request = pb.LoadContextRequest(scope=scope(), max_tokens=0)
    assert request.HasField("max_tokens")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.LoadContext(request, timeout=TIMEOUT)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


# --- bad input -> INVALID_ARGUMENT with readable details -------------------------------------

BAD_CALLS = {
    "append-bad-agent": (
        "AppendMessages",
        pb.AppendMessagesRequest(scope=scope(agent="Not A Name"), messages=[msg("x")]),
        "scope.agent 'Not A Name' must be a lowercase name",
    ),
    "append-missing-scope": (
        "AppendMessages",
        pb.AppendMessagesRequest(messages=[msg("x")]),
        "scope.agent '' must be a lowercase name",
    ),
    "append-bad-session": (
        "AppendMessages",
        pb.AppendMessagesRequest(scope=scope(session_id="a b"), messages=[msg("x")]),
        "scope.session_id must be 1-128 characters",
    ),
    "append-no-messages": (
        "AppendMessages",
        pb.AppendMessagesRequest(scope=scope()),
        "messages must hold at least one message",
    ),
    "append-too-many": (
        "AppendMessages",
        pb.AppendMessagesRequest(scope=scope(), messages=[msg("x")] * 101),
        "at most 100 messages per append, got 101",
    ),
    "append-unspecified-role": (
        "AppendMessages",
        pb.AppendMessagesRequest(
            scope=scope(), messages=[msg("x"), msg("y", role=memory_pb2.ROLE_UNSPECIFIED)]
        ),
        "messages[1].role must be set",
    ),
    "append-oversize": (
        "AppendMessages",
        pb.AppendMessagesRequest(scope=scope(), messages=[msg("x" * (256 * 1024 + 1))]),
        "messages[0].content exceeds 262144 bytes",
    ),
    "load-bad-agent": (
        "LoadContext",
        pb.LoadContextRequest(scope=scope(agent="UPPER")),
        "scope.agent 'UPPER' must be a lowercase name",
    ),
    "load-bad-session": (
        "LoadContext",
        pb.LoadContextRequest(scope=scope(session_id="x" * 129)),
        "scope.session_id must be 1-128 characters",
    ),
    "load-zero-tokens": (
        "LoadContext",
        pb.LoadContextRequest(scope=scope(), max_tokens=0),
        "max_tokens must be between 1 and 1000000",
    ),
    "load-negative-tokens": (
        "LoadContext",
        pb.LoadContextRequest(scope=scope(), max_tokens=-5),
        "max_tokens must be between 1 and 1000000",
    ),
    "load-too-many-tokens": (
        "LoadContext",
        pb.LoadContextRequest(scope=scope(), max_tokens=1_000_001),
        "max_tokens must be between 1 and 1000000",
    ),
    "clear-bad-session": (
        "ClearSession",
        pb.ClearSessionRequest(scope=scope(session_id="")),
        "scope.session_id must be 1-128 characters",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=list(BAD_CALLS))
async def test_bad_input_is_invalid_argument(
    case: str,
    stub: pb_grpc.MemoryServiceStub,
    redis_client: aioredis.Redis,
    key_prefix: str,
) -> None:
    method, request, expected = BAD_CALLS[case]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, method)(request, timeout=TIMEOUT)

    err = caught.value
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (err.details() or "")
    info = error_info(err)
    assert info.reason == "INVALID_ARGUMENT"
    assert info.domain == errors.ERROR_DOMAIN
    # A rejected request never writes anything.
    assert await redis_client.keys(f"{key_prefix}:*") == []


async def test_health_serving_with_redis(memory_address: str, channel_to) -> None:
    health = health_pb2_grpc.HealthStub(channel_to(memory_address))
    for service in ("", memory_app.SERVICE_NAME):
        response = await health.Check(  # type: ignore[attr-defined]  # types-grpcio-health-checking's HealthStub declares no methods
            health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING


# --- Redis unreachable ----------------------------------------------------------------------


@pytest.fixture
async def memory_without_redis(settings: Settings) -> AsyncIterator[str]:
    dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    host = memory_app.build_host(dead, metrics_port=None)
    try:
        yield (await host.start()).address
    finally:
        await host.stop()


async def test_unreachable_redis_is_unavailable_and_not_serving(
    memory_without_redis: str, channel_to
) -> None:
    channel = channel_to(memory_without_redis)
    stub = pb_grpc.MemoryServiceStub(channel)

    calls = [
        stub.AppendMessages(
            pb.AppendMessagesRequest(scope=scope(), messages=[msg("x")]), timeout=TIMEOUT
        ),
        stub.LoadContext(pb.LoadContextRequest(scope=scope()), timeout=TIMEOUT),
        stub.ClearSession(pb.ClearSessionRequest(scope=scope()), timeout=TIMEOUT),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        err = caught.value
        assert err.code() is grpc.StatusCode.UNAVAILABLE, err
        assert "Redis is unavailable" in (err.details() or "")
        assert error_info(err).reason == "REDIS_UNAVAILABLE"

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", memory_app.SERVICE_NAME):
        response = await health.Check(  # type: ignore[attr-defined]  # types-grpcio-health-checking's HealthStub declares no methods
            health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT
        )
        assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_validation_still_wins_when_redis_is_unreachable(
    memory_without_redis: str, channel_to
) -> None:
    stub = pb_grpc.MemoryServiceStub(channel_to(memory_without_redis))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AppendMessages(pb.AppendMessagesRequest(scope=scope()), timeout=TIMEOUT)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_memory_client_maps_unavailable(memory_without_redis: str) -> None:
    client = MemoryClient(memory_without_redis)
    try:
        with pytest.raises(errors.Unavailable, match="Redis is unavailable"):
            await client.load("assistant", "s-1", 100, timeout=TIMEOUT)
    finally:
        await client.close()
