"""The pure builders: a directory in, Envoy resources out — read back without an Envoy.

Most tests ask "where does this request go?" through `resolve`, a small model of
Envoy's first-match routing over the built route table, so they state the
routing rules of `agentplex.gateway.resources` rather than the table's layout.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import replace
from typing import TypeVar

import betterproto2
import pytest
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import Http2ProtocolOptions
from envoy_data_plane.envoy.config.endpoint.v3 import LbEndpoint
from envoy_data_plane.envoy.config.route.v3 import HeaderMatcher, Route, RouteMatch
from envoy_data_plane.envoy.extensions.filters.http.cors.v3 import CorsPolicy
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions as UpstreamHttpProtocolOptions,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage

from agentplex.gateway import resources, snapshot
from agentplex.gateway.resources import (
    AGENT_HEADER,
    REGISTRY_CLUSTER,
    Directory,
    GatewayOptions,
    HostPort,
    Resources,
)
from agentplex.gateway.settings import GatewaySettings
from agentplex.gateway.snapshot import InconsistentSnapshot, Snapshot
from agentplex.runtime.clients import Keepalive
from agentplex.runtime.settings import Settings

AGENT = "/agentplex.v1.AgentService/"
REGISTRY = "/agentplex.v1.ToolRegistryService/"
GRPC = "application/grpc"

T = TypeVar("T")
M = TypeVar("M", bound=betterproto2.Message)


def some(value: T | None) -> T:
    """A field envoy_data_plane types as optional (every sub-message is) that is set here."""
    assert value is not None
    return value


def unpacked(value: AnyMessage | None, kind: type[M]) -> M:
    message = some(value).unpack()
    assert isinstance(message, kind), message
    return message


def directory(*agents: str, replicas: int = 1) -> Directory:
    return Directory(
        agents={
            name: tuple(HostPort("127.0.0.1", 7000 + 10 * i + r) for r in range(replicas))
            for i, name in enumerate(agents)
        },
        registry=(HostPort("127.0.0.1", 6000),),
    )


def routes_of(built: Resources) -> list[Route]:
    (config,) = built.routes
    (host,) = config.virtual_hosts
    return list(host.routes)


def _header_matches(matcher: HeaderMatcher, headers: dict[str, str]) -> bool:
    value = headers.get(matcher.name)
    if matcher.present_match:
        result = value is not None
    elif matcher.string_match is not None:
        string = matcher.string_match
        if value is None:
            result = False
        elif string.exact:
            result = value == string.exact
        elif string.prefix:
            result = value.startswith(string.prefix)
        else:
            raise NotImplementedError(string)
    else:
        raise NotImplementedError(matcher)
    return result != matcher.invert_match


def _matches(match: RouteMatch, path: str, headers: dict[str, str]) -> bool:
    if match.path is not None and match.path != path:
        return False
    if match.prefix is not None and not path.startswith(match.prefix):
        return False
    if match.safe_regex is not None and not re.fullmatch(match.safe_regex.regex, path):
        return False
    if match.grpc is not None:  # what Envoy calls a gRPC request
        content_type = headers.get("content-type", "")
        if content_type != GRPC and not content_type.startswith(GRPC + "+"):
            return False
    return all(_header_matches(matcher, headers) for matcher in match.headers)


def resolve(
    routes: list[Route],
    path: str,
    *,
    method: str = "POST",
    grpc: bool = False,
    agent: str | None = None,
    content_type: str | None = None,
) -> Route:
    """The route Envoy picks: the first whose match holds."""
    headers = {":method": method, ":path": path}
    if grpc:
        headers["content-type"] = GRPC
    if content_type is not None:
        headers["content-type"] = content_type
    if agent is not None:
        headers[AGENT_HEADER] = agent
    for route in routes:
        if _matches(some(route.match), path, headers):
            return route
    raise AssertionError(f"no route for {method} {path} {headers}")


def cluster(route: Route) -> str | None:
    return route.route.cluster if route.route is not None else None


def headers_added(route: Route) -> dict[str, str]:
    return {some(o.header).key: some(o.header).value for o in route.response_headers_to_add}


def grpc_status(route: Route) -> str | None:
    return headers_added(route).get("grpc-status")


def body(route: Route) -> str:
    return some(some(some(route.direct_response).body).inline_string)


def direct_json(route: Route) -> tuple[int, dict[str, object]]:
    assert route.direct_response is not None, route
    return route.direct_response.status, json.loads(body(route))


def socket_of(endpoint: LbEndpoint) -> tuple[str, int]:
    address = some(some(some(endpoint.endpoint).address).socket_address)
    return address.address, some(address.port_value)


# --- agents over gRPC ---------------------------------------------------------------


def test_default_agent_route_only_when_the_default_agent_is_routable() -> None:
    with_default = routes_of(
        resources.build(directory("assistant", "researcher"), GatewayOptions())
    )
    route = resolve(with_default, AGENT + "RunTask", grpc=True)
    assert cluster(route) == "agent.assistant"

    without = routes_of(resources.build(directory("researcher"), GatewayOptions()))
    route = resolve(without, AGENT + "RunTask", grpc=True)
    assert cluster(route) is None
    assert grpc_status(route) == "14"  # UNAVAILABLE: not another agent's answer
    assert all(cluster(r) != "agent.assistant" for r in without)
    # and the other agents stay reachable by name
    assert cluster(resolve(without, AGENT + "RunTask", grpc=True, agent="researcher")) == (
        "agent.researcher"
    )


def test_the_default_agent_is_an_option() -> None:
    built = resources.build(
        directory("assistant", "researcher"), GatewayOptions(default_agent="researcher")
    )
    assert cluster(resolve(routes_of(built), AGENT + "RunTask", grpc=True)) == "agent.researcher"


@pytest.mark.parametrize("agent", ["assistant", "researcher", "supervisor"])
@pytest.mark.parametrize(
    "method", ["RunTask", "StreamSteps", "GetAgentCard", "SubmitTask", "GetTask", "WatchTask"]
)
def test_header_selects_the_agent_for_every_method(agent: str, method: str) -> None:
    routes = routes_of(
        resources.build(directory("assistant", "researcher", "supervisor"), GatewayOptions())
    )
    assert cluster(resolve(routes, AGENT + method, grpc=True, agent=agent)) == f"agent.{agent}"


def test_health_and_reflection_follow_the_header() -> None:
    routes = routes_of(resources.build(directory("assistant", "researcher"), GatewayOptions()))
    for path in (
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ):
        assert cluster(resolve(routes, path, grpc=True, agent="researcher")) == "agent.researcher"
        assert cluster(resolve(routes, path, grpc=True)) == "agent.assistant"
        assert cluster(resolve(routes, path, grpc=True, agent="registry")) == REGISTRY_CLUSTER
    reflection = resolve(
        routes, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", grpc=True
    )
    # a bidirectional stream must not be buffered whole
    assert "envoy.filters.http.buffer" in reflection.typed_per_filter_config


@pytest.mark.parametrize(
    "content_type",
    [
        "application/grpc+proto",
        "application/grpc-web",
        "application/grpc-web+proto",
        "application/grpc-web-text",
    ],
)
@pytest.mark.parametrize("method", ["RunTask", "SubmitTask", "CancelTask", "StreamSteps"])
def test_grpc_web_and_other_grpc_content_types_route_like_grpc(
    content_type: str, method: str
) -> None:
    """Route matching sees the browser's content type: the CORS filter picks the route
    before the gRPC-Web filter turns the request into plain gRPC."""
    routes = routes_of(resources.build(directory("assistant", "researcher"), GatewayOptions()))
    by_header = resolve(routes, AGENT + method, agent="researcher", content_type=content_type)
    assert cluster(by_header) == "agent.researcher"
    default = resolve(routes, AGENT + method, content_type=content_type)
    assert cluster(default) == "agent.assistant"
    unknown = resolve(routes, AGENT + method, agent="nobody", content_type=content_type)
    assert grpc_status(unknown) == "5"


def test_without_the_default_agent_grpc_web_is_unavailable_too() -> None:
    routes = routes_of(resources.build(directory("researcher"), GatewayOptions()))
    route = resolve(routes, AGENT + "RunTask", content_type="application/grpc-web+proto")
    assert grpc_status(route) == "14"


@pytest.mark.parametrize("agent", ["nobody", "Assistant", "assistant ", ""])
def test_unknown_agent_is_not_found_never_another_agents_answer(agent: str) -> None:
    routes = routes_of(resources.build(directory("assistant", "researcher"), GatewayOptions()))
    route = resolve(routes, AGENT + "RunTask", grpc=True, agent=agent)
    assert cluster(route) is None
    assert grpc_status(route) == "5"
    assert route.direct_response is not None and route.direct_response.status == 200
    headers = headers_added(route)
    assert headers["content-type"] == "application/grpc"
    assert headers["grpc-message"].isascii() and headers["grpc-message"].isprintable()


def test_an_agent_that_leaves_the_directory_becomes_not_found() -> None:
    routes = routes_of(resources.build(directory("assistant"), GatewayOptions()))
    assert grpc_status(resolve(routes, AGENT + "RunTask", grpc=True, agent="researcher")) == "5"
    assert all(cluster(r) != "agent.researcher" for r in routes)


def test_non_grpc_unknown_path_is_a_json_404() -> None:
    routes = routes_of(resources.build(directory("assistant"), GatewayOptions()))
    status, answer = direct_json(resolve(routes, "/nothing/here", method="GET"))
    assert status == 404 and answer["code"] == 5
    # under /v1/ a plain message, which the local-reply mappers make a JSON status
    route = resolve(routes, "/v1/nothing", method="GET")
    assert some(route.direct_response).status == 404 and body(route) == "no such path"


# --- timeouts and retries -----------------------------------------------------------


def _action(routes: list[Route], method: str, agent: str | None = "assistant"):
    route = resolve(routes, AGENT + method, grpc=True, agent=agent)
    assert route.route is not None
    return route.route


@pytest.mark.parametrize("agent", ["assistant", None])
def test_streams_have_no_route_timeout_unary_calls_do(agent: str | None) -> None:
    options = GatewayOptions(unary_timeout_seconds=42.0, watch_idle_timeout_seconds=77.0)
    routes = routes_of(resources.build(directory("assistant"), options))
    for method in ("StreamSteps", "WatchTask"):
        assert _action(routes, method, agent).timeout == datetime.timedelta(0)
    assert _action(routes, "WatchTask", agent).idle_timeout == datetime.timedelta(seconds=77)
    for method in ("RunTask", "SubmitTask", "GetTask", "CancelTask", "GetAgentCard"):
        assert _action(routes, method, agent).timeout == datetime.timedelta(seconds=42)
    # a caller's grpc-timeout bounds the call at the edge too
    assert _action(routes, "RunTask", agent).max_stream_duration.grpc_timeout_header_max == (
        datetime.timedelta(0)
    )


def test_json_streams_have_no_route_timeout() -> None:
    routes = routes_of(resources.build(directory("assistant"), GatewayOptions()))
    stream = resolve(routes, "/v1/agents/assistant/tasks:stream")
    events = resolve(routes, "/v1/agents/assistant/tasks/t-1/events", method="GET")
    run = resolve(routes, "/v1/agents/assistant/tasks:run")
    assert some(stream.route).timeout == datetime.timedelta(0)
    assert some(events.route).timeout == datetime.timedelta(0)
    assert some(run.route).timeout == datetime.timedelta(seconds=330)


@pytest.mark.parametrize("agent", ["assistant", None])
def test_only_idempotent_methods_retry_on_unavailable(agent: str | None) -> None:
    routes = routes_of(resources.build(directory("assistant"), GatewayOptions()))
    for method in ("GetTask", "GetAgentCard", "WatchTask"):
        retry_on = _action(routes, method, agent).retry_policy.retry_on.split(",")
        assert "unavailable" in retry_on, method
    for method in ("RunTask", "StreamSteps", "SubmitTask", "CancelTask"):
        retry_on = _action(routes, method, agent).retry_policy.retry_on.split(",")
        assert "unavailable" not in retry_on, method
        # a request that never reached the service is always safe to send again: a
        # replica gone, a stream above a stopping server's GOAWAY, a connection closing
        # before Envoy wrote the request
        assert {"connect-failure", "refused-stream", "reset-before-request"} <= set(retry_on), (
            method
        )
        assert "reset" not in retry_on, method  # a reset after sending may have run it
    policy = _action(routes, "RunTask", agent).retry_policy
    assert [p.name for p in policy.retry_host_predicate] == [
        "envoy.retry_host_predicates.previous_hosts"
    ]


def test_json_retries_follow_the_http_method() -> None:
    routes = routes_of(resources.build(directory("assistant"), GatewayOptions()))
    get_task = resolve(routes, "/v1/agents/assistant/tasks/t-1", method="GET")
    submit = resolve(routes, "/v1/agents/assistant/tasks")
    assert "unavailable" in some(some(get_task.route).retry_policy).retry_on
    assert "unavailable" not in some(some(submit.route).retry_policy).retry_on


# --- JSON, registry, console --------------------------------------------------------


def test_json_routes_are_per_agent_and_unknown_agents_get_404() -> None:
    routes = routes_of(resources.build(directory("assistant", "researcher"), GatewayOptions()))
    for agent in ("assistant", "researcher"):
        for path, method in (
            (f"/v1/agents/{agent}/tasks:run", "POST"),
            (f"/v1/agents/{agent}/tasks:stream", "POST"),
            (f"/v1/agents/{agent}/tasks", "POST"),
            (f"/v1/agents/{agent}/tasks/t-1", "GET"),
            (f"/v1/agents/{agent}/tasks/t-1:cancel", "POST"),
            (f"/v1/agents/{agent}/card", "GET"),
        ):
            assert cluster(resolve(routes, path, method=method)) == f"agent.{agent}", path
    # a name that is only a prefix of a real agent is not that agent
    for path in ("/v1/agents/nobody/tasks:run", "/v1/agents/assist/card", "/v1/agents/x"):
        route = resolve(routes, path)
        assert some(route.direct_response).status == 404, path
        assert body(route).startswith("no such agent"), path


def test_agents_listing_names_the_routable_agents() -> None:
    built = resources.build(directory("assistant", "researcher", replicas=2), GatewayOptions())
    status, body = direct_json(resolve(routes_of(built), "/v1/agents", method="GET"))
    assert status == 200
    assert body == {
        "default_agent": "assistant",
        "agents": [{"name": "assistant", "replicas": 2}, {"name": "researcher", "replicas": 2}],
    }


def test_registry_routes() -> None:
    routes = routes_of(resources.build(directory("assistant"), GatewayOptions()))
    for method in ("ListTools", "GetTool", "RegisterTool", "InvokeTool"):
        # whatever the agent header says, and without one
        for agent in (None, "assistant", "nobody"):
            route = resolve(routes, REGISTRY + method, grpc=True, agent=agent)
            assert cluster(route) == REGISTRY_CLUSTER, (method, agent)
    list_tools = some(resolve(routes, REGISTRY + "ListTools", grpc=True).route)
    assert "unavailable" in some(list_tools.retry_policy).retry_on
    invoke_tool = some(resolve(routes, REGISTRY + "InvokeTool", grpc=True).route)
    assert "unavailable" not in some(invoke_tool.retry_policy).retry_on
    assert cluster(resolve(routes, "/v1/tools", method="GET")) == REGISTRY_CLUSTER
    assert cluster(resolve(routes, "/v1/tools/calculator", method="GET")) == REGISTRY_CLUSTER
    # only reads are exposed over JSON
    assert cluster(resolve(routes, "/v1/tools", method="POST")) is None
    assert cluster(resolve(routes, "/v1/tools/a/b", method="GET")) is None
    # the reserved header value reaches the registry (reflection, so grpcurl works for it)
    assert cluster(resolve(routes, AGENT + "RunTask", grpc=True, agent="registry")) == (
        REGISTRY_CLUSTER
    )


def test_console_routes() -> None:
    routes = routes_of(resources.build(directory("assistant"), GatewayOptions()))
    root = resolve(routes, "/", method="GET")
    assert root.redirect is not None and root.redirect.path_redirect == "/console/"
    page = resolve(routes, "/console/", method="GET")
    assert some(page.direct_response).status == 200
    assert "<title>agentplex console</title>" in body(page)
    types = {}
    for name in ("console.js", "console.css", "protobuf.min.js", "agentplex.json"):
        route = resolve(routes, f"/console/{name}", method="GET")
        assert route.direct_response is not None and route.direct_response.status == 200, name
        types[name] = headers_added(route)["content-type"]
    assert types["console.js"].startswith("text/javascript")
    assert types["agentplex.json"] == "application/json"
    schema = json.loads(body(resolve(routes, "/console/agentplex.json", method="GET")))
    v1 = schema["nested"]["agentplex"]["nested"]["v1"]["nested"]
    assert {"StreamStepsRequest", "StepEvent", "SubmitTaskRequest"} <= set(v1)
    # every body fits the route table's direct-response limit
    (config,) = resources.build(directory("assistant"), GatewayOptions()).routes
    for route in routes:
        if route.direct_response is not None and route.direct_response.body is not None:
            size = len(body(route).encode())
            assert size <= some(config.max_direct_response_body_size_bytes)

    without = routes_of(resources.build(directory("assistant"), GatewayOptions(console=False)))
    assert direct_json(resolve(without, "/console/", method="GET"))[0] == 404
    assert resolve(without, "/", method="GET").redirect is None


def test_cors_allows_only_the_configured_origins() -> None:
    built = resources.build(
        directory("assistant"), GatewayOptions(cors_origins=("http://app.example",))
    )
    (config,) = built.routes
    per_filter = config.virtual_hosts[0].typed_per_filter_config
    policy = unpacked(per_filter["envoy.filters.http.cors"], CorsPolicy)
    assert [m.exact for m in policy.allow_origin_string_match] == ["http://app.example"]
    assert AGENT_HEADER in policy.allow_headers and "x-grpc-web" in policy.allow_headers
    assert "grpc-status" in policy.expose_headers


def test_clusters_and_endpoints_follow_the_directory() -> None:
    built = resources.build(directory("assistant", "researcher", replicas=2), GatewayOptions())
    assert [c.name for c in built.clusters] == ["agent.assistant", "agent.researcher", "registry"]
    by_cluster = {
        a.cluster_name: [socket_of(e) for locality in a.endpoints for e in locality.lb_endpoints]
        for a in built.endpoints
    }
    assert by_cluster == {
        "agent.assistant": [("127.0.0.1", 7000), ("127.0.0.1", 7001)],
        "agent.researcher": [("127.0.0.1", 7010), ("127.0.0.1", 7011)],
        "registry": [("127.0.0.1", 6000)],
    }
    for built_cluster in built.clusters:
        assert built_cluster.health_checks[0].grpc_health_check is not None
        lb_config = some(built_cluster.common_lb_config)
        assert some(lb_config.healthy_panic_threshold).value == 0.0


def test_listener_takes_its_routes_over_rds() -> None:
    (listener,) = resources.build(directory("assistant"), GatewayOptions(listen_port=0)).listeners
    manager = unpacked(listener.filter_chains[0].filters[0].typed_config, HttpConnectionManager)
    assert some(manager.rds).route_config_name == resources.ROUTE_CONFIG_NAME
    names = [f.name for f in manager.http_filters]
    assert names[-1] == "envoy.filters.http.router"
    # gRPC-Web must become gRPC before the transcoder and router see the request
    assert names.index("envoy.filters.http.grpc_web") < names.index(
        "envoy.filters.http.grpc_json_transcoder"
    )
    assert names.index("envoy.filters.http.cors") < names.index("envoy.filters.http.grpc_web")


# --- keepalive, drain, header limits ------------------------------------------------


def _http2_options(cluster: Cluster) -> Http2ProtocolOptions:
    packed = cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    explicit = some(unpacked(packed, UpstreamHttpProtocolOptions).explicit_http_config)
    return some(explicit.http2_protocol_options)


def test_upstream_connections_are_kept_alive_by_pings_and_tcp_keepalive() -> None:
    options = GatewayOptions(keepalive_seconds=7, keepalive_timeout_seconds=3)
    for cluster in resources.build(directory("assistant"), options).clusters:
        keepalive = some(_http2_options(cluster).connection_keepalive)
        assert keepalive.interval == datetime.timedelta(seconds=7), cluster.name
        assert keepalive.timeout == datetime.timedelta(seconds=3), cluster.name
        assert some(keepalive.interval_jitter).value == resources.KEEPALIVE_JITTER_PERCENT
        tcp = some(some(cluster.upstream_connection_options).tcp_keepalive)
        assert (tcp.keepalive_time, tcp.keepalive_interval) == (7, 3), cluster.name
        assert tcp.keepalive_probes == resources.TCP_KEEPALIVE_PROBES


def test_keepalive_follows_the_mesh_wide_settings() -> None:
    settings = Settings(keepalive_seconds=4, keepalive_timeout_seconds=2)
    options = GatewaySettings().options(Keepalive.from_settings(settings))
    assert (options.keepalive_seconds, options.keepalive_timeout_seconds) == (4, 2)
    # jitter adds up to 15 % of the interval before a PING; the timeout runs after it
    assert resources.keepalive_detection_seconds(options) == pytest.approx(4 * 1.15 + 2)


def test_default_keepalive_detects_a_frozen_peer_within_30_seconds() -> None:
    """The issue's bound, for the defaults a mesh runs with: Envoy's upstream
    connections and the mesh's own channels (see Keepalive)."""
    settings = Settings()
    keepalive = Keepalive.from_settings(settings)
    options = GatewaySettings.from_settings(settings).options(keepalive)
    assert resources.keepalive_detection_seconds(options) <= 30
    assert keepalive.seconds + keepalive.timeout_seconds <= 30


