"""Stopping the gateway's control plane: NOT_SERVING before anything else goes, and
stop is safe to call twice, concurrently or not (as every part of the mesh is)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2

from agentplex.gateway.app import ControlPlaneProcess, ControlPlaneServer
from agentplex.gateway.settings import GatewaySettings
from agentplex.runtime.clients import health_status, open_channel

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(address: str) -> int:
    channel = open_channel(address)
    try:
        return await health_status(channel, timeout=5)
    finally:
        await channel.close()


async def _serving(server: ControlPlaneServer) -> bool:
    return await _health(server.address) == SERVING


@pytest.fixture
async def control_plane(mesh):
    """A started control plane over the test's mesh; stopped afterwards (again)."""
    server = ControlPlaneServer(
        mesh.settings, GatewaySettings(listen_port=0, directory_poll_seconds=0.1)
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_stop_says_not_serving_first_and_runs_once(control_plane, eventually) -> None:
    server = control_plane
    await eventually(lambda: _serving(server), message="the control plane never served")

    # Hold the first stop in its second step (polling), with the server still listening.
    release = asyncio.Event()
    seen: list[int] = []
    stop_poller = server._stop_poller

    async def held() -> None:
        seen.append(await _health(server.address))
        await release.wait()
        await stop_poller()

    server._stop_poller = held
    first = asyncio.create_task(server.stop())
    await eventually(lambda: len(seen) == 1, message="the first stop never reached polling")
    assert seen == [NOT_SERVING]  # while everything else is still up

    second = asyncio.create_task(server.stop())
    await asyncio.sleep(0)  # let it run as far as it can
    assert not second.done()  # waits for the first, instead of returning early
    release.set()
    await asyncio.gather(first, second)
    assert seen == [NOT_SERVING]  # the steps ran once

    await server.stop()  # and once more, after the fact: nothing to do
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _health(server.address)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_control_plane_that_never_started_stops_cleanly(mesh) -> None:
    server = ControlPlaneServer(mesh.settings, GatewaySettings(listen_port=0))
    await asyncio.gather(server.stop(), server.stop())
    await server.stop()


async def test_the_process_part_stops_once_however_often_asked(control_plane) -> None:
    server = control_plane
    part = ControlPlaneProcess(server, port=0, metrics_port=0)
    calls = 0
    server_stop = server.stop

    async def counted() -> None:
        nonlocal calls
        calls += 1
        await server_stop()

    server.stop = counted
    await asyncio.gather(part.stop(), part.stop(), part.stop())
    await part.stop()
    assert calls == 1
