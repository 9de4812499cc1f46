"""Authentication at the edge (`gateway_auth` = `jwt`): settings, development tokens, the
jwt_authn config, and a real Envoy refusing every kind of bad token over gRPC, gRPC-Web
and JSON while health, readiness, preflights and the console stay open."""

from __future__ import annotations

import base64
import contextlib
import json
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from envoy_data_plane.envoy.config.cluster.v3 import ClusterDiscoveryType
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwtAuthentication,
    PerRouteConfig,
)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
)
from envoy_data_plane.envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    HeaderMutation,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import UpstreamTlsContext
from pydantic import ValidationError

from agentplex.gateway import envoy, resources, tokens
from agentplex.gateway.app import read_jwks
from agentplex.gateway.resources import Directory, GatewayOptions, HostPort, JwtOptions
from agentplex.gateway.settings import GatewaySettings
from agentplex.runtime import principal
from agentplex.runtime.settings import Settings
from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc

ISSUER = "https://issuer.test"
AUDIENCE = "agentplex-gateway"
CARD = "/v1/agents/assistant/card"


# --- settings -----------------------------------------------------------------------


def test_auth_is_off_by_default() -> None:
    assert GatewaySettings().auth == "none"
    assert GatewaySettings().options().jwt is None


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ({"auth": "jwt", "jwks_uri": "https://i/jwks", "jwt_audiences": "a"}, "JWT_ISSUER"),
        ({"auth": "jwt", "jwks_uri": "https://i/jwks", "jwt_issuer": "i"}, "JWT_AUDIENCES"),
        ({"auth": "jwt", "jwt_issuer": "i", "jwt_audiences": "a"}, "exactly one of"),
        (
            {
                "auth": "jwt",
                "jwt_issuer": "i",
                "jwt_audiences": "a",
                "jwks_uri": "https://i/jwks",
                "jwks_file": "/keys/jwks.json",
            },
            "exactly one of",
        ),
        (
            {"auth": "jwt", "jwt_issuer": "i", "jwt_audiences": " , ", "jwks_uri": "https://i/"},
            "JWT_AUDIENCES",
        ),
        (
            {"auth": "jwt", "jwt_issuer": "i", "jwt_audiences": "a", "jwks_uri": "ftp://i/k"},
            "http(s)://host",
        ),
        (
            # Signing keys over plaintext from another host could be swapped on the way.
            {"auth": "jwt", "jwt_issuer": "i", "jwt_audiences": "a", "jwks_uri": "http://i/k"},
            "must be https://",
        ),
        (
            {"auth": "jwt", "jwt_issuer": "i", "jwt_audiences": "a", "jwks_uri": "https://i:x/"},
            "http(s)://host",
        ),
        ({"jwt_issuer": "i"}, "AGENTPLEX_GATEWAY_AUTH is 'none'"),
        ({"jwks_file": "/keys/jwks.json"}, "set AGENTPLEX_GATEWAY_AUTH=jwt"),
        ({"auth": "oauth"}, "auth"),
    ],
)
def test_incomplete_auth_settings_are_refused_saying_what_is_missing(
    given: dict[str, str], says: str
) -> None:
    with pytest.raises(
        ValidationError, match=r"(?s)" + says.replace("(", r"\(").replace(")", r"\)")
    ):
        GatewaySettings(**given)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Settings.model_validate({"gateway_" + name: value for name, value in given.items()})


def test_auth_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTPLEX_GATEWAY_AUTH", " JWT ")
    monkeypatch.setenv("AGENTPLEX_GATEWAY_JWT_ISSUER", ISSUER)
    monkeypatch.setenv("AGENTPLEX_GATEWAY_JWT_AUDIENCES", "one, two")
    monkeypatch.setenv("AGENTPLEX_GATEWAY_JWKS_URI", "https://issuer.test/.well-known/jwks.json")
    monkeypatch.setenv("AGENTPLEX_GATEWAY_JWKS_FILE", "")
    monkeypatch.setenv("AGENTPLEX_GATEWAY_JWKS_CACHE_SECONDS", "60")
    gateway = GatewaySettings.from_settings(Settings())
    assert gateway.options().jwt == JwtOptions(
        issuer=ISSUER,
        audiences=("one", "two"),
        jwks_uri="https://issuer.test/.well-known/jwks.json",
        jwks_cache_seconds=60,
    )
    monkeypatch.setenv("AGENTPLEX_GATEWAY_JWKS_CA_FILE", "/etc/pki/tls/certs/ca-bundle.crt")
    jwt_options = GatewaySettings.from_settings(Settings()).options().jwt
    assert jwt_options is not None
    assert jwt_options.jwks_ca_file == "/etc/pki/tls/certs/ca-bundle.crt"


