"""Envoy to the services over mTLS: with service-to-service TLS on, the gateway reaches
an agent and the registry that accept only mesh certificates, health checks included,
presenting its own identity (`gateway`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import UpstreamTlsContext

from agentplex.contract import agent_tool, callers
from agentplex.gateway.app import ControlPlaneServer
from agentplex.gateway.bootstrap import BootstrapOptions
from agentplex.gateway.envoy import EnvoyProcess
from agentplex.gateway.resources import (
    AGENT_CLUSTER_PREFIX,
    AGENT_HEADER,
    REGISTRY_CLUSTER,
    Directory,
    GatewayOptions,
    HostPort,
    UpstreamTls,
    build,
)
from agentplex.gateway.settings import GatewaySettings
from agentplex.registry import app as registry_app
from agentplex.runtime.clients import open_channel
from agentplex.runtime.peer_auth import peer_identity
from agentplex.runtime.server import ServiceHost
from agentplex.runtime.settings import Settings
from agentplex.runtime.tls import TlsFiles, create_mesh_pki
from agentplex.v1 import (
    agent_service_pb2 as pb,
)
from agentplex.v1 import (
    agent_service_pb2_grpc,
    tool_pb2,
    tool_registry_service_pb2,
    tool_registry_service_pb2_grpc,
)

Eventually = Callable[..., Awaitable[None]]
CardContext = grpc.aio.ServicerContext[pb.GetAgentCardRequest, pb.GetAgentCardResponse]


class WhoAgent(agent_service_pb2_grpc.AgentServiceServicer):
    """An agent whose card names the mesh identity that called it."""

    async def GetAgentCard(
        self, request: pb.GetAgentCardRequest, context: CardContext
    ) -> pb.GetAgentCardResponse:
        response = pb.GetAgentCardResponse()
        response.card.name = "who"
        response.card.description = peer_identity(context) or ""
        return response


def register_who(server: grpc.aio.Server) -> list[str]:
    agent_service_pb2_grpc.add_AgentServiceServicer_to_server(WhoAgent(), server)
    return [callers.AGENT_SERVICE]


def with_tls(settings: Settings, files: TlsFiles, **update: Any) -> Settings:
    values = {"tls_ca_file": files.ca, "tls_cert_file": files.cert, "tls_key_file": files.key}
    return settings.model_copy(update={**values, **update})


@pytest.fixture
async def mtls_mesh(settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[Path, str, str]]:
    """A registry and the `who` agent, both mTLS only, the agent published; yields the
    PKI's directory, the registry's address and the agent's."""
    pki = tmp_path / "pki"
    create_mesh_pki(pki, ["registry", "agent", "gateway", "gateway-control-plane", "cli"])
    registry_host = await registry_app.build_host(
        with_tls(settings, TlsFiles.for_identity(pki, "registry")), metrics_port=None
    )
    registry_host.callers = callers.CALLERS
    agent_host = ServiceHost(
        name="who",
        register=register_who,
        metrics_port=None,
        grace_seconds=0.5,
        tls=TlsFiles.for_identity(pki, "agent"),
        callers=callers.CALLERS,
    )
    async with contextlib.AsyncExitStack() as stack:
        registry = (await registry_host.start()).address
        stack.push_async_callback(registry_host.stop)
        agent = (await agent_host.start()).address
        stack.push_async_callback(agent_host.stop)
        cli = await TlsFiles.for_identity(pki, "cli").load()
        channel = open_channel(registry, tls=cli, server_identity="registry")
        stack.push_async_callback(channel.close)
        stub = tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel)
        tool = agent_tool.definition(agent="who", version="1.0.0", description="who calls")
        tool.endpoint, tool.backend_kind = agent, tool_pb2.BACKEND_KIND_AGENT
        await stub.RegisterTool(tool_registry_service_pb2.RegisterToolRequest(tool=tool), timeout=5)
        yield pki, registry, agent