def test_the_stream_idle_timeout_is_not_what_finds_a_frozen_agent() -> None:
    """Keepalive ends a frozen agent's streams long before the idle timeout would, which
    stays long enough for a live but silent stream (a model call up to its deadline)."""
    settings = Settings()
    options = GatewaySettings.from_settings(settings).options(Keepalive.from_settings(settings))
    assert resources.keepalive_detection_seconds(options) < options.stream_idle_timeout_seconds
    assert settings.llm_timeout_seconds < options.stream_idle_timeout_seconds


def test_a_stopping_replica_is_ejected_well_within_the_default_drain() -> None:
    settings = Settings()
    options = GatewaySettings.from_settings(settings).options()
    (cluster, *_) = resources.build(directory("assistant"), options).clusters
    (check,) = cluster.health_checks
    assert check.unhealthy_threshold == resources.UNHEALTHY_THRESHOLD
    assert check.interval == datetime.timedelta(seconds=options.health_check_interval_seconds)
    # NOT_SERVING ejects at the next check, with at least another check interval left
    # before the replica stops accepting calls
    assert resources.ejection_seconds(options) == options.health_check_interval_seconds
    assert resources.drain_fits(options, settings.drain_seconds)
    assert not resources.drain_fits(replace(options, health_check_interval_seconds=2.0), 3.0)


