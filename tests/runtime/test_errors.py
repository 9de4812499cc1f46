"""The domain-error → status table, and the edge interceptor applying it over real gRPC."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.exceptions
from google.rpc import code_pb2, error_details_pb2, status_pb2
from prometheus_client import REGISTRY

from agentplex.runtime import errors
from agentplex.runtime.clients import call_with_deadline
from agentplex.runtime.interceptors import EdgeInterceptor

SECRET = "password=hunter2 at /srv/secret/path.py line 42"

DOMAIN_ERRORS: list[tuple[type[errors.AgentplexError], grpc.StatusCode, str]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION"),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE"),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE, "OUT_OF_RANGE"),
    (errors.Aborted, grpc.StatusCode.ABORTED, "ABORTED"),
]
DOMAIN_IDS = [cls.__name__ for cls, _, _ in DOMAIN_ERRORS]


def error_info_of(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    assert len(status.details) == 1
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


def trailer_status(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no grpc-status-details-bin trailer")


# --- the table ------------------------------------------------------------------------------


def test_every_domain_error_is_in_the_table() -> None:
    table = dict(errors.STATUS_TABLE)
    domain = {cls for cls, _, _ in DOMAIN_ERRORS}
    subclasses = {
        c for c in errors.AgentplexError.__subclasses__() if c.__module__ == errors.__name__
    }
    assert subclasses == domain, "a new domain error needs a row in STATUS_TABLE and here"
    for cls, code, _ in DOMAIN_ERRORS:
        assert table[cls] is code


@pytest.mark.parametrize(("cls", "code", "reason"), DOMAIN_ERRORS, ids=DOMAIN_IDS)
def test_status_code_for_domain_errors(
    cls: type[errors.AgentplexError], code: grpc.StatusCode, reason: str
) -> None:
    assert errors.status_code_for(cls("boom")) is code
    assert cls("boom").reason == reason


@pytest.mark.parametrize(("cls", "code", "reason"), DOMAIN_ERRORS, ids=DOMAIN_IDS)
def test_to_status_carries_message_reason_and_domain(
    cls: type[errors.AgentplexError], code: grpc.StatusCode, reason: str
) -> None:
    status = errors.to_status(cls("it went wrong"))
    assert status.code == code.value[0]
    assert status.code == getattr(code_pb2, code.name)
    assert status.message == "it went wrong"
    info = error_info_of(status)
    assert info.reason == reason
    assert info.domain == errors.ERROR_DOMAIN == "agentplex.dev"


def test_to_status_uses_a_custom_reason() -> None:
    status = errors.to_status(errors.NotFound("no tool 'x'", reason="TOOL_NOT_FOUND"))
    assert status.code == code_pb2.NOT_FOUND
    assert status.message == "no tool 'x'"
    assert error_info_of(status).reason == "TOOL_NOT_FOUND"


def test_empty_reason_keeps_the_class_default() -> None:
    assert errors.NotFound("x", reason="").reason == "NOT_FOUND"
    assert errors.NotFound("x", reason=None).reason == "NOT_FOUND"


def test_subclass_of_a_domain_error_maps_like_its_parent() -> None:
    class ToolNotFound(errors.NotFound):
        reason = "TOOL_NOT_FOUND"

    exc = ToolNotFound("gone")
    assert errors.status_code_for(exc) is grpc.StatusCode.NOT_FOUND
    assert error_info_of(errors.to_status(exc)).reason == "TOOL_NOT_FOUND"


@pytest.mark.parametrize(
    "exc",
    [ValueError(SECRET), KeyError(SECRET), RuntimeError(SECRET), ZeroDivisionError(SECRET)],
    ids=lambda e: type(e).__name__,
)
def test_unknown_exception_is_internal_with_a_generic_message(exc: Exception) -> None:
    assert errors.status_code_for(exc) is grpc.StatusCode.INTERNAL
    status = errors.to_status(exc)
    assert status.code == code_pb2.INTERNAL
    assert status.message == "internal error; the server log has the details"
    assert "hunter2" not in status.SerializeToString().decode("latin-1")
    assert error_info_of(status).reason == "INTERNAL"


@pytest.mark.parametrize(
    "exc",
    [
        redis.exceptions.ConnectionError("Error 111 connecting"),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        redis.exceptions.BusyLoadingError("loading"),  # a ConnectionError subclass
    ],
    ids=lambda e: type(e).__name__,
)
def test_redis_outages_are_unavailable(exc: Exception) -> None:
    assert errors.status_code_for(exc) is grpc.StatusCode.UNAVAILABLE
    status = errors.to_status(exc)
    assert status.code == code_pb2.UNAVAILABLE
    assert status.message.startswith("Redis is unavailable: ")
    assert error_info_of(status).reason == "REDIS_UNAVAILABLE"


def test_other_redis_errors_are_internal() -> None:
    exc = redis.exceptions.ResponseError("WRONGTYPE Operation against a key")
    assert errors.status_code_for(exc) is grpc.StatusCode.INTERNAL
    assert "WRONGTYPE" not in errors.to_status(exc).message


def test_from_rpc_error_without_a_status() -> None:
    err = errors.from_rpc_error(grpc.RpcError("opaque"))
    assert type(err) is errors.AgentplexError
    assert err.reason == "UNKNOWN"


# --- over a real server ---------------------------------------------------------------------

SERVICE = "agentplex.test.Edge"


def _raiser(name: str) -> BaseException:
    table: dict[str, BaseException] = {
        "tool-not-found": errors.NotFound("x", reason="TOOL_NOT_FOUND"),
        "secret": RuntimeError(SECRET),
        "redis-down": redis.exceptions.ConnectionError("Error 111 connecting to redis"),
    }
    for cls, _, reason in DOMAIN_ERRORS:
        table[reason] = cls(f"{reason.lower()} happened")
    return table[name]


class EdgeServer:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def fail(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        raise _raiser(request.decode())

    async def ok(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"echo:" + request

    async def abort(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await context.abort(grpc.StatusCode.ALREADY_EXISTS, "handler aborted itself")

    async def slow(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await self.release.wait()
        return b"late"

    async def stream(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        yield b"one"
        yield b"two"
        if request:
            raise _raiser(request.decode())
        yield b"three"

    async def write_stream(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> None:
        """The other streaming style grpc.aio allows: write, then return."""
        await context.write(b"one")
        await context.write(b"two")


@pytest.fixture
async def edge() -> AsyncIterator[tuple[str, EdgeServer]]:
    impl = EdgeServer()
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        "Fail": grpc.unary_unary_rpc_method_handler(impl.fail),
        "Ok": grpc.unary_unary_rpc_method_handler(impl.ok),
        "Abort": grpc.unary_unary_rpc_method_handler(impl.abort),
        "Slow": grpc.unary_unary_rpc_method_handler(impl.slow),
        "Stream": grpc.unary_stream_rpc_method_handler(impl.stream),
        "WriteStream": grpc.unary_stream_rpc_method_handler(impl.write_stream),
    }
    server = grpc.aio.server(interceptors=[EdgeInterceptor()])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", impl
    finally:
        impl.release.set()
        await server.stop(None)


@pytest.fixture
async def edge_channel(edge, channel_to) -> grpc.aio.Channel:
    return channel_to(edge[0])


def unary(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(f"/{SERVICE}/{method}")


def server_stream(
    channel: grpc.aio.Channel, method: str
) -> grpc.aio.UnaryStreamMultiCallable[bytes, bytes]:
    return channel.unary_stream(f"/{SERVICE}/{method}")


async def test_domain_error_survives_the_wire(edge_channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary(edge_channel, "Fail")(b"tool-not-found", timeout=5)
    err = caught.value
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert err.details() == "x"
    status = trailer_status(err)
    assert status.code == code_pb2.NOT_FOUND
    info = error_info_of(status)
    assert info.reason == "TOOL_NOT_FOUND"
    assert info.domain == errors.ERROR_DOMAIN

    mapped = errors.from_rpc_error(err)
    assert type(mapped) is errors.NotFound
    assert mapped.message == "x"
    assert str(mapped) == "x"


async def test_from_rpc_error_keeps_the_reason_of_an_aio_error(
    edge_channel: grpc.aio.Channel,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary(edge_channel, "Fail")(b"tool-not-found", timeout=5)
    assert errors.from_rpc_error(caught.value).reason == "TOOL_NOT_FOUND"


async def test_from_rpc_error_keeps_the_reason_of_a_sync_error(edge) -> None:
    """The synchronous API's errors are grpc.Call objects, so there the reason survives."""

    def call() -> errors.AgentplexError:
        with grpc.insecure_channel(edge[0]) as channel:
            fail: grpc.UnaryUnaryMultiCallable[bytes, bytes]
            fail = channel.unary_unary(f"/{SERVICE}/Fail")
            try:
                fail(b"tool-not-found", timeout=5)
            except grpc.RpcError as err:
                return errors.from_rpc_error(err)
        raise AssertionError("the call should have failed")

    mapped = await asyncio.to_thread(call)
    assert type(mapped) is errors.NotFound
    assert mapped.message == "x"
    assert mapped.reason == "TOOL_NOT_FOUND"


