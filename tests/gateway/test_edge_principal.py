"""The principal at the edge, with tokens on, through a real Envoy: the verified claims and
`x-agentplex-principal: edge` reach the service and a caller's own copies never do; each
tenant has its own rate limit; and every refusal leaves one audit line.

One Envoy for the module, configured statically from `resources.build` (no control plane,
no mesh), in front of a gRPC server that answers with the metadata it received.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from envoy_data_plane.envoy.config.core.v3 import Address, Http2ProtocolOptions, SocketAddress
from envoy_data_plane.envoy.extensions.access_loggers.file.v3 import FileAccessLog
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.http.local_ratelimit.v3 import LocalRateLimit
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
)
from envoy_data_plane.envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    HeaderMutation,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage
from grpc_health.v1 import health, health_pb2_grpc

from agentplex.gateway import envoy, resources, tokens
from agentplex.gateway.resources import Directory, GatewayOptions, HostPort, JwtOptions
from agentplex.gateway.settings import GatewaySettings
from agentplex.runtime import principal
from agentplex.runtime.settings import Settings
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc

ISSUER = "https://issuer.test"
AUDIENCE = "agentplex-gateway"
AGENT = "echo"
CARD = f"/v1/agents/{AGENT}/card"
# Tenants' buckets: small, slow to refill, so a burst empties one within a few calls.
TENANT_BURST = 8
TENANT_PER_SECOND = 1
START_SECONDS = 30.0


# --- the config ---------------------------------------------------------------------


@functools.cache
def _jwks() -> str:
    return json.dumps(tokens.generate_signing_key().jwks())


def _options(**overrides: Any) -> GatewayOptions:
    values: dict[str, Any] = {
        "listen_port": 0,
        "jwt": JwtOptions(issuer=ISSUER, audiences=(AUDIENCE,), jwks=_jwks()),
        **overrides,
    }
    return GatewayOptions(**values)


def _directory(address: HostPort | None = None) -> Directory:
    replicas = (address or HostPort("127.0.0.1", 7000),)
    return Directory(agents={AGENT: replicas}, registry=replicas)


def _manager(built: resources.Resources) -> HttpConnectionManager:
    packed = built.listeners[0].filter_chains[0].filters[0].typed_config
    assert packed is not None
    manager = packed.unpack()
    assert isinstance(manager, HttpConnectionManager)
    return manager


def _removed_at_the_door(options: GatewayOptions) -> set[str]:
    (strip,) = _manager(resources.build(_directory(), options)).early_header_mutation_extensions
    assert strip.typed_config is not None
    mutation = strip.typed_config.unpack()
    assert isinstance(mutation, HeaderMutation)
    return {m.remove for m in mutation.mutations if m.remove}


def _edge_marker(options: GatewayOptions) -> list[tuple[str, str]]:
    (route_config,) = resources.build(_directory(), options).routes
    return [
        (h.header.key, h.header.value)
        for h in route_config.virtual_hosts[0].request_headers_to_add
        if h.header is not None
    ]


def test_all_principal_headers_are_stripped_and_only_tokens_add_the_edge_marker() -> None:
    for options in (_options(), GatewayOptions(listen_port=0)):
        assert _removed_at_the_door(options) == set(principal.HEADERS)
    assert set(resources.PRINCIPAL_HEADERS.values()) < set(principal.HEADERS)
    assert _edge_marker(_options()) == [(principal.PRINCIPAL_HEADER, principal.EDGE)]
    assert _edge_marker(GatewayOptions(listen_port=0)) == []


def _tenant_limit(options: GatewayOptions) -> LocalRateLimit | None:
    filters = {f.name: f for f in _manager(resources.build(_directory(), options)).http_filters}
    found = filters.get(resources.TENANT_RATE_LIMIT_FILTER)
    if found is None:
        return None
    names = list(filters)
    # After the token check: the tenant header it sets is what the limit counts by.
    assert names.index(resources.JWT_FILTER) < names.index(resources.TENANT_RATE_LIMIT_FILTER)
    assert found.typed_config is not None
    config = found.typed_config.unpack()
    assert isinstance(config, LocalRateLimit)
    return config


def test_the_tenant_limit_is_a_wildcard_descriptor_on_the_tenant_header() -> None:
    config = _tenant_limit(_options(tenant_rate_limit_per_second=5, tenant_rate_limit_burst=0))
    assert config is not None and config.rate_limited_as_resource_exhausted
    (rate_limit,) = config.rate_limits
    (action,) = rate_limit.actions
    assert action.request_headers is not None
    assert action.request_headers.header_name == principal.TENANT_HEADER
    (descriptor,) = config.descriptors
    assert [(e.key, e.value) for e in descriptor.entries] == [(resources.TENANT_DESCRIPTOR, "")]
    assert descriptor.token_bucket is not None
    # Burst 0: one second's worth.
    assert (descriptor.token_bucket.max_tokens, descriptor.token_bucket.tokens_per_fill) == (5, 5)
    assert config.max_dynamic_descriptors == resources.TENANT_RATE_LIMIT_MAX_TENANTS
    assert config.always_consume_default_token_bucket is False
    # Off without tokens (no tenant to count by), and at 0 per second.
    assert _tenant_limit(GatewayOptions(listen_port=0)) is None
    assert _tenant_limit(_options(tenant_rate_limit_per_second=0)) is None


def _audit_destinations(options: GatewayOptions) -> list[tuple[str, str | None]]:
    found = []
    for log in _manager(resources.build(_directory(), options)).access_log:
        assert log.typed_config is not None
        config = log.typed_config.unpack()
        assert isinstance(config, FileAccessLog | StdoutAccessLog)
        assert config.log_format is not None and config.log_format.json_format is not None
        if config.log_format.json_format.to_dict().get("audit") is True:
            assert log.filter is not None  # refusals only
            found.append((log.name, config.path if isinstance(config, FileAccessLog) else None))
    return found


def test_audit_lines_go_to_the_audit_file_or_else_with_the_access_log(tmp_path: Path) -> None:
    stdout = "envoy.access_loggers.stdout"
    # A refused token, a rate limit: two kinds of line; without tokens, only the second.
    assert _audit_destinations(_options()) == [(stdout, None)] * 2
    assert _audit_destinations(GatewayOptions(listen_port=0, access_log=False)) == [(stdout, None)]
    to_file = _options(audit_log_file="/var/log/agentplex/audit.jsonl")
    assert (
        _audit_destinations(to_file)
        == [("envoy.access_loggers.file", "/var/log/agentplex/audit.jsonl")] * 2
    )

    # The process setting `audit_log_file`, as an absolute path (Envoy opens it itself).
    settings = Settings.model_validate(
        {"audit_log_file": "audit.jsonl", "gateway_tenant_rate_limit_per_second": 7}
    )
    options = GatewaySettings.from_settings(settings).options()
    assert options.audit_log_file == str(Path("audit.jsonl").absolute())
    assert options.tenant_rate_limit_per_second == 7
    assert GatewaySettings().options().audit_log_file is None
    chosen = GatewaySettings().options(audit_log_file=tmp_path / "a.jsonl")
    assert chosen.audit_log_file == str(tmp_path / "a.jsonl")


# --- a real Envoy ---------------------------------------------------------------------


class _Echo(agent_service_pb2_grpc.AgentServiceServicer):
    """An agent whose card's description is the metadata it received: {name: [values]}."""

    def GetAgentCard(
        self, request: pb.GetAgentCardRequest, context: grpc.ServicerContext
    ) -> pb.GetAgentCardResponse:
        received: dict[str, list[str]] = {}
        for key, value in context.invocation_metadata():
            received.setdefault(key, []).append(value if isinstance(value, str) else "<bytes>")
        response = pb.GetAgentCardResponse()
        response.card.name = AGENT
        response.card.description = json.dumps(received)
        return response