def test_whatever_the_edge_admits_fits_the_services_metadata_limit() -> None:
    """Oversize headers are refused at the edge (431), never by an agent (429 through the
    transcoder): the edge's limit, gRPC's per-header overhead and what Envoy adds stay
    within what the services' gRPC servers accept."""
    options = GatewayOptions()
    assert resources.upstream_metadata_bytes(options) <= resources.UPSTREAM_METADATA_LIMIT_BYTES
    (listener,) = resources.build(directory("assistant"), options).listeners
    manager = unpacked(listener.filter_chains[0].filters[0].typed_config, HttpConnectionManager)
    assert manager.max_request_headers_kb == options.max_request_headers_kb
    assert some(manager.common_http_protocol_options).max_headers_count == (
        options.max_request_headers
    )


# --- HostPort -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:50051", HostPort("127.0.0.1", 50051)),
        ("localhost:8080", HostPort("127.0.0.1", 8080)),
        ("[::1]:9000", HostPort("::1", 9000)),
        ("[2001:db8::7]:1", HostPort("2001:db8::7", 1)),
        ("10.1.2.3:0", HostPort("10.1.2.3", 0)),
    ],
)
def test_hostport_parses_ip_addresses(text: str, expected: HostPort) -> None:
    assert HostPort.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "agent.internal:50051",  # names would need a DNS cluster
        "example.com:80",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:http",
        ":8080",
        "",
        "256.0.0.1:80",
        "127.0.0.1:-1",
        "127.0.0.1:65536",  # Envoy would NACK the whole EDS update
    ],
)
def test_hostport_rejects_what_eds_cannot_take(text: str) -> None:
    with pytest.raises(ValueError):
        HostPort.parse(text)


