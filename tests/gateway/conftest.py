"""A real gateway in front of the test mesh: the control plane in-process, Envoy as a
process; and agents as processes of their own, for what only a process can do (be
killed, frozen, restarted)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agentplex.gateway.app import ControlPlaneServer
from agentplex.gateway.bootstrap import BootstrapOptions
from agentplex.gateway.envoy import EnvoyProcess
from agentplex.gateway.resources import HostPort
from agentplex.gateway.settings import GatewaySettings
from agentplex.runtime.clients import Keepalive


@dataclass
class Gateway:
    address: str  # host:port of the gateway listener
    admin: str  # base URL of Envoy's admin API
    control_plane: ControlPlaneServer
    envoy: EnvoyProcess
    # One client for the test's own polling: building one per call (its TLS context)
    # costs the event loop, which the in-process mesh shares, tens of milliseconds.
    _http: httpx.AsyncClient | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=2.0)
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def replicas(self, agent: str) -> int:
        listing = (await self.http.get(f"{self.url}/v1/agents")).json()
        return next((a["replicas"] for a in listing["agents"] if a["name"] == agent), 0)

    async def host_stats(self, cluster: str) -> dict[str, dict[str, str]]:
        """Per-replica stats of one cluster from Envoy's admin API: {host: {stat: value}}.

        Only replicas (`host:port` keys): the cluster-wide lines of /clusters
        (`outlier::…`, `default_priority::…`) are left out."""
        text = (await self.http.get(f"{self.admin}/clusters")).text
        hosts: dict[str, dict[str, str]] = {}
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == cluster and ":" in parts[1]:
                hosts.setdefault(parts[1], {})[parts[2]] = parts[3]
        return hosts


async def start_control_plane(
    mesh, keepalive: Keepalive | None = None, **gateway_settings
) -> ControlPlaneServer:
    """The control plane over the test's mesh; `keepalive` replaces the mesh-wide keepalive
    settings (which Envoy's upstream connections follow)."""
    settings = GatewaySettings(
        listen_port=0,
        directory_poll_seconds=0.1,
        health_check_interval_seconds=0.5,
        **gateway_settings,
    )
    shared = mesh.settings
    if keepalive is not None:
        shared = shared.model_copy(
            update={
                "keepalive_seconds": keepalive.seconds,
                "keepalive_timeout_seconds": keepalive.timeout_seconds,
            }
        )
    server = ControlPlaneServer(shared, settings)
    await server.start()
    return server


@pytest.fixture
async def start_gateway(mesh, tmp_path: Path, eventually):
    """`await start_gateway(keepalive=…, **gateway_settings)`: a gateway (control plane +
    Envoy) over the test's mesh, ready to route to the default agent; stopped after the
    test. A test that replaces `gateway.control_plane` gets the replacement stopped
    instead."""
    started: list[Gateway] = []

    async def start(keepalive: Keepalive | None = None, **gateway_settings) -> Gateway:
        index = len(started)
        control_plane = await start_control_plane(mesh, keepalive, **gateway_settings)
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
            return (await gateway.http.get(f"{gateway.url}/ready")).status_code == 200

        await eventually(ready, timeout=20, message="the gateway never became ready")
        return gateway

    try:
        yield start
    finally:
        for gateway in reversed(started):
            await gateway.close()
            await gateway.envoy.stop()
            await gateway.control_plane.stop()


@pytest.fixture
async def gateway(start_gateway) -> Gateway:
    return await start_gateway()


@dataclass
class AgentProcess:
    process: asyncio.subprocess.Process
    address: str

    @property
    def pid(self) -> int:
        return self.process.pid


@pytest.fixture
async def agent_process(mesh, tmp_path):
    """`await agent_process("assistant", AGENTPLEX_…="…")`: `python -m agentplex.agents` as
    its own process on the test's mesh (extra environment as keywords), once it has
    published its address. Killed after the test, woken first if a test froze it."""
    processes: list[asyncio.subprocess.Process] = []
    settings = mesh.settings
    base_env = {
        **os.environ,
        "AGENTPLEX_REDIS_URL": settings.redis_url,
        "AGENTPLEX_KEY_PREFIX": settings.key_prefix,
        "AGENTPLEX_MEMORY_ADDRESS": settings.memory_address,
        "AGENTPLEX_REGISTRY_ADDRESS": settings.registry_address,
        "AGENTPLEX_DOCS_DIR": str(settings.docs_dir),
        "AGENTPLEX_HEALTH_INTERVAL_SECONDS": "0.2",
        "AGENTPLEX_GRACE_SECONDS": "1",
        "AGENTPLEX_DRAIN_SECONDS": "0",
    }

    async def start(agent: str, **env: str) -> AgentProcess:
        index = len(processes)
        ready = tmp_path / f"agent-{index}.ready"
        log_path = tmp_path / f"agent-{index}.log"
        with log_path.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agentplex.agents",
                "--agent",
                agent,
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--ready-file",
                str(ready),
                env={**base_env, **env},
                stdout=log_file,
                stderr=log_file,
            )
        processes.append(process)

        give_up = time.monotonic() + 30
        while not ready.exists() and process.returncode is None:
            assert time.monotonic() < give_up, "the agent process did not start"
            await asyncio.sleep(0.05)
        if process.returncode is not None:
            raise AssertionError(log_path.read_text(errors="replace")[-3000:])
        return AgentProcess(process, json.loads(ready.read_text())["address"])

    try:
        yield start
    finally:
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
                    process.kill()
                await process.wait()