@contextlib.contextmanager
def _echo_server() -> Iterator[HostPort]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    agent_service_pb2_grpc.add_AgentServiceServicer_to_server(_Echo(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield HostPort("127.0.0.1", port)
    finally:
        server.stop(0).wait(5)


def _static_bootstrap(options: GatewayOptions, upstream: HostPort) -> Bootstrap:
    """The listener, routes and clusters the control plane would serve, as a static config."""
    built = resources.build(_directory(upstream), options)
    manager = _manager(built)
    manager.rds = None
    (manager.route_config,) = built.routes
    (listener,) = built.listeners
    listener.filter_chains[0].filters[0].typed_config = AnyMessage.pack(manager)
    assignments = {a.cluster_name: a for a in built.endpoints}
    clusters = []
    for cluster in built.clusters:
        cluster.type = ClusterDiscoveryType.STATIC
        cluster.eds_cluster_config = None
        cluster.load_assignment = assignments[cluster.name]
        clusters.append(cluster)
    # The JSON body check's cluster: never called here (no JSON body is sent).
    http2 = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http2_protocol_options=Http2ProtocolOptions()
        )
    )
    clusters.append(
        Cluster(
            name=resources.CONTROL_PLANE_CLUSTER,
            type=ClusterDiscoveryType.STATIC,
            connect_timeout=datetime.timedelta(seconds=1),
            typed_extension_protocol_options={
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": AnyMessage.pack(http2)
            },
            load_assignment=resources.load_assignment(resources.CONTROL_PLANE_CLUSTER, [upstream]),
        )
    )
    return Bootstrap(
        admin=Admin(
            address=Address(socket_address=SocketAddress(address="127.0.0.1", port_value=0))
        ),
        static_resources=BootstrapStaticResources(listeners=[listener], clusters=clusters),
    )