# --- snapshots ----------------------------------------------------------------------


def test_consistency_rejects_a_route_to_a_missing_cluster() -> None:
    built = resources.build(directory("assistant", "researcher"), GatewayOptions())
    dropped = replace(
        built,
        clusters=[c for c in built.clusters if c.name != "agent.researcher"],
        endpoints=[e for e in built.endpoints if e.cluster_name != "agent.researcher"],
    )
    with pytest.raises(InconsistentSnapshot, match=r"agent\.researcher"):
        snapshot.check_consistency(dropped)
    with pytest.raises(InconsistentSnapshot):
        Snapshot.of(dropped)


def test_consistency_rejects_clusters_without_endpoints_and_strays() -> None:
    built = resources.build(directory("assistant"), GatewayOptions())
    no_endpoints = replace(built, endpoints=built.endpoints[:-1])
    with pytest.raises(InconsistentSnapshot, match="without endpoints"):
        snapshot.check_consistency(no_endpoints)
    other = resources.build(directory("assistant", "researcher"), GatewayOptions())
    stray = replace(built, endpoints=other.endpoints)
    with pytest.raises(InconsistentSnapshot, match="unknown clusters"):
        snapshot.check_consistency(stray)


def test_consistency_rejects_a_listener_without_its_route_table() -> None:
    built = resources.build(directory("assistant"), GatewayOptions())
    with pytest.raises(InconsistentSnapshot, match="unknown routes"):
        snapshot.check_consistency(replace(built, routes=[]))


