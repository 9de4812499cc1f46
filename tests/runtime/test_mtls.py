"""Service-to-service mTLS over real gRPC on loopback: the handshake refuses clients
without a mesh certificate, and servers authorize callers by certificate identity."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from pydantic import ValidationError

from agentplex.contract import callers
from agentplex.contract.access import ACCESS
from agentplex.runtime import principal as principals
from agentplex.runtime import tls
from agentplex.runtime.clients import health_status, open_channel
from agentplex.runtime.peer_auth import refusal
from agentplex.runtime.server import ServiceHost
from agentplex.runtime.settings import Settings
from agentplex.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    memory_service_pb2,
    memory_service_pb2_grpc,
)

IDENTITIES = ("memory", "agent", "tools", "gateway", "cli")
AgentContext = grpc.aio.ServicerContext[
    agent_service_pb2.StreamStepsRequest, agent_service_pb2.StreamStepsResponse
]
MemoryContext = grpc.aio.ServicerContext[
    memory_service_pb2.LoadContextRequest, memory_service_pb2.LoadContextResponse
]


class FakeMemory(memory_service_pb2_grpc.MemoryServiceServicer):
    async def LoadContext(
        self, request: memory_service_pb2.LoadContextRequest, context: MemoryContext
    ) -> memory_service_pb2.LoadContextResponse:
        response = memory_service_pb2.LoadContextResponse(token_count=7)
        response.summary.content = principals.current().tenant  # who the call acted for
        return response


class FakeAgent(agent_service_pb2_grpc.AgentServiceServicer):
    async def StreamSteps(
        self, request: agent_service_pb2.StreamStepsRequest, context: AgentContext
    ) -> AsyncIterator[agent_service_pb2.StreamStepsResponse]:
        for _ in range(2):
            yield agent_service_pb2.StreamStepsResponse()


def register(server: grpc.aio.Server) -> Sequence[str]:
    memory_service_pb2_grpc.add_MemoryServiceServicer_to_server(FakeMemory(), server)
    agent_service_pb2_grpc.add_AgentServiceServicer_to_server(FakeAgent(), server)
    return [callers.MEMORY_SERVICE, callers.AGENT_SERVICE]


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    tls.create_mesh_pki(directory, IDENTITIES)
    return directory


def credentials(pki: Path, identity: str) -> tls.MeshTls:
    return tls.TlsFiles.for_identity(pki, identity).read()


@pytest.fixture
async def server(pki: Path) -> AsyncIterator[str]:
    """A mesh server with identity `memory`, serving Memory and AgentService."""
    host = ServiceHost(
        name="mtls",
        register=register,
        metrics_port=None,
        grace_seconds=0.5,
        tls=tls.TlsFiles.for_identity(pki, "memory"),
        access=ACCESS,
    )
    endpoint = await host.start()
    yield endpoint.address
    await host.stop()


async def load_context(channel: grpc.aio.Channel) -> memory_service_pb2.LoadContextResponse:
    stub = memory_service_pb2_grpc.MemoryServiceStub(channel)
    response: memory_service_pb2.LoadContextResponse = await stub.LoadContext(
        memory_service_pb2.LoadContextRequest(), timeout=5
    )
    return response


async def stream_steps(channel: grpc.aio.Channel) -> int:
    stub = agent_service_pb2_grpc.AgentServiceStub(channel)
    return len(
        [r async for r in stub.StreamSteps(agent_service_pb2.StreamStepsRequest(), timeout=5)]
    )


async def test_an_allowed_identity_is_served(server: str, pki: Path) -> None:
    async with open_channel(
        server, tls=credentials(pki, "agent"), server_identity="memory"
    ) as channel:
        assert (await load_context(channel)).token_count == 7
    async with open_channel(
        server, tls=credentials(pki, "gateway"), server_identity="memory"
    ) as channel:
        assert await stream_steps(channel) == 2
    # Naming no identity would accept any mesh certificate (they share localhost's names).
    with pytest.raises(ValueError, match="must name the server's mesh identity"):
        open_channel(server, tls=credentials(pki, "gateway"))


async def test_another_services_identity_is_denied_by_name(server: str, pki: Path) -> None:
    async with open_channel(server, tls=credentials(pki, "tools"), server_identity="memory") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await load_context(ch)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'tools'" in (refused.value.details() or "")
        assert callers.MEMORY_SERVICE in (refused.value.details() or "")
        # Streams are checked too, before the first message.
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            await stream_steps(ch)
        assert streamed.value.code() == grpc.StatusCode.PERMISSION_DENIED


def acting_for(tenant: str, vouched_by: str, *granted: str) -> tuple[tuple[str, str], ...]:
    return (
        (principals.TENANT_HEADER, tenant),
        (principals.SCOPE_HEADER, " ".join(granted)),
        (principals.PRINCIPAL_HEADER, vouched_by),
    )


async def test_only_the_asserting_identities_may_name_a_principal(server: str, pki: Path) -> None:
    memory_call = memory_service_pb2.LoadContextRequest()
    async with open_channel(server, tls=credentials(pki, "agent"), server_identity="memory") as ch:
        memory = memory_service_pb2_grpc.MemoryServiceStub(ch)
        carried = await memory.LoadContext(
            memory_call, metadata=acting_for("acme", principals.DELEGATED), timeout=5
        )
        assert carried.summary.content == "acme"  # bound for the handler
        assert (await memory.LoadContext(memory_call, timeout=5)).summary.content == "default"
    # The CLI may call agents, but not on anyone's behalf: it is the operator.
    async with open_channel(server, tls=credentials(pki, "cli"), server_identity="memory") as ch:
        agent = agent_service_pb2_grpc.AgentServiceStub(ch)
        forged = agent.StreamSteps(
            agent_service_pb2.StreamStepsRequest(),
            metadata=acting_for("acme", principals.EDGE, "tasks:run"),
            timeout=5,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await forged.read()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'cli' may not act for a principal" in (refused.value.details() or "")
    # The gateway vouches for tokens; the method's scope decides.
    async with open_channel(
        server, tls=credentials(pki, "gateway"), server_identity="memory"
    ) as ch:
        agent = agent_service_pb2_grpc.AgentServiceStub(ch)
        unscoped = agent.StreamSteps(
            agent_service_pb2.StreamStepsRequest(),
            metadata=acting_for("acme", principals.EDGE, "tasks:read"),
            timeout=5,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await unscoped.read()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "needs the scope 'tasks:run'" in (refused.value.details() or "")
        scoped = agent.StreamSteps(
            agent_service_pb2.StreamStepsRequest(),
            metadata=acting_for("acme", principals.EDGE, "tasks:run"),
            timeout=5,
        )
        assert len([step async for step in scoped]) == 2


async def test_health_and_reflection_answer_any_mesh_identity(server: str, pki: Path) -> None:
    async with open_channel(server, tls=credentials(pki, "tools"), server_identity="memory") as ch:
        assert await health_status(ch, timeout=5) == health_pb2.HealthCheckResponse.SERVING
        reflect = ch.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        answers = [a async for a in reflect(iter([ask]), timeout=5)]
        listed = {s.name for s in answers[0].list_services_response.service}
        assert callers.MEMORY_SERVICE in listed


async def test_a_client_without_a_certificate_cannot_connect(server: str, pki: Path) -> None:
    # The server ends the handshake; TLS reports that to the client as UNAVAILABLE.
    ca = (pki / tls.CA_FILE).read_bytes()
    async with grpc.aio.secure_channel(server, grpc.ssl_channel_credentials(ca)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await load_context(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_plaintext_client_cannot_connect(server: str) -> None:
    async with open_channel(server) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await load_context(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_from_another_ca_cannot_connect(
    server: str, pki: Path, tmp_path: Path
) -> None:
    tls.create_mesh_pki(tmp_path / "other", ["agent"])
    stranger = credentials(tmp_path / "other", "agent")
    # Trusts our CA, so only the server's check of the client's chain can refuse it.
    mixed = tls.MeshTls(
        ca=(pki / tls.CA_FILE).read_bytes(), cert=stranger.cert, key=stranger.key, identity="agent"
    )
    async with open_channel(server, tls=mixed, server_identity="memory") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await load_context(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_refuses_a_server_of_another_identity(server: str, pki: Path) -> None:
    async with open_channel(
        server, tls=credentials(pki, "agent"), server_identity="registry"
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await load_context(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_without_a_caller_table_only_health_answers(pki: Path) -> None:
    host = ServiceHost(
        name="mtls-no-table",
        register=register,
        metrics_port=None,
        grace_seconds=0.5,
        tls=tls.TlsFiles.for_identity(pki, "memory"),
    )
    endpoint = await host.start()
    try:
        async with open_channel(
            endpoint.address, tls=credentials(pki, "agent"), server_identity="memory"
        ) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await load_context(channel)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert await health_status(channel, timeout=5) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await host.stop()


async def test_plaintext_is_unchanged_when_unconfigured() -> None:
    settings = Settings()
    assert tls.TlsFiles.from_settings(settings) is None
    assert await tls.load_mesh_tls(settings) is None
    host = ServiceHost.for_settings(
        settings, name="plain", register=register, port=0, metrics_port=None
    )
    assert host.tls is None
    endpoint = await host.start()
    try:
        async with open_channel(endpoint.address) as channel:
            assert (await load_context(channel)).token_count == 7
    finally:
        await host.stop()


async def test_settings_turn_mtls_on(pki: Path) -> None:
    files = tls.TlsFiles.for_identity(pki, "memory")
    settings = Settings(tls_ca_file=files.ca, tls_cert_file=files.cert, tls_key_file=files.key)
    host = ServiceHost.for_settings(
        settings, name="m", register=register, port=0, metrics_port=None, access=ACCESS
    )
    assert host.tls == files
    loaded = await tls.load_mesh_tls(settings)
    assert loaded is not None and loaded.identity == "memory"


def test_partly_set_tls_settings_are_an_error_naming_the_missing_ones(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as half:
        Settings(tls_ca_file=tmp_path / "ca.pem")
    message = str(half.value)
    assert "AGENTPLEX_TLS_CERT_FILE" in message and "AGENTPLEX_TLS_KEY_FILE" in message
    assert "AGENTPLEX_TLS_CA_FILE" not in message
    with pytest.raises(ValidationError, match="AGENTPLEX_TLS_GATEWAY_KEY_FILE"):
        Settings.model_validate(
            {
                "tls_ca_file": "a",
                "tls_cert_file": "b",
                "tls_key_file": "c",
                "tls_gateway_cert_file": "d",
            }
        )
    # Blank is unset (an empty variable in a manifest).
    blank = {"tls_ca_file": "", "tls_cert_file": "", "tls_key_file": ""}
    assert Settings.model_validate(blank).tls_ca_file is None


def test_the_pki_carries_identities_and_is_private(pki: Path) -> None:
    assert stat.S_IMODE(os.stat(pki).st_mode) == 0o700
    for identity in IDENTITIES:
        assert stat.S_IMODE(os.stat(tls.key_file(pki, identity)).st_mode) == 0o600
        cert = tls.cert_file(pki, identity).read_bytes()
        assert tls.certificate_identity(cert) == identity
    assert tls.certificate_identity((pki / tls.CA_FILE).read_bytes()) is None


def test_the_command_writes_a_pki(tmp_path: Path) -> None:
    tls.main([str(tmp_path / "d"), "worker", "cli", "--dns", "registry.mesh", "--ip", "10.0.0.7"])
    assert credentials(tmp_path / "d", "worker").identity == "worker"
    with pytest.raises(ValueError, match="DNS label"):
        tls.create_mesh_pki(tmp_path / "bad", ["Not/An_Identity"])


def test_the_caller_table_covers_every_service_and_names_only_identities() -> None:
    services = {
        callers.MEMORY_SERVICE,
        callers.TOOL_REGISTRY_SERVICE,
        callers.TOOL_EXECUTOR_SERVICE,
        callers.AGENT_SERVICE,
        callers.MESH_CONTROL_SERVICE,
    }
    assert set(callers.CALLERS) == services
    for allowed in callers.CALLERS.values():
        assert allowed <= set(callers.IDENTITIES)
    assert refusal(callers.MEMORY_SERVICE, None, callers.CALLERS) is not None
    assert refusal(callers.TOOL_EXECUTOR_SERVICE, "registry", callers.CALLERS) is None
    assert refusal(callers.TOOL_EXECUTOR_SERVICE, "agent", callers.CALLERS) is not None