def _poll(
    condition: Callable[[], Any], *, timeout: float = START_SECONDS, message: str = ""
) -> Any:
    """`condition()` once it is truthy, polling; AssertionError after `timeout` seconds."""
    give_up = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < give_up, f"{message} within {timeout}s"
        time.sleep(0.05)


@dataclass
class Edge:
    address: str
    url: str
    key: tokens.SigningKey
    audit_file: Path
    log_file: Path

    def token(self, tenant: str | None, subject: str = "ada", scopes: str = "tasks:read") -> str:
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": subject,
            "scope": scopes,
            "exp": int(time.time()) + 600,
        }
        if tenant is not None:
            claims["tenant"] = tenant
        return str(
            jwt.encode(
                claims,
                self.key.private_key,
                algorithm=self.key.algorithm,
                headers={"kid": self.key.kid},
            )
        )

    def audit_lines(self) -> list[dict[str, Any]]:
        if not self.audit_file.exists():
            return []
        return [json.loads(line) for line in self.audit_file.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """Envoy with tokens on, small tenant buckets and an audit file, before the echo agent."""
    work = tmp_path_factory.mktemp("edge")
    key = tokens.generate_signing_key()
    options = GatewayOptions(
        listen_port=0,
        default_agent=AGENT,
        jwt=JwtOptions(issuer=ISSUER, audiences=(AUDIENCE,), jwks=json.dumps(key.jwks())),
        tenant_rate_limit_per_second=TENANT_PER_SECOND,
        tenant_rate_limit_burst=TENANT_BURST,
        audit_log_file=str(work / "audit.jsonl"),
        health_check_interval_seconds=0.2,
    )
    with _echo_server() as upstream:
        config = work / "envoy.json"
        # betterproto names `consecutive_5xx` consecutive5Xx; protobuf's JSON wants 5xx.
        bootstrap = json.dumps(_static_bootstrap(options, upstream).to_dict())
        config.write_text(bootstrap.replace("5Xx", "5xx"))
        admin_file = work / "admin.address"
        log_file = work / "envoy.log"
        with log_file.open("wb") as log:
            process = subprocess.Popen(
                [
                    str(envoy.binary()),
                    "-c",
                    str(config),
                    "--admin-address-path",
                    str(admin_file),
                    "--disable-hot-restart",
                    "--log-level",
                    "warning",
                    # Access log files are written out every 10 s by default: poll less.
                    "--file-flush-interval-msec",
                    "100",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:

            def admin() -> str | None:
                assert process.poll() is None, log_file.read_text()[-3000:]
                return (admin_file.exists() and admin_file.read_text().strip()) or None

            admin_address = _poll(admin, message="envoy's admin API never came up")
            with httpx.Client(timeout=2.0) as http:

                def listener() -> str | None:
                    with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                        statuses = http.get(
                            f"http://{admin_address}/listeners", params={"format": "json"}
                        ).json()["listener_statuses"]
                        for status in statuses:
                            if status["name"] == resources.LISTENER_NAME:
                                socket = status["local_address"]["socket_address"]
                                return f"{socket['address']}:{socket['port_value']}"
                    return None

                address = _poll(listener, message="the gateway listener never appeared")
                _poll(
                    lambda: http.get(f"http://{address}/ready").status_code == 200,
                    message="the echo agent never became healthy",
                )
            yield Edge(address, f"http://{address}", key, work / "audit.jsonl", log_file)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@pytest.fixture(scope="module")
def echo_stub(edge: Edge) -> Iterator[agent_service_pb2_grpc.AgentServiceStub]:
    with grpc.insecure_channel(edge.address) as channel:
        yield agent_service_pb2_grpc.AgentServiceStub(channel)


def _echo(
    stub: agent_service_pb2_grpc.AgentServiceStub, token: str, *extra: tuple[str, str]
) -> dict[str, list[str]]:
    response = stub.GetAgentCard(
        pb.GetAgentCardRequest(),
        metadata=((resources.AGENT_HEADER, AGENT), ("authorization", f"Bearer {token}"), *extra),
        timeout=10,
    )
    seen: dict[str, list[str]] = json.loads(response.card.description)
    return {name: seen.get(name, []) for name in (*principal.HEADERS, "authorization")}


def test_a_verified_token_reaches_the_service_marked_by_the_edge_and_forgeries_never_do(
    edge: Edge, echo_stub: agent_service_pb2_grpc.AgentServiceStub
) -> None:
    forged = [(name, "mallory") for name in principal.HEADERS]
    token = edge.token("acme", subject="ada", scopes="tasks:run tasks:read")
    assert _echo(echo_stub, token, *forged) == {
        principal.TENANT_HEADER: ["acme"],
        principal.SUBJECT_HEADER: ["ada"],
        principal.SCOPE_HEADER: ["tasks:run tasks:read"],
        principal.PRINCIPAL_HEADER: [principal.EDGE],
        "authorization": [],
    }
    # A verified token without a tenant claim is still marked: the service refuses it
    # rather than taking the call for the mesh's own.
    assert _echo(echo_stub, edge.token(None, subject="bob"), *forged) == {
        principal.TENANT_HEADER: [],
        principal.SUBJECT_HEADER: ["bob"],
        principal.SCOPE_HEADER: ["tasks:read"],
        principal.PRINCIPAL_HEADER: [principal.EDGE],
        "authorization": [],
    }
    # A forged marker without a token goes nowhere: the token check refuses the call.
    with pytest.raises(grpc.RpcError) as caught:
        echo_stub.GetAgentCard(
            pb.GetAgentCardRequest(),
            metadata=((resources.AGENT_HEADER, AGENT), *forged),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_refused_token_leaves_one_audit_line_naming_the_failed_check(
    edge: Edge, echo_stub: agent_service_pb2_grpc.AgentServiceStub
) -> None:
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    expired = tokens.mint(
        edge.key,
        issuer=ISSUER,
        audience=AUDIENCE,
        subject="eve",
        tenant="acme",
        now=time.time() - 7200,
        ttl_seconds=3600,
    )
    with pytest.raises(grpc.RpcError) as caught:
        echo_stub.GetAgentCard(
            pb.GetAgentCardRequest(),
            metadata=(
                (resources.AGENT_HEADER, AGENT),
                ("authorization", f"Bearer {expired}"),
                ("traceparent", trace),
            ),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    def line() -> list[dict[str, Any]]:
        return [entry for entry in edge.audit_lines() if entry.get("traceparent") == trace]

    (entry,) = _poll(line, timeout=10, message="no audit line for the refused token")
    assert entry["audit"] is True and entry["outcome"] == "denied"
    assert entry["action"] == "/agentplex.v1.AgentService/GetAgentCard"
    assert entry["reason"] == "Jwt is expired"
    assert entry["tenant"] is None and entry["subject"] is None  # never the unverified claims


def test_one_tenant_over_its_limit_is_refused_while_another_still_passes(
    edge: Edge, echo_stub: agent_service_pb2_grpc.AgentServiceStub
) -> None:
    busy, quiet = edge.token("tenant-a"), edge.token("tenant-b")
    refused: grpc.RpcError | None = None
    # The bucket holds TENANT_BURST and refills TENANT_PER_SECOND a second: however slow
    # the calls, tenant-a runs dry long before this bound.
    for _ in range(TENANT_BURST * 20):
        try:
            _echo(echo_stub, busy)
        except grpc.RpcError as exc:
            refused = exc
            break
    assert refused is not None, "tenant-a was never limited"
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # Over JSON too, in the gateway's error shape (as for its global limit). The bucket
    # may have refilled a token since: spend it, within the same bound.
    with httpx.Client(timeout=5.0) as http:
        for _ in range(TENANT_BURST * 20):
            response = http.get(edge.url + CARD, headers={"authorization": f"Bearer {busy}"})
            if response.status_code != 200:
                break
        assert response.status_code == 429, response.text
        body = response.json()
        assert body["code"] == 8 and body["details"][0]["reason"] == "RESOURCE_EXHAUSTED", body

        # Tenant B has its own bucket.
        assert _echo(echo_stub, quiet)[principal.TENANT_HEADER] == ["tenant-b"]
        answered = http.get(edge.url + CARD, headers={"authorization": f"Bearer {quiet}"})
        assert answered.status_code == 200, answered.text
        assert answered.json()["card"]["name"] == AGENT

    def limited() -> list[dict[str, Any]]:
        return [e for e in edge.audit_lines() if e.get("tenant") == "tenant-a"]

    lines = _poll(limited, timeout=10, message="no audit line for the limited tenant")
    assert {e["reason"] for e in lines} == {"local_rate_limited"}
    assert {e["action"] for e in lines} >= {"/agentplex.v1.AgentService/GetAgentCard"}
    assert not [e for e in edge.audit_lines() if e.get("tenant") == "tenant-b"]