def test_consistency_accepts_what_build_makes() -> None:
    for agents in ((), ("assistant",), ("assistant", "researcher", "supervisor")):
        snapshot.check_consistency(resources.build(directory(*agents), GatewayOptions()))


def test_snapshot_versions_are_stable_for_equal_input() -> None:
    first = Snapshot.of(resources.build(directory("assistant", "researcher"), GatewayOptions()))
    again = Snapshot.of(resources.build(directory("assistant", "researcher"), GatewayOptions()))
    for type_url in snapshot.ORDER:
        assert first.version(type_url) == again.version(type_url) != ""


def test_snapshot_versions_change_only_for_the_changed_type() -> None:
    base = Snapshot.of(resources.build(directory("assistant", "researcher"), GatewayOptions()))
    # another replica: only the endpoints change (and the listing, which is a route)
    more = Snapshot.of(
        resources.build(directory("assistant", "researcher", replicas=2), GatewayOptions())
    )
    assert more.version(snapshot.CLUSTER) == base.version(snapshot.CLUSTER)
    assert more.version(snapshot.LISTENER) == base.version(snapshot.LISTENER)
    assert more.version(snapshot.ENDPOINT) != base.version(snapshot.ENDPOINT)

    # a replica moving to another port changes only the endpoints
    moved_dir = directory("assistant", "researcher")
    moved_dir = Directory(
        agents={**moved_dir.agents, "researcher": (HostPort("127.0.0.1", 9999),)},
        registry=moved_dir.registry,
    )
    moved = Snapshot.of(resources.build(moved_dir, GatewayOptions()))
    assert moved.version(snapshot.ENDPOINT) != base.version(snapshot.ENDPOINT)
    for type_url in (snapshot.CLUSTER, snapshot.LISTENER, snapshot.ROUTE):
        assert moved.version(type_url) == base.version(type_url), type_url

    # a new listen port changes only the listener
    relisten = Snapshot.of(
        resources.build(directory("assistant", "researcher"), GatewayOptions(listen_port=9))
    )
    assert relisten.version(snapshot.LISTENER) != base.version(snapshot.LISTENER)
    for type_url in (snapshot.CLUSTER, snapshot.ENDPOINT, snapshot.ROUTE):
        assert relisten.version(type_url) == base.version(type_url), type_url

    # a new agent changes clusters, endpoints and routes, not the listener
    grown = Snapshot.of(
        resources.build(directory("assistant", "researcher", "supervisor"), GatewayOptions())
    )
    for type_url in (snapshot.CLUSTER, snapshot.ENDPOINT, snapshot.ROUTE):
        assert grown.version(type_url) != base.version(type_url), type_url
    assert grown.version(snapshot.LISTENER) == base.version(snapshot.LISTENER)


