"""`agentplex serve envoy`: Envoy alone, found by its control plane's DNS name, drained on
SIGTERM, with its stats reachable but not its admin API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import grpc
import httpx

from agentplex.gateway.app import ControlPlaneServer
from agentplex.gateway.directory import AgentDirectory
from agentplex.gateway.resources import HostPort
from agentplex.gateway.settings import GatewaySettings
from agentplex.mesh.redis_process import free_port

AGENTPLEX = str(Path(sys.executable).with_name("agentplex"))


async def test_serve_envoy_routes_serves_stats_only_and_drains_on_sigterm(
    mesh, tmp_path: Path, eventually
) -> None:
    listen, admin, stats = free_port(), free_port(), free_port()
    control_plane = ControlPlaneServer(
        mesh.settings,
        GatewaySettings(
            listen_port=listen, directory_poll_seconds=0.1, health_check_interval_seconds=0.5
        ),
    )
    await control_plane.start()
    ready_file = tmp_path / "envoy.ready"
    port = control_plane.address.rsplit(":", 1)[1]
    process = await asyncio.create_subprocess_exec(
        AGENTPLEX,
        "serve",
        "envoy",
        "--ready-file",
        str(ready_file),
        env={
            **os.environ,
            # A DNS name, as a Kubernetes Service gives it.
            "AGENTPLEX_GATEWAY_CONTROL_PLANE_ADDRESS": f"localhost:{port}",
            "AGENTPLEX_GATEWAY_ADMIN_PORT": str(admin),
            "AGENTPLEX_GATEWAY_STATS_PORT": str(stats),
            "AGENTPLEX_DRAIN_SECONDS": "2",
        },
        stdout=asyncio.subprocess.DEVNULL,
        stderr=(tmp_path / "envoy.log").open("wb"),
    )
    gateway = f"http://127.0.0.1:{listen}"
    try:
        async with httpx.AsyncClient(timeout=2.0) as http:

            async def ready() -> bool:
                try:
                    return (await http.get(f"{gateway}/ready")).status_code == 200
                except httpx.HTTPError:
                    return False

            await eventually(ready, timeout=30, message="envoy never became ready")
            assert json.loads(ready_file.read_text())["address"] == f"127.0.0.1:{admin}"
            answer = await http.post(
                f"{gateway}/v1/agents/assistant/tasks:run", json={"prompt": "what is 17*23?"}
            )
            assert answer.status_code == 200 and "391" in answer.json()["result"]["output"]

            scraped = await http.get(f"http://127.0.0.1:{stats}/stats/prometheus")
            assert scraped.status_code == 200 and "envoy_cluster_" in scraped.text
            # Nothing else of the admin API is reachable through the stats port.
            for method, path in (("POST", "/quitquitquit"), ("GET", "/config_dump")):
                assert (
                    await http.request(method, f"http://127.0.0.1:{stats}{path}")
                ).status_code == 404
            assert (
                await http.post(f"http://127.0.0.1:{stats}/stats/prometheus")
            ).status_code == 404

            process.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                return (await http.get(f"{gateway}/ready")).status_code == 503

            # Draining: still listening, but the readiness probe fails at once.
            await eventually(not_ready, timeout=2, message="/ready never failed while draining")
            assert await asyncio.wait_for(process.wait(), timeout=20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await control_plane.stop()
    log = (tmp_path / "envoy.log").read_text()
    assert "envoy draining" in log


async def test_the_registry_named_by_dns_reaches_envoy_as_its_addresses(mesh) -> None:
    """A headless Service name for the registry: the directory resolves it on every
    read (Envoy's endpoint discovery takes IPs only)."""
    port = int(mesh.registry.rsplit(":", 1)[1])
    async with grpc.aio.insecure_channel(mesh.registry) as channel:
        directory = await AgentDirectory(channel, [f"localhost:{port}"]).read()
    assert directory.registry == (HostPort("127.0.0.1", port),)
    assert set(directory.agents) >= {"assistant", "researcher", "supervisor"}