@pytest.mark.parametrize(("cls", "code", "reason"), DOMAIN_ERRORS, ids=DOMAIN_IDS)
async def test_every_domain_error_round_trips(
    edge_channel: grpc.aio.Channel,
    cls: type[errors.AgentplexError],
    code: grpc.StatusCode,
    reason: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary(edge_channel, "Fail")(reason.encode(), timeout=5)
    err = caught.value
    assert err.code() is code
    assert err.details() == f"{reason.lower()} happened"
    assert error_info_of(trailer_status(err)).reason == reason
    mapped = errors.from_rpc_error(err)
    assert type(mapped) is cls
    assert mapped.message == f"{reason.lower()} happened"
    assert mapped.reason == reason


async def test_unknown_exception_is_internal_and_leaks_nothing(
    edge_channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="agentplex.runtime.interceptors"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(edge_channel, "Fail")(b"secret", timeout=5)
    err = caught.value
    assert err.code() is grpc.StatusCode.INTERNAL
    assert err.details() == "internal error; the server log has the details"
    assert "hunter2" not in repr(err)
    assert "hunter2" not in repr(err.trailing_metadata())
    assert error_info_of(trailer_status(err)).reason == "INTERNAL"
    # ...but the server log has it, with the method name.
    records = [r for r in caplog.records if r.name == "agentplex.runtime.interceptors"]
    assert records, "an INTERNAL error must be logged server-side"
    assert f"/{SERVICE}/Fail" in records[-1].getMessage()
    assert records[-1].exc_info is not None
    assert "hunter2" in str(records[-1].exc_info[1])

    mapped = errors.from_rpc_error(err)
    assert type(mapped) is errors.AgentplexError
    assert mapped.reason == "INTERNAL"


async def test_redis_connection_error_is_unavailable(edge_channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary(edge_channel, "Fail")(b"redis-down", timeout=5)
    err = caught.value
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert (err.details() or "").startswith("Redis is unavailable: ")
    assert error_info_of(trailer_status(err)).reason == "REDIS_UNAVAILABLE"
    assert type(errors.from_rpc_error(err)) is errors.Unavailable


async def test_handler_abort_passes_through_unchanged(edge_channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary(edge_channel, "Abort")(b"", timeout=5)
    assert caught.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert caught.value.details() == "handler aborted itself"


async def test_success_passes_through(edge_channel: grpc.aio.Channel) -> None:
    assert await unary(edge_channel, "Ok")(b"hi", timeout=5) == b"echo:hi"


async def test_stream_completes_normally(edge_channel: grpc.aio.Channel) -> None:
    call = server_stream(edge_channel, "Stream")(b"", timeout=5)
    assert [item async for item in call] == [b"one", b"two", b"three"]
    assert await call.code() is grpc.StatusCode.OK


async def test_stream_raising_midway_maps_the_error(edge_channel: grpc.aio.Channel) -> None:
    call = server_stream(edge_channel, "Stream")(b"RESOURCE_EXHAUSTED", timeout=5)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for item in call:
            received.append(item)
    assert received == [b"one", b"two"]
    err = caught.value
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details() == "resource_exhausted happened"
    assert error_info_of(trailer_status(err)).reason == "RESOURCE_EXHAUSTED"
    assert type(errors.from_rpc_error(err)) is errors.ResourceExhausted


async def test_stream_unknown_error_midway_is_internal(edge_channel: grpc.aio.Channel) -> None:
    call = server_stream(edge_channel, "Stream")(b"secret", timeout=5)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for item in call:
            received.append(item)
    assert received == [b"one", b"two"]
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    assert "hunter2" not in (caught.value.details() or "")


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
async def test_stream_handler_using_context_write(edge_channel: grpc.aio.Channel) -> None:
    call = server_stream(edge_channel, "WriteStream")(b"", timeout=5)
    assert [item async for item in call] == [b"one", b"two"]


def handled(method: str, code: str) -> float:
    service, name = method.lstrip("/").rsplit("/", 1)
    labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": name}
    value = REGISTRY.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": code})
    # The deprecated name, derived from the same series, says the same.
    assert (
        REGISTRY.get_sample_value("agentplex_rpc_handled_total", {"method": method, "code": code})
        == value
    )
    return value or 0.0


def latency_count(method: str) -> float:
    service, name = method.lstrip("/").rsplit("/", 1)
    labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": name}
    value = REGISTRY.get_sample_value("grpc_server_handling_seconds_count", labels)
    assert (
        REGISTRY.get_sample_value("agentplex_rpc_duration_seconds_count", {"method": method})
        == value
    )
    return value or 0.0


def started(method: str) -> float:
    service, name = method.lstrip("/").rsplit("/", 1)
    labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": name}
    return REGISTRY.get_sample_value("grpc_server_started_total", labels) or 0.0


async def test_edge_counts_calls_by_method_and_final_code(
    edge_channel: grpc.aio.Channel,
) -> None:
    ok, fail = f"/{SERVICE}/Ok", f"/{SERVICE}/Fail"
    before = (handled(ok, "OK"), handled(fail, "NOT_FOUND"), handled(fail, "INTERNAL"))
    before_latency = latency_count(fail)
    before_started = started(ok)

    await unary(edge_channel, "Ok")(b"a", timeout=5)
    await unary(edge_channel, "Ok")(b"b", timeout=5)
    for request in (b"NOT_FOUND", b"secret"):
        with pytest.raises(grpc.aio.AioRpcError):
            await unary(edge_channel, "Fail")(request, timeout=5)

    assert handled(ok, "OK") == before[0] + 2
    assert handled(fail, "NOT_FOUND") == before[1] + 1
    assert handled(fail, "INTERNAL") == before[2] + 1
    assert latency_count(fail) == before_latency + 2
    assert started(ok) == before_started + 2


# --- call_with_deadline ---------------------------------------------------------------------


async def test_call_with_deadline_maps_errors(edge_channel: grpc.aio.Channel) -> None:
    with pytest.raises(errors.PermissionDenied, match="permission_denied happened"):
        await call_with_deadline(unary(edge_channel, "Fail"), b"PERMISSION_DENIED", timeout=5)


async def test_call_with_deadline_returns_the_response(edge_channel: grpc.aio.Channel) -> None:
    assert await call_with_deadline(unary(edge_channel, "Ok"), b"x", timeout=5) == b"echo:x"


async def test_call_with_deadline_times_out(edge_channel: grpc.aio.Channel) -> None:
    with pytest.raises(errors.DeadlineExceeded):
        await call_with_deadline(unary(edge_channel, "Slow"), b"", timeout=0.2)


async def test_call_with_deadline_maps_builtin_timeout() -> None:
    async def rpc(request: object, *, timeout: float) -> object:
        raise TimeoutError

    with pytest.raises(errors.DeadlineExceeded, match="call timed out"):
        await call_with_deadline(rpc, object(), timeout=1)


def test_a_stream_reset_by_a_proxy_is_a_lost_connection() -> None:
    class Reset(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.INTERNAL

        def details(self) -> str:
            return "Received RST_STREAM with error code 2"

        def trailing_metadata(self) -> tuple[()]:
            return ()

    error = errors.from_rpc_error(Reset())
    assert isinstance(error, errors.Unavailable)
    assert "RST_STREAM" in error.message