def test_snapshot_serves_resources_by_name() -> None:
    snap = Snapshot.of(resources.build(directory("assistant", "researcher"), GatewayOptions()))
    assert len(snap.resources(snapshot.CLUSTER)) == 3
    (only,) = snap.resources(snapshot.ENDPOINT, ["agent.researcher"])
    assert only.type_url == snapshot.ENDPOINT
    assert snap.resources(snapshot.ENDPOINT, ["agent.nobody"]) == []
    assert snap.version("type.googleapis.com/unknown") == ""


def test_the_gateway_traces_only_when_the_mesh_exports_over_otlp() -> None:
    plain = resources.build(directory("assistant"), GatewayOptions())
    (listener,) = plain.listeners
    manager = unpacked(listener.filter_chains[0].filters[0].typed_config, HttpConnectionManager)
    assert manager.tracing is None
    assert resources.TRACES_CLUSTER not in {cluster.name for cluster in plain.clusters}

    receiver = HostPort("127.0.0.1", 4317)
    traced = resources.build(directory("assistant"), GatewayOptions(otlp_traces=receiver))
    (listener,) = traced.listeners
    manager = unpacked(listener.filter_chains[0].filters[0].typed_config, HttpConnectionManager)
    provider = some(some(manager.tracing).provider)
    assert provider.name == "envoy.tracers.opentelemetry"
    assert resources.TRACES_CLUSTER in {cluster.name for cluster in traced.clusters}
    (assignment,) = [e for e in traced.endpoints if e.cluster_name == resources.TRACES_CLUSTER]
    endpoint = some(some(assignment.endpoints[0].lb_endpoints[0].endpoint).address)
    assert some(endpoint.socket_address).port_value == 4317
    # A snapshot with the receiver is consistent (its cluster has its endpoints).
    Snapshot.of(traced)


def test_the_control_plane_points_envoy_at_the_mesh_receiver() -> None:
    from agentplex.gateway.app import otlp_traces_receiver

    assert otlp_traces_receiver(Settings(trace_exporter="none")) is None
    assert otlp_traces_receiver(
        Settings(trace_exporter="otlp", otel_exporter_otlp_endpoint="http://127.0.0.1:4999")
    ) == HostPort("127.0.0.1", 4999)
    # The SDK's default when no endpoint is set; a DNS name is not an EDS address.
    assert otlp_traces_receiver(Settings(trace_exporter="otlp")) == HostPort("127.0.0.1", 4317)
    assert (
        otlp_traces_receiver(
            Settings(trace_exporter="otlp", otel_exporter_otlp_endpoint="http://collector:4317")
        )
        is None
    )
