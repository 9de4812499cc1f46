"""ServiceHost with real gRPC servers: health from dependency checks, reflection, the
metrics endpoint, and graceful, idempotent shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from agentplex.memory import app as memory_app
from agentplex.mesh.redis_process import free_port
from agentplex.runtime.process import Endpoint, write_ready_file
from agentplex.runtime.server import ServiceHost
from agentplex.runtime.settings import Settings

PROBE = "agentplex.test.Probe"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Probe:
    """A tiny service: Ping answers at once, Wait blocks until released."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def ping(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"pong"

    async def wait(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.entered.set()
        await self.release.wait()
        return b"done"

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
            "Ping": grpc.unary_unary_rpc_method_handler(self.ping),
            "Wait": grpc.unary_unary_rpc_method_handler(self.wait),
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(PROBE, handlers)])
        return [PROBE]


class Switch:
    """A dependency check that passes or fails on demand and counts its calls."""

    def __init__(self) -> None:
        self.ok = True
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if not self.ok:
            raise ConnectionError("dependency is down")


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def make_host(probe: Probe) -> AsyncIterator[Callable[..., ServiceHost]]:
    hosts: list[ServiceHost] = []

    def make(**options: Any) -> ServiceHost:
        defaults: dict[str, Any] = {
            "name": "probe",
            "register": probe.register,
            "metrics_port": None,
            "health_interval_seconds": 0.05,
            "grace_seconds": 2.0,
        }
        host = ServiceHost(**{**defaults, **options})
        hosts.append(host)
        return host

    try:
        yield make
    finally:
        probe.release.set()
        for host in hosts:
            await host.stop()


async def health_of(channel: grpc.aio.Channel, service: str = "") -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]  # types-grpcio-health-checking's HealthStub declares no methods
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return int(response.status)


def probe_method(
    channel: grpc.aio.Channel, name: str
) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(f"/{PROBE}/{name}")


async def wait_call(channel: grpc.aio.Channel) -> bytes:
    return await probe_method(channel, "Wait")(b"", timeout=10)


async def ping(channel: grpc.aio.Channel) -> bytes:
    return await probe_method(channel, "Ping")(b"", timeout=5)


# --- start and health -----------------------------------------------------------------------


async def test_starts_on_a_free_port(make_host, channel_to) -> None:
    endpoint = await make_host().start()
    host, _, port = endpoint.address.rpartition(":")
    assert host == "127.0.0.1"
    assert int(port) > 0
    assert endpoint.metrics_port is None
    assert await ping(channel_to(endpoint.address)) == b"pong"


async def test_two_hosts_get_different_ports(make_host) -> None:
    first = await make_host().start()
    second = await make_host(name="probe-2").start()
    assert first.address != second.address


async def test_async_context_manager_starts_and_stops(probe: Probe, channel_to) -> None:
    host = ServiceHost(name="probe", register=probe.register, metrics_port=None, grace_seconds=1)
    async with host as endpoint:
        assert isinstance(endpoint, Endpoint)
        channel = channel_to(endpoint.address)
        assert await ping(channel) == b"pong"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ping(channel)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_health_serving_without_dependencies(make_host, channel_to) -> None:
    channel = channel_to((await make_host().start()).address)
    assert await health_of(channel) == SERVING
    assert await health_of(channel, PROBE) == SERVING


async def test_health_follows_dependency_checks(make_host, channel_to, eventually) -> None:
    healthy, flaky = Switch(), Switch()
    host = make_host(dependency_checks=[healthy, flaky])
    channel = channel_to((await host.start()).address)
    assert await health_of(channel) == SERVING
    assert await health_of(channel, PROBE) == SERVING

    flaky.ok = False

    async def status_is(expected: int) -> bool:
        return await health_of(channel) == expected and await health_of(channel, PROBE) == expected

    await eventually(lambda: status_is(NOT_SERVING), message="health never went NOT_SERVING")
    # The service itself still answers: health says "do not route here", nothing more.
    assert await ping(channel) == b"pong"

    flaky.ok = True
    await eventually(lambda: status_is(SERVING), message="health never came back to SERVING")
    calls = flaky.calls
    await eventually(lambda: flaky.calls > calls, message="dependency checks stopped running")


async def test_failing_dependency_at_start_is_not_serving(make_host, channel_to) -> None:
    down = Switch()
    down.ok = False
    channel = channel_to((await make_host(dependency_checks=[down]).start()).address)
    assert await health_of(channel) == NOT_SERVING
    assert await health_of(channel, PROBE) == NOT_SERVING