# --- development tokens -------------------------------------------------------------


@pytest.mark.parametrize("algorithm", tokens.ALGORITHMS)
def test_a_minted_token_verifies_against_the_written_jwks(
    algorithm: tokens.Algorithm, tmp_path: Path
) -> None:
    key = tokens.generate_signing_key(algorithm)
    key_path, jwks_path = tokens.write_signing_key(key, tmp_path / "keys")
    for path in (key_path, jwks_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert tokens.load_signing_key(key_path).kid == key.kid

    token = tokens.mint(
        key,
        issuer=ISSUER,
        audience=AUDIENCE,
        subject="ada",
        tenant="acme",
        scopes=["tasks:run", "tasks:read"],
        ttl_seconds=600,
    )
    header = jwt.get_unverified_header(token)
    assert header["alg"] == algorithm and header["kid"] == key.kid
    (public,) = jwt.PyJWKSet.from_json(jwks_path.read_text()).keys
    claims = jwt.decode(token, public, algorithms=[algorithm], audience=AUDIENCE, issuer=ISSUER)
    assert claims["sub"] == "ada" and claims["tenant"] == "acme"
    assert claims["scope"] == "tasks:run tasks:read"
    assert claims["exp"] - claims["iat"] == 600 and claims["nbf"] == claims["iat"]
    # The JWKS is public: the gateway takes it as it is.
    assert json.loads(read_jwks(jwks_path)) == json.loads(jwks_path.read_text())


def test_rewriting_keys_keeps_them_private(tmp_path: Path) -> None:
    tokens.write_signing_key(tokens.generate_signing_key(), tmp_path)
    (tmp_path / tokens.KEY_FILE).chmod(0o644)
    second = tokens.generate_signing_key("ES256")
    key_path, _ = tokens.write_signing_key(second, tmp_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert tokens.load_signing_key(key_path).algorithm == "ES256"
    assert sorted(p.name for p in tmp_path.iterdir()) == [tokens.JWKS_FILE, tokens.KEY_FILE]


def test_a_token_must_live_for_a_while() -> None:
    with pytest.raises(ValueError):
        tokens.mint(
            tokens.generate_signing_key(),
            issuer=ISSUER,
            audience=AUDIENCE,
            subject="s",
            tenant="t",
            ttl_seconds=0,
        )


def test_the_gateway_refuses_a_jwks_with_private_or_no_keys(tmp_path: Path) -> None:
    key = tokens.generate_signing_key()
    private = key.jwks()
    private["keys"][0]["d"] = "c2VjcmV0"
    cases = {
        "private.json": (json.dumps(private), "private or symmetric"),
        "secret.json": (json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}), "symmetric"),
        "empty.json": (json.dumps({"keys": []}), '"keys"'),
        "pem.json": (key.private_pem().decode(), "not JSON"),
        "kty.json": (json.dumps({"keys": [{"x": "y"}]}), "kty"),
    }
    for name, (content, says) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=says) as caught:
            read_jwks(tmp_path / name)
        assert "c2VjcmV0" not in str(caught.value) and "PRIVATE" not in str(caught.value)
    with pytest.raises(ValueError, match="cannot read"):
        read_jwks(tmp_path / "missing.json")


# --- the Envoy config ---------------------------------------------------------------


def _directory() -> Directory:
    return Directory(
        agents={"assistant": (HostPort("127.0.0.1", 7000),)},
        registry=(HostPort("127.0.0.1", 6000),),
    )


def _jwks() -> str:
    return json.dumps(tokens.generate_signing_key().jwks())


def _manager(built: resources.Resources) -> HttpConnectionManager:
    packed = built.listeners[0].filter_chains[0].filters[0].typed_config
    assert packed is not None
    manager = packed.unpack()
    assert isinstance(manager, HttpConnectionManager)
    return manager


