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
from grpc_health.v1 import health_pb2

from agentplex.contract import agent_tool, callers
from agentplex.contract.access import ACCESS
from agentplex.gateway.app import ControlPlaneServer
from agentplex.gateway.bootstrap import BootstrapOptions
from agentplex.gateway.edge import options_from
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
from agentplex.mesh.redis_process import free_port
from agentplex.registry import app as registry_app
from agentplex.runtime.clients import health_status, open_channel
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
SERVING = health_pb2.HealthCheckResponse.SERVING
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
    registry_host.access = ACCESS
    agent_host = ServiceHost(
        name="who",
        register=register_who,
        metrics_port=None,
        grace_seconds=0.5,
        tls=TlsFiles.for_identity(pki, "agent"),
        access=ACCESS,
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


async def test_envoy_boots_from_a_control_plane_that_serves_xds_over_mtls(
    settings: Settings, mtls_mesh: tuple[Path, str, str], tmp_path: Path
) -> None:
    """The xDS port serves mTLS and answers only Envoy's identity; probes without a
    certificate get the plaintext health port, which serves nothing else."""
    pki, registry, _ = mtls_mesh
    gateway_files = TlsFiles.for_identity(pki, "gateway")
    control_files = TlsFiles.for_identity(pki, "gateway-control-plane")
    control_plane = ControlPlaneServer(
        with_tls(
            settings,
            control_files,
            registry_address=registry,
            tls_gateway_cert_file=gateway_files.cert,
            tls_gateway_key_file=gateway_files.key,
        ),
        GatewaySettings(listen_port=0, directory_poll_seconds=0.1, default_agent="who"),
        mesh_tls=await control_files.load(),
        xds_tls=control_files,
        health_port=free_port(),
    )
    await control_plane.start()
    xds_tls = UpstreamTls(
        ca_file=str(gateway_files.ca),
        cert_file=str(gateway_files.cert),
        key_file=str(gateway_files.key),
    )
    envoy = EnvoyProcess(
        BootstrapOptions(HostPort.parse(control_plane.address), admin_port=0, xds_tls=xds_tls),
        work_dir=tmp_path / "envoy",
        log_path=tmp_path / "envoy" / "envoy.log",
    )
    try:
        await envoy.start()
        # LDS answered over mTLS: the listener exists only in what the control plane sent.
        await envoy.listener(timeout=20)

        # Another mesh identity completes the handshake, gets health, and nothing else.
        cli = await TlsFiles.for_identity(pki, "cli").load()
        async with open_channel(
            control_plane.address, tls=cli, server_identity="gateway-control-plane"
        ) as channel:
            assert await health_status(channel, timeout=5) == SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ads(channel)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # No certificate: no handshake on the xDS port; the health port answers.
        host, _, _ = control_plane.address.rpartition(":")
        async with grpc.aio.insecure_channel(control_plane.address) as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_status(plain, timeout=2)
        async with grpc.aio.insecure_channel(f"{host}:{control_plane.health_port}") as probe:
            assert await health_status(probe, timeout=5) == SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await ads(probe)
            assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await envoy.stop()
        await control_plane.stop()


async def ads(channel: grpc.aio.Channel) -> None:
    """One call of ADS's method: refused on its headers, before any message is read."""
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
    )
    await method(b"", timeout=5)


async def test_a_service_serves_plaintext_health_beside_mtls(tmp_path: Path) -> None:
    create_mesh_pki(tmp_path, ["agent"])
    host = ServiceHost(
        name="who",
        register=register_who,
        metrics_port=None,
        grace_seconds=0.5,
        tls=TlsFiles.for_identity(tmp_path, "agent"),
        access=ACCESS,
        health_port=free_port(),
    )
    async with (
        host as endpoint,
        grpc.aio.insecure_channel(f"127.0.0.1:{host.health_port}") as probe,
    ):
        assert await health_status(probe, timeout=5) == SERVING
        # Only health: the agent's service is not on the plaintext port.
        agents = agent_service_pb2_grpc.AgentServiceStub(probe)
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await agents.GetAgentCard(pb.GetAgentCardRequest(), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(endpoint.address) as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_status(plain, timeout=2)


def test_envoy_uses_mtls_to_a_control_plane_off_loopback(
    settings: Settings, tmp_path: Path
) -> None:
    create_mesh_pki(tmp_path, ["gateway"])
    files = TlsFiles.for_identity(tmp_path, "gateway")
    mesh = with_tls(settings, files)
    remote = options_from(
        GatewaySettings(control_plane_address="gateway-control-plane:50051"), mesh
    )
    assert remote.xds_tls == UpstreamTls(str(files.ca), str(files.cert), str(files.key))
    # `agentplex up`: the control plane on loopback serves plaintext; so does no mTLS.
    local = GatewaySettings(control_plane_address="127.0.0.1:50051")
    assert options_from(local, mesh).xds_tls is None
    assert options_from(GatewaySettings(control_plane_address="cp:50051"), settings).xds_tls is None