async def test_envoy_routes_to_services_that_require_client_certificates(
    settings: Settings, mtls_mesh: tuple[Path, str, str], tmp_path: Path, eventually: Eventually
) -> None:
    pki, registry, _ = mtls_mesh
    gateway_files = TlsFiles.for_identity(pki, "gateway")
    control_files = TlsFiles.for_identity(pki, "gateway-control-plane")
    control_settings = with_tls(
        settings,
        control_files,
        registry_address=registry,
        tls_gateway_cert_file=gateway_files.cert,
        tls_gateway_key_file=gateway_files.key,
    )
    control_plane = ControlPlaneServer(
        control_settings,
        GatewaySettings(
            listen_port=0,
            directory_poll_seconds=0.1,
            health_check_interval_seconds=0.5,
            default_agent="who",
        ),
        mesh_tls=await control_files.load(),
    )
    assert control_plane.options.upstream_tls is not None
    await control_plane.start()
    envoy = EnvoyProcess(
        BootstrapOptions(HostPort.parse(control_plane.address), admin_port=0),
        work_dir=tmp_path / "envoy",
        log_path=tmp_path / "envoy" / "envoy.log",
    )
    try:
        admin = await envoy.start()
        listener = await envoy.listener()
        async with (
            grpc.aio.insecure_channel(f"{listener.host}:{listener.port}") as channel,
            httpx.AsyncClient(timeout=2.0) as http,
        ):
            agents = agent_service_pb2_grpc.AgentServiceStub(channel)

            async def card() -> pb.GetAgentCardResponse | None:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    response: pb.GetAgentCardResponse = await agents.GetAgentCard(
                        pb.GetAgentCardRequest(), metadata=((AGENT_HEADER, "who"),), timeout=5
                    )
                    return response
                return None

            async def routed() -> bool:
                return await card() is not None

            await eventually(routed, timeout=20, message="the mTLS agent never became routable")
            answered = await card()
            # The agent saw Envoy's own certificate, not the control plane's.
            assert answered is not None and answered.card.description == "gateway"

            # Health checks pass over the same TLS (only a healthy replica is routed to,
            # and the admin API says so).
            clusters = (await http.get(f"http://{admin.host}:{admin.port}/clusters")).text
            flags = [
                line
                for line in clusters.splitlines()
                if line.startswith(AGENT_CLUSTER_PREFIX + "who::") and "::health_flags::" in line
            ]
            assert flags and all(line.endswith("::healthy") for line in flags)

            # The registry behind Envoy is reached over mTLS too.
            tools = tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel)

            async def listed() -> bool:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    response = await tools.ListTools(
                        tool_registry_service_pb2.ListToolsRequest(), timeout=5
                    )
                    return "agent.who" in {t.name for t in response.tools}
                return False

            await eventually(listed, timeout=20, message="the registry was never reached")
    finally:
        await envoy.stop()
        await control_plane.stop()


def test_mtls_needs_the_gateway_s_own_certificate(settings: Settings, tmp_path: Path) -> None:
    create_mesh_pki(tmp_path, ["gateway-control-plane"])
    files = TlsFiles.for_identity(tmp_path, "gateway-control-plane")
    with pytest.raises(ValueError, match="AGENTPLEX_TLS_GATEWAY_CERT_FILE"):
        ControlPlaneServer(with_tls(settings, files), GatewaySettings(), mesh_tls=files.read())
    with pytest.raises(ValueError, match="mesh credentials"):
        ControlPlaneServer(
            with_tls(
                settings, files, tls_gateway_cert_file=files.cert, tls_gateway_key_file=files.key
            ),
            GatewaySettings(),
        )


def test_clusters_check_each_upstream_s_identity() -> None:
    directory = Directory(
        agents={"who": (HostPort("10.0.0.5", 50060),)}, registry=(HostPort("10.0.0.6", 50052),)
    )
    plain = build(directory, GatewayOptions())
    assert all(c.transport_socket is None for c in plain.clusters)
    upstream = UpstreamTls(ca_file="/m/ca.pem", cert_file="/m/gw.pem", key_file="/m/gw-key.pem")
    secured = build(directory, GatewayOptions(upstream_tls=upstream))
    expected = {AGENT_CLUSTER_PREFIX + "who": "agent", REGISTRY_CLUSTER: "registry"}
    for cluster in secured.clusters:
        assert cluster.transport_socket is not None
        packed = cluster.transport_socket.typed_config
        assert packed is not None
        context = packed.unpack()
        assert isinstance(context, UpstreamTlsContext)
        common = context.common_tls_context
        assert common is not None and common.validation_context is not None
        (san,) = common.validation_context.match_typed_subject_alt_names
        assert san.matcher is not None
        assert san.matcher.exact == f"spiffe://agentplex/{expected[cluster.name]}"
        (certificate,) = common.tls_certificates
        assert certificate.certificate_chain is not None
        assert certificate.certificate_chain.filename == "/m/gw.pem"
        assert common.alpn_protocols == ["h2"]