def test_without_auth_there_is_no_token_check_but_forged_principals_still_go() -> None:
    built = resources.build(_directory(), GatewayOptions(listen_port=0))
    manager = _manager(built)
    assert resources.JWT_FILTER not in [f.name for f in manager.http_filters]
    (strip,) = manager.early_header_mutation_extensions
    assert strip.typed_config is not None
    mutation = strip.typed_config.unpack()
    assert isinstance(mutation, HeaderMutation)
    removed = {m.remove for m in mutation.mutations}
    assert removed == set(principal.HEADERS)
    assert resources.AGENT_HEADER not in removed  # the routing header is the caller's


def test_the_token_check_sits_after_grpc_web_and_before_anything_reads_the_body() -> None:
    options = GatewayOptions(
        listen_port=0, jwt=JwtOptions(issuer=ISSUER, audiences=(AUDIENCE,), jwks=_jwks())
    )
    built = resources.build(_directory(), options)
    manager = _manager(built)
    names = [f.name for f in manager.http_filters]
    position = names.index(resources.JWT_FILTER)
    for before in ("health_check.live", "health_check.ready", "cors", "grpc_web"):
        assert names.index(f"envoy.filters.http.{before}") < position
    for after in ("buffer", "ext_proc", "grpc_json_transcoder", "router"):
        assert position < names.index(f"envoy.filters.http.{after}")

    packed = manager.http_filters[position].typed_config
    assert packed is not None
    config = packed.unpack()
    assert isinstance(config, JwtAuthentication)
    provider = config.providers[resources.JWT_PROVIDER]
    assert provider.issuer == ISSUER and provider.audiences == [AUDIENCE]
    assert provider.forward is False and provider.require_expiration is True
    assert provider.clock_skew_seconds == resources.JWT_CLOCK_SKEW_SECONDS
    assert [(h.name, h.value_prefix) for h in provider.from_headers] == [
        ("authorization", "Bearer ")
    ]
    assert {c.claim_name: c.header_name for c in provider.claim_to_headers} == (
        resources.PRINCIPAL_HEADERS
    )
    assert config.bypass_cors_preflight is True
    assert provider.local_jwks is not None and provider.remote_jwks is None

    # The console's files are open; everything else is not.
    (route_config,) = built.routes
    for route in route_config.virtual_hosts[0].routes:
        assert route.match is not None
        disabled = route.typed_per_filter_config.get(resources.JWT_FILTER)
        path = route.match.path or ""
        is_console = path == "/" or path.startswith("/console/")
        assert (disabled is not None) == is_console, route.match
        if disabled is not None:
            assert disabled.unpack() == PerRouteConfig(disabled=True)


def test_a_remote_jwks_gets_a_dns_cluster_with_verified_tls() -> None:
    jwt_options = JwtOptions(
        issuer=ISSUER,
        audiences=(AUDIENCE,),
        jwks_uri="https://login.example.com/.well-known/jwks.json",
        jwks_cache_seconds=120,
    )
    built = resources.build(_directory(), GatewayOptions(listen_port=0, jwt=jwt_options))
    (cluster,) = [c for c in built.clusters if c.name == resources.JWKS_CLUSTER]
    assert cluster.type == ClusterDiscoveryType.STRICT_DNS
    assert cluster.transport_socket is not None and cluster.transport_socket.typed_config
    tls = cluster.transport_socket.typed_config.unpack()
    assert isinstance(tls, UpstreamTlsContext) and tls.sni == "login.example.com"
    assert tls.common_tls_context is not None
    validation = tls.common_tls_context.validation_context
    assert validation is not None and validation.trusted_ca is not None
    assert validation.trusted_ca.filename == "/etc/ssl/certs/ca-certificates.crt"
    assert [m.matcher.exact for m in validation.match_typed_subject_alt_names if m.matcher] == [
        "login.example.com"
    ]
    (assignment,) = [e for e in built.endpoints if e.cluster_name == resources.JWKS_CLUSTER]
    endpoint = assignment.endpoints[0].lb_endpoints[0].endpoint
    assert endpoint is not None and endpoint.address is not None
    assert endpoint.address.socket_address is not None
    assert endpoint.address.socket_address.port_value == 443