async def test_hanging_dependency_check_times_out_to_not_serving(make_host, channel_to) -> None:
    async def hangs() -> None:
        await asyncio.Event().wait()

    started = time.monotonic()
    channel = channel_to((await make_host(dependency_checks=[hangs]).start()).address)
    # The check is bounded by max(health_interval_seconds, 1.0).
    assert time.monotonic() - started < 5
    assert await health_of(channel) == NOT_SERVING


async def test_health_of_an_unknown_service_is_not_found(make_host, channel_to) -> None:
    channel = channel_to((await make_host().start()).address)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_of(channel, "no.such.Service")
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


# --- reflection -----------------------------------------------------------------------------


async def reflect(
    channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    # The method by hand: types-grpcio-reflection types the generated stub for sync channels.
    info: grpc.aio.StreamStreamMultiCallable[
        reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse
    ] = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    call = info(iter([request]), timeout=5)
    responses = [response async for response in call]
    assert len(responses) == 1
    return responses[0]


async def test_reflection_lists_the_services(make_host, channel_to) -> None:
    channel = channel_to((await make_host().start()).address)
    response = await reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {service.name for service in response.list_services_response.service}
    assert names == {PROBE, HEALTH, REFLECTION, REFLECTION_V1}


async def test_reflection_serves_the_memory_contract(settings: Settings, channel_to) -> None:
    from google.protobuf import descriptor_pb2

    host = memory_app.build_host(settings, metrics_port=None)
    try:
        channel = channel_to((await host.start()).address)
        listed = await reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {service.name for service in listed.list_services_response.service}
        assert names == {"agentplex.v1.MemoryService", HEALTH, REFLECTION, REFLECTION_V1}

        found = await reflect(
            channel,
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="agentplex.v1.MemoryService"
            ),
        )
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in found.file_descriptor_response.file_descriptor_proto
        ]
        service_file = next(f for f in files if f.name == "agentplex/v1/memory_service.proto")
        methods = {m.name for m in service_file.service[0].method}
        assert methods == {
            "AppendMessages",
            "LoadContext",
            "ClearSession",
            "ReadMessages",
            "StoreSummary",
        }
    finally:
        await host.stop()


# --- metrics --------------------------------------------------------------------------------


async def test_metrics_endpoint_serves_prometheus_text(make_host, channel_to) -> None:
    endpoint = await make_host(metrics_port=0).start()
    assert isinstance(endpoint.metrics_port, int)
    assert endpoint.metrics_port > 0
    await ping(channel_to(endpoint.address))

    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"http://127.0.0.1:{endpoint.metrics_port}/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    service, method = f"{PROBE}/Ping".rsplit("/", 1)
    rpc = f'grpc_method="{method}",grpc_service="{service}",grpc_type="unary"'
    assert "# TYPE grpc_server_handled_total counter" in text
    assert f"grpc_server_started_total{{{rpc}}}" in text
    assert f'grpc_server_handled_total{{grpc_code="OK",{rpc}}}' in text
    assert f"grpc_server_handling_seconds_count{{{rpc}}}" in text
    # Health checks are not traffic; the deprecated names are still served.
    assert "grpc.health.v1.Health" not in text
    assert f'agentplex_rpc_handled_total{{code="OK",method="/{PROBE}/Ping"}}' in text
    assert f'agentplex_rpc_duration_seconds_count{{method="/{PROBE}/Ping"}}' in text


async def test_metrics_endpoint_closes_on_stop(make_host) -> None:
    host = make_host(metrics_port=0)
    endpoint = await host.start()
    await host.stop()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(timeout=2) as client:
            await client.get(f"http://127.0.0.1:{endpoint.metrics_port}/metrics")


async def test_failed_start_leaves_nothing_listening(make_host, channel_to) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        grpc_port = free_port()
        host = make_host(port=grpc_port, metrics_port=taken.getsockname()[1])
        with pytest.raises(OSError):
            await host.start()
    with pytest.raises(grpc.aio.AioRpcError):
        await ping(channel_to(f"127.0.0.1:{grpc_port}"))


async def test_start_on_a_taken_port_fails(make_host) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host = make_host(port=taken.getsockname()[1])
        # grpcio raises RuntimeError itself, so ServiceHost's `bound == 0` branch never runs.
        with pytest.raises((OSError, RuntimeError)):
            await host.start()


# --- stopping -------------------------------------------------------------------------------


