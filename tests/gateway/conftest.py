"""A real gateway in front of the test mesh: the control plane in-process, Envoy as a process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agentplex.gateway.app import ControlPlaneServer
from agentplex.gateway.bootstrap import BootstrapOptions
from agentplex.gateway.envoy import EnvoyProcess
from agentplex.gateway.resources import HostPort
from agentplex.gateway.settings import GatewaySettings


@dataclass
class Gateway:
    address: str  # host:port of the gateway listener
    admin: str  # base URL of Envoy's admin API
    control_plane: ControlPlaneServer
    envoy: EnvoyProcess

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    async def replicas(self, agent: str) -> int:
        async with httpx.AsyncClient(timeout=2.0) as client:
            listing = (await client.get(f"{self.url}/v1/agents")).json()
        return next((a["replicas"] for a in listing["agents"] if a["name"] == agent), 0)

    async def host_stats(self, cluster: str) -> dict[str, dict[str, str]]:
        """Per-replica stats of one cluster from Envoy's admin API: {host: {stat: value}}.

        Only replicas (`host:port` keys): the cluster-wide lines of /clusters
        (`outlier::…`, `default_priority::…`) are left out."""
        async with httpx.AsyncClient(timeout=2.0) as client:
            text = (await client.get(f"{self.admin}/clusters")).text
        hosts: dict[str, dict[str, str]] = {}
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == cluster and ":" in parts[1]:
                hosts.setdefault(parts[1], {})[parts[2]] = parts[3]
        return hosts


async def start_control_plane(mesh, **gateway_settings) -> ControlPlaneServer:
    settings = GatewaySettings(
        listen_port=0,
        directory_poll_seconds=0.1,
        health_check_interval_seconds=0.5,
        **gateway_settings,
    )
    server = ControlPlaneServer(mesh.settings, settings)
    await server.start()
    return server


@pytest.fixture
async def start_gateway(mesh, tmp_path: Path, eventually):
    """`await start_gateway(**gateway_settings)`: a gateway (control plane + Envoy) over the
    test's mesh, ready to route to the default agent; stopped after the test. A test
    that replaces `gateway.control_plane` gets the replacement stopped instead."""
    started: list[Gateway] = []

    async def start(**gateway_settings) -> Gateway:
        index = len(started)
        control_plane = await start_control_plane(mesh, **gateway_settings)
        envoy = EnvoyProcess(
            BootstrapOptions(HostPort.parse(control_plane.address), admin_port=0),
            work_dir=tmp_path / f"envoy-{index}",
            log_path=tmp_path / f"envoy-{index}" / "envoy.log",
        )
        gateway = Gateway(address="", admin="", control_plane=control_plane, envoy=envoy)
        started.append(gateway)
        admin = await envoy.start()
        listener = await envoy.listener()
        gateway.address = f"{listener.host}:{listener.port}"
        gateway.admin = f"http://{admin.host}:{admin.port}"

        async def ready() -> bool:
            async with httpx.AsyncClient(timeout=2.0) as client:
                return (await client.get(f"{gateway.url}/ready")).status_code == 200

        await eventually(ready, timeout=20, message="the gateway never became ready")
        return gateway

    try:
        yield start
    finally:
        for gateway in reversed(started):
            await gateway.envoy.stop()
            await gateway.control_plane.stop()


@pytest.fixture
async def gateway(start_gateway) -> Gateway:
    return await start_gateway()