@pytest.mark.parametrize("jwks_by", ["file", "https-uri"])
def test_the_auth_config_validates_in_envoy(jwks_by: str, tmp_path: Path) -> None:
    """`envoy --mode validate` on the listener and the JWKS cluster, as a static config."""
    from envoy_data_plane.envoy.config.bootstrap.v3 import (
        Admin,
        Bootstrap,
        BootstrapStaticResources,
    )
    from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress
    from envoy_data_plane.google.protobuf import Any as AnyMessage

    jwt_options = (
        JwtOptions(issuer=ISSUER, audiences=(AUDIENCE, "other"), jwks=_jwks())
        if jwks_by == "file"
        else JwtOptions(
            issuer=ISSUER, audiences=(AUDIENCE,), jwks_uri="https://login.example.com/keys"
        )
    )
    built = resources.build(_directory(), GatewayOptions(listen_port=0, jwt=jwt_options))
    manager = _manager(built)
    manager.rds = None
    (manager.route_config,) = built.routes
    (listener,) = built.listeners
    listener.filter_chains[0].filters[0].typed_config = AnyMessage.pack(manager)
    assignments = {a.cluster_name: a for a in built.endpoints}
    clusters = []
    for cluster in built.clusters:
        if cluster.type == ClusterDiscoveryType.EDS:
            cluster.type = ClusterDiscoveryType.STATIC
            cluster.eds_cluster_config = None
            cluster.load_assignment = assignments[cluster.name]
        clusters.append(cluster)
    config = Bootstrap(
        admin=Admin(
            address=Address(socket_address=SocketAddress(address="127.0.0.1", port_value=0))
        ),
        static_resources=BootstrapStaticResources(listeners=[listener], clusters=clusters),
    )
    path = tmp_path / "auth.json"
    path.write_text(json.dumps(config.to_dict()).replace("5Xx", "5xx"))
    result = envoy.validate(path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]


# --- a real gateway -----------------------------------------------------------------


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _bad_tokens(key: tokens.SigningKey) -> dict[str, tuple[str | None, str]]:
    """{case: (Authorization header or None, what Envoy says)}."""
    now = time.time()

    def token(signer: tokens.SigningKey = key, **overrides: Any) -> str:
        fields: dict[str, Any] = {
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "subject": "ada",
            "tenant": "acme",
            "scopes": ["tasks:run"],
        }
        fields.update(overrides)
        return tokens.mint(signer, **fields)

    # Our key's header and claims, another key's signature.
    impostor = tokens.generate_signing_key(key.algorithm)
    forged = token().rsplit(".", 1)[0] + "." + token(impostor).rsplit(".", 1)[1]
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "ada", "exp": int(now) + 600}
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    return {
        "missing": (None, "Jwt is missing"),
        "basic": ("Basic YWRhOmFkYQ==", "Jwt is missing"),
        "garbage": ("Bearer garbage", "Jwt is not in the form of Header.Payload.Signature"),
        # As the attack sends it (no signature), and with one, so the header is read.
        "alg none": (f"Bearer {unsigned}", "Jwt is not in the form of Header.Payload.Signature"),
        "alg none, signed": (f"Bearer {unsigned}c2ln", "Jwt header [alg] is not supported"),
        "wrong signature": (f"Bearer {forged}", "Jwt verification fails"),
        "wrong issuer": (f"Bearer {token(issuer='https://evil.test')}", "Jwt issuer is not"),
        "wrong audience": (f"Bearer {token(audience='other')}", "Audiences in Jwt are not allowed"),
        "expired": (
            f"Bearer {token(now=now - 7200, ttl_seconds=3600)}",
            "Jwt is expired",
        ),
        "not yet valid": (f"Bearer {token(not_before=now + 600)}", "Jwt not yet valid"),
    }


def _valid(key: tokens.SigningKey) -> str:
    token = tokens.mint(
        key,
        issuer=ISSUER,
        audience=AUDIENCE,
        subject="ada",
        tenant="acme",
        # The calls below read the agent's card (contract/scopes.py).
        scopes=["tasks:run", "agents:read"],
    )
    return f"Bearer {token}"