async def test_stop_is_idempotent_and_runs_hooks_once(make_host, channel_to) -> None:
    stopped: list[str] = []

    async def hook() -> None:
        stopped.append("hook")

    host = make_host(on_stop=[hook])
    channel = channel_to((await host.start()).address)
    await host.stop()
    await host.stop()
    await asyncio.gather(host.stop(), host.stop())
    assert stopped == ["hook"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ping(channel)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_concurrent_stops_all_wait_for_the_first(make_host) -> None:
    order: list[str] = []

    async def slow_hook() -> None:
        await asyncio.sleep(0.05)
        order.append("hook")

    host = make_host(on_stop=[slow_hook])
    await host.start()

    async def stopper(name: str) -> None:
        await host.stop()
        order.append(name)

    await asyncio.gather(stopper("first"), stopper("second"))
    assert order[0] == "hook"
    assert sorted(order[1:]) == ["first", "second"]


async def test_stop_without_start_is_harmless(make_host) -> None:
    host = make_host()
    await host.stop()
    await host.stop()


async def host_health(host: ServiceHost, service: str = "") -> int:
    """The host's own health table, read without an RPC (a stopping server takes none)."""
    assert host._health is not None
    response = await host._health.Check(health_pb2.HealthCheckRequest(service=service), None)  # type: ignore[arg-type]  # no RPC: only an unknown service reads the context
    return int(response.status)


async def test_stop_sets_not_serving_then_lets_in_flight_calls_finish(
    make_host, probe: Probe, channel_to, eventually
) -> None:
    host = make_host(grace_seconds=5.0)
    channel = channel_to((await host.start()).address)
    in_flight = asyncio.create_task(wait_call(channel))
    stopping: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(probe.entered.wait(), timeout=5)
        assert await host_health(host) == SERVING

        started = time.monotonic()
        stopping = asyncio.create_task(host.stop())

        async def drained() -> bool:
            return (
                await host_health(host) == NOT_SERVING
                and await host_health(host, PROBE) == NOT_SERVING
            )

        await eventually(drained, message="stop() never set NOT_SERVING")
        assert not stopping.done(), "stop() must wait for the in-flight call"
        assert not in_flight.done()

        probe.release.set()
        assert await asyncio.wait_for(in_flight, timeout=5) == b"done"
        await asyncio.wait_for(stopping, timeout=5)
        assert time.monotonic() - started < 5.0, "stop() should return once calls are done"
        # Once stopped, health stays NOT_SERVING (graceful shutdown ignores later sets).
        await host._set_health(True)
        assert await host_health(host) == NOT_SERVING
    finally:
        probe.release.set()
        await asyncio.gather(in_flight, return_exceptions=True)
        if stopping is not None:
            await asyncio.gather(stopping, return_exceptions=True)


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
async def test_health_watch_streams_status_changes(make_host, channel_to, eventually) -> None:
    check = Switch()
    host = make_host(dependency_checks=[check])
    channel = channel_to((await host.start()).address)
    watch = health_pb2_grpc.HealthStub(channel).Watch(  # type: ignore[attr-defined]  # types-grpcio-health-checking's HealthStub declares no methods
        health_pb2.HealthCheckRequest(service=PROBE), timeout=10
    )
    statuses: list[int] = []

    async def read() -> None:
        async for response in watch:
            statuses.append(int(response.status))

    reader = asyncio.create_task(read())
    try:
        await eventually(lambda: statuses == [SERVING] or reader.done(), timeout=5)
        check.ok = False
        await eventually(lambda: NOT_SERVING in statuses or reader.done(), timeout=5)
        assert statuses == [SERVING, NOT_SERVING]
    finally:
        watch.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def test_in_flight_call_past_grace_is_cancelled(make_host, probe: Probe, channel_to) -> None:
    host = make_host(grace_seconds=0.3)
    channel = channel_to((await host.start()).address)
    in_flight = asyncio.create_task(wait_call(channel))
    await asyncio.wait_for(probe.entered.wait(), timeout=5)

    started = time.monotonic()
    await asyncio.wait_for(host.stop(), timeout=5)
    assert time.monotonic() - started < 3

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(in_flight, timeout=5)
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


async def test_dependency_watch_stops_with_the_host(make_host, eventually) -> None:
    check = Switch()
    host = make_host(dependency_checks=[check])
    await host.start()
    await eventually(lambda: check.calls >= 2, message="dependency checks never repeated")
    await host.stop()
    calls = check.calls
    await asyncio.sleep(0.2)  # several health intervals: the watch must stay stopped
    assert check.calls == calls


# --- ready file -----------------------------------------------------------------------------


def test_write_ready_file_is_complete_json(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "ready.json"
    write_ready_file(path, Endpoint(address="127.0.0.1:1234", metrics_port=None))
    assert json.loads(path.read_text()) == {
        "address": "127.0.0.1:1234",
        "metrics_port": None,
        "pid": os.getpid(),
    }
    assert not path.with_suffix(".json.tmp").exists()


async def test_a_port_in_use_is_refused_not_shared(make_host) -> None:
    """gRPC would share a port through SO_REUSEPORT; a second mesh must fail instead."""
    first = await make_host().start()
    port = int(first.address.rsplit(":", 1)[1])
    with pytest.raises(OSError, match="cannot listen"):
        await make_host(port=port).start()