def _metadata(authorization: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", authorization),) if authorization else ()


async def _grpc_card(
    stub: agent_service_pb2_grpc.AgentServiceStub, authorization: str | None
) -> pb.GetAgentCardResponse:
    return await stub.GetAgentCard(
        pb.GetAgentCardRequest(), metadata=_metadata(authorization), timeout=10
    )


def _grpc_web_card(gateway, authorization: str | None) -> Any:
    message = pb.GetAgentCardRequest().SerializeToString()
    headers = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1"}
    if authorization:
        headers["authorization"] = authorization
    return gateway.http.post(
        f"{gateway.url}/agentplex.v1.AgentService/GetAgentCard",
        content=b"\x00" + len(message).to_bytes(4, "big") + message,
        headers=headers,
    )


async def _refused_everywhere(gateway, stub, authorization: str | None, says: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _grpc_card(stub, authorization)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value
    assert says in (caught.value.details() or "")

    response = await gateway.http.get(gateway.url + CARD, headers=dict(_metadata(authorization)))
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == 16 and says in body["message"], body
    assert body["details"][0]["reason"] == "UNAUTHENTICATED"
    assert response.headers["www-authenticate"].startswith("Bearer")

    web = await _grpc_web_card(gateway, authorization)
    assert web.headers.get("grpc-status") == "16", web.headers
    assert says in web.headers.get("grpc-message", "")


async def _open_without_a_token(gateway) -> None:
    http = gateway.http
    assert (await http.get(f"{gateway.url}/health")).status_code == 200
    assert (await http.get(f"{gateway.url}/ready")).status_code == 200
    assert (await http.get(f"{gateway.url}/console/")).status_code == 200
    assert (await http.get(f"{gateway.url}/")).status_code in (301, 302)
    preflight = await http.options(
        f"{gateway.url}/agentplex.v1.AgentService/GetAgentCard",
        headers={
            "origin": "http://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type,x-grpc-web",
        },
    )
    assert preflight.status_code == 200
    assert "authorization" in preflight.headers["access-control-allow-headers"]


async def _accepted_everywhere(gateway, stub, authorization: str) -> None:
    assert (await _grpc_card(stub, authorization)).card.name == "assistant"
    response = await gateway.http.get(gateway.url + CARD, headers={"authorization": authorization})
    assert response.status_code == 200 and response.json()["card"]["name"] == "assistant"
    web = await _grpc_web_card(gateway, authorization)
    assert web.status_code == 200 and "grpc-status" not in web.headers


def _auth_settings(**jwks: str) -> dict[str, str]:
    return {
        "auth": "jwt",
        "jwt_issuer": ISSUER,
        "jwt_audiences": f"someone-else,{AUDIENCE}",
        "cors_origins": "http://app.example",
        **jwks,
    }


async def test_every_bad_token_is_refused_and_a_good_one_accepted(
    start_gateway, channel_to, tmp_path: Path, eventually
) -> None:
    key = tokens.generate_signing_key()
    _, jwks_path = tokens.write_signing_key(key, tmp_path / "keys")
    gateway = await start_gateway(**_auth_settings(jwks_file=str(jwks_path)))
    stub = agent_service_pb2_grpc.AgentServiceStub(channel_to(gateway.address))

    await _open_without_a_token(gateway)
    for case, (authorization, says) in _bad_tokens(key).items():
        try:
            await _refused_everywhere(gateway, stub, authorization, says)
        except AssertionError as exc:
            raise AssertionError(f"{case}: {exc}") from exc
    await _accepted_everywhere(gateway, stub, _valid(key))

    # Key rotation: the control plane picks up the rewritten JWKS file.
    rotated = tokens.generate_signing_key("ES256")
    tokens.write_signing_key(rotated, tmp_path / "keys")

    async def rotated_in() -> bool:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await _grpc_card(stub, _valid(rotated))
            return True
        return False

    await eventually(rotated_in, timeout=10, message="the new key was never accepted")
    # The old key's tokens name a kid the JWKS no longer has. (A connection opened before
    # the change keeps the old keys until Envoy's listener drain closes it: a new one.)
    await gateway.close()
    await _refused_everywhere(gateway, stub, _valid(key), "Jwks doesn't have key to match kid")


class _JwksServer:
    """An issuer's JWKS endpoint on loopback, counting its fetches."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        body = json.dumps(jwks).encode()
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/.well-known/jwks.json":
                    self.send_error(404)
                    return
                server.fetches += 1
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self._http.server_address[1]}/.well-known/jwks.json"

    @contextlib.contextmanager
    def running(self) -> Iterator[_JwksServer]:
        thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._http.shutdown()
            self._http.server_close()
            thread.join()


async def test_keys_fetched_from_the_issuer_s_jwks_uri(start_gateway, channel_to) -> None:
    key = tokens.generate_signing_key("ES256")
    with _JwksServer(key.jwks()).running() as issuer:
        gateway = await start_gateway(**_auth_settings(jwks_uri=issuer.uri))
        stub = agent_service_pb2_grpc.AgentServiceStub(channel_to(gateway.address))
        await _accepted_everywhere(gateway, stub, _valid(key))
        bad = _bad_tokens(key)
        for case in ("missing", "wrong signature", "expired"):
            await _refused_everywhere(gateway, stub, *bad[case])
        # Fetched when the listener started and cached (300 s), not per request.
        fetched = issuer.fetches
        for _ in range(5):
            await _grpc_card(stub, _valid(key))
        assert fetched >= 1 and issuer.fetches == fetched


class _EchoAgent(agent_service_pb2_grpc.AgentServiceServicer):
    """An agent whose card says what reached it: the principal headers and whether a
    token did."""

    async def GetAgentCard(
        self,
        request: pb.GetAgentCardRequest,
        context: grpc.aio.ServicerContext[pb.GetAgentCardRequest, pb.GetAgentCardResponse],
    ) -> pb.GetAgentCardResponse:
        received = list(context.invocation_metadata() or ())
        names = [*resources.PRINCIPAL_HEADERS.values(), "authorization"]
        # Every value, so a forged header next to the edge's own would show.
        seen = {name: [value for key, value in received if key == name] for name in names}
        response = pb.GetAgentCardResponse()
        response.card.name = "echo"
        response.card.description = json.dumps(seen)
        return response


@contextlib.asynccontextmanager
async def _echo_agent(mesh) -> AsyncIterator[str]:
    """The echo agent on loopback, published in the directory as `agent.echo`."""
    from grpc_health.v1 import health, health_pb2_grpc

    from agentplex.clients.registry import RegistryClient
    from agentplex.v1 import tool_pb2

    server = grpc.aio.server()
    agent_service_pb2_grpc.add_AgentServiceServicer_to_server(_EchoAgent(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    registry = RegistryClient(mesh.settings.registry_address)
    try:
        # The contract of an agent the mesh runs, under another name.
        (template,) = [
            t for t in (await registry.list_tools(timeout=5)).tools if t.name == "agent.researcher"
        ]
        echo = tool_pb2.ToolDefinition()
        echo.CopyFrom(template)
        echo.name = "agent.echo"
        await registry.publish([echo], address, tool_pb2.BACKEND_KIND_AGENT, timeout=5)
        yield address
    finally:
        await registry.close()
        await server.stop(0)


async def test_services_get_the_verified_principal_and_never_the_token(
    mesh, start_gateway, channel_to, tmp_path: Path, eventually
) -> None:
    key = tokens.generate_signing_key()
    _, jwks_path = tokens.write_signing_key(key, tmp_path / "keys")
    async with _echo_agent(mesh):
        gateway = await start_gateway(**_auth_settings(jwks_file=str(jwks_path)))
        token = tokens.mint(
            key,
            issuer=ISSUER,
            audience=AUDIENCE,
            subject="ada",
            tenant="acme",
            scopes=["tasks:run", "tasks:read"],
        )
        # Valid, but naming no tenant and no scopes: nothing of the caller's may fill in.
        bare = jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "bob", "exp": int(time.time()) + 600},
            key.private_key,
            algorithm=key.algorithm,
            headers={"kid": key.kid},
        )
        forged = [(name, "mallory") for name in resources.PRINCIPAL_HEADERS.values()]
        stub = agent_service_pb2_grpc.AgentServiceStub(channel_to(gateway.address))

        async def echo(token: str) -> dict[str, list[str]]:
            response = await stub.GetAgentCard(
                pb.GetAgentCardRequest(),
                metadata=(
                    (resources.AGENT_HEADER, "echo"),
                    ("authorization", f"Bearer {token}"),
                    *forged,
                ),
                timeout=10,
            )
            seen: dict[str, list[str]] = json.loads(response.card.description)
            return seen

        async def routable() -> bool:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await echo(token)
                return True
            return False

        await eventually(routable, timeout=15, message="the echo agent never became routable")
        assert await echo(token) == {
            "x-agentplex-subject": ["ada"],
            "x-agentplex-tenant": ["acme"],
            "x-agentplex-scope": ["tasks:run tasks:read"],
            "authorization": [],
        }
        assert await echo(bare) == {
            "x-agentplex-subject": ["bob"],
            "x-agentplex-tenant": [],
            "x-agentplex-scope": [],
            "authorization": [],
        }
