"""Pure builders: the agent directory in, Envoy's listeners, routes, clusters and endpoints out.

Nothing here does I/O, so every routing and resilience decision is a plain
function of (directory, options) that unit tests can read back. The
discovery server only ships what these functions return.

Routing, in the order Envoy matches it:
- `/`, `/console/…`: the web console, served by Envoy itself (direct responses).
- `/v1/agents`: the routable agents as JSON; `/v1/agents/{agent}/…`: the JSON
  API, transcoded to AgentService calls on that agent's cluster.
- `/v1/tools…` and `/agentplex.v1.ToolRegistryService/…`: the registry.
- gRPC and gRPC-Web with `x-agentplex-agent: NAME`: that agent (the name
  `registry` reaches the registry, so reflection — and grpcurl — work for it).
- gRPC without the header: the default agent.
An agent name nobody serves gets NOT_FOUND, never another agent's answer.
JSON routes that take a body have it checked for unknown fields first (ext_proc,
answered by the control plane: `json_bodies.py`); every error Envoy answers itself
on a `/v1/` path is a JSON `google.rpc.Status`, as the services' errors are
(`_local_replies`).

Authentication (opt-in, `JwtOptions`): Envoy's jwt_authn filter, after the health,
rate-limit, CORS and gRPC-Web filters and before everything that reads a body,
refuses a call without a valid bearer token — UNAUTHENTICATED for gRPC, a JSON 401
under `/v1/` — except `/health`, `/ready` (answered before it), CORS preflights
and the console's static files. A verified token's claims reach the services as
`PRINCIPAL_HEADERS`, marked `x-agentplex-principal: edge` (`_mark_edge`); the token
itself does not. Callers' own principal headers are dropped at the door, whatever
the mode (`_strip_principal`). Each tenant then has a rate limit of its own, within
the gateway-wide one (`_tenant_rate_limit`). Every refusal at the edge (a token, a
rate limit) is an audit line (`_audit_logs`).

A replica going away, as the gateway sees it (`drain_fits` has the timeline):
on SIGTERM the replica's health turns NOT_SERVING while it keeps serving for
its drain delay; Envoy's next active health check ejects it, well before the
delay ends, so nothing new is sent to it when it stops accepting calls; the
calls it still runs get its grace period. A request that races the stop is
retried on another replica when it provably never reached the service
(connect failure, refused stream, reset before the request was sent).

A replica that freezes instead (SIGSTOP, a hung host, a half-open connection)
stops answering HTTP/2 PINGs: Envoy closes the connection within
`keepalive_detection_seconds`, long before any idle timeout would. A call
still waiting for its answer then gets UNAVAILABLE; a stream whose response
has begun is reset (gRPC reports INTERNAL: a proxy cannot add a status to a
response already under way).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import betterproto2
from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLog,
    AccessLogFilter,
    AndFilter,
    ComparisonFilter,
    ComparisonFilterOp,
    HeaderFilter,
    MetadataFilter,
    OrFilter,
    ResponseFlagFilter,
    StatusCodeFilter,
)
from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterCommonLbConfig,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterEdsClusterConfig,
    ClusterLbPolicy,
    OutlierDetection,
    UpstreamConnectionOptions,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import (
    HeaderMutation as HeaderMutationRule,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    AggregatedConfigSource,
    ApiVersion,
    ConfigSource,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    Http2ProtocolOptions,
    HttpProtocolOptions,
    HttpProtocolOptionsHeadersWithUnderscoresAction,
    HttpUri,
    KeepaliveSettings,
    RuntimeFractionalPercent,
    RuntimeUInt32,
    SocketAddress,
    SubstitutionFormatString,
    TcpKeepalive,
    TransportSocket,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    RateLimit,
    RateLimitAction,
    RateLimitActionRequestHeaders,
    RedirectAction,
    RetryPolicy,
    RetryPolicyRetryHostPredicate,
    Route,
    RouteAction,
    RouteActionMaxStreamDuration,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.access_loggers.file.v3 import FileAccessLog
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.common.ratelimit.v3 import (
    LocalRateLimitDescriptor,
    RateLimitDescriptorEntry,
)
from envoy_data_plane.envoy.extensions.filters.http.buffer.v3 import Buffer, BufferPerRoute
from envoy_data_plane.envoy.extensions.filters.http.cors.v3 import Cors, CorsPolicy
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    ExtProcOverrides,
    ExtProcPerRoute,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.http.grpc_json_transcoder.v3 import (
    GrpcJsonTranscoder,
    GrpcJsonTranscoderPrintOptions,
    GrpcJsonTranscoderRequestValidationOptions,
)
from envoy_data_plane.envoy.extensions.filters.http.grpc_web.v3 import GrpcWeb
from envoy_data_plane.envoy.extensions.filters.http.health_check.v3 import (
    HealthCheck as HealthCheckFilter,
)
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwksAsyncFetch,
    JwtAuthentication,
    JwtClaimToHeader,
    JwtHeader,
    JwtProvider,
    JwtRequirement,
    PerRouteConfig,
    RemoteJwks,
    RequirementRule,
)
from envoy_data_plane.envoy.extensions.filters.http.local_ratelimit.v3 import LocalRateLimit
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpConnectionManagerTracing,
    HttpFilter,
    LocalReplyConfig,
    Rds,
    ResponseMapper,
)
from envoy_data_plane.envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    HeaderMutation,
)
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3 import (
    PreviousHostsPredicate,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions as UpstreamHttpProtocolOptions,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    MetadataMatcher,
    MetadataMatcherPathSegment,
    RegexMatcher,
    StringMatcher,
    ValueMatcher,
)
from envoy_data_plane.envoy.type.v3 import FractionalPercent, Percent, TokenBucket
from envoy_data_plane.google.protobuf import Any, Struct

from agentplex.contract import callers
from agentplex.gateway import console, descriptors, json_bodies
from agentplex.runtime import principal
from agentplex.runtime.errors import ERROR_DOMAIN
from agentplex.runtime.server import MAX_METADATA_BYTES
from agentplex.runtime.settings import check_jwks_uri
from agentplex.runtime.tls import spiffe_id

AGENT_HEADER = "x-agentplex-agent"
REGISTRY_TARGET = "registry"  # reserved name: the header value that reaches the registry
LISTENER_NAME = "gateway"
ROUTE_CONFIG_NAME = "gateway"
REGISTRY_CLUSTER = "registry"
# Where Envoy sends its own spans (OTLP over gRPC), when the mesh exports traces.
TRACES_CLUSTER = "otlp-traces"
# The control plane itself, a static cluster of Envoy's bootstrap (`bootstrap.py`): it
# serves ADS and the ExternalProcessor that checks JSON bodies (`json_bodies.py`).
CONTROL_PLANE_CLUSTER = "xds"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
# How long Envoy waits for the body check before going on without it (fail open).
JSON_BODY_CHECK_TIMEOUT_SECONDS = 1.0
AGENT_CLUSTER_PREFIX = "agent."
JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PROVIDER = "agentplex"
# Where Envoy fetches a remote JWKS from (the issuer's host, resolved by Envoy).
JWKS_CLUSTER = "jwks"
JWKS_FETCH_TIMEOUT_SECONDS = 5.0
# Tolerance for clocks that disagree, on `exp` and `nbf` (Envoy's default is 60 s).
JWT_CLOCK_SKEW_SECONDS = 30
# Dynamic metadata of the jwt_authn filter: the verified payload (for later filters and
# the access log) and, on a refusal, which check failed (for `_local_replies`).
JWT_PAYLOAD_METADATA = "jwt_payload"
JWT_FAILURE_METADATA = "jwt_failure"
# The verified principal, claim -> request header, stamped by the edge on each call that
# passed the token check, with `principal.PRINCIPAL_HEADER: edge` (`_mark_edge`). The edge
# owns all four names (`principal.HEADERS`): a caller's own are removed first.
PRINCIPAL_HEADERS = {
    "sub": principal.SUBJECT_HEADER,
    "tenant": principal.TENANT_HEADER,
    "scope": principal.SCOPE_HEADER,
}
TENANT_RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit.tenant"
# The descriptor key the per-tenant limit counts by (its value: the verified tenant claim).
TENANT_DESCRIPTOR = "tenant"
# Tenants whose buckets one Envoy keeps (least recently seen evicted first; an evicted
# tenant starts again from a full bucket). Far above any tenant count a mesh serves.
TENANT_RATE_LIMIT_MAX_TENANTS = 10_000
# Edge audit lines: the requests the gateway itself refuses (`_audit_logs`).
AUDIT_OUTCOME_DENIED = "denied"
# Envoy's response flag for a request a local rate limit refused (global or per tenant).
RATE_LIMITED_FLAG = "RL"

_AGENT_SERVICE = "/" + descriptors.AGENT_SERVICE + "/"
_REGISTRY_SERVICE = "/" + descriptors.REGISTRY_SERVICE + "/"
_STREAMING_METHODS = ("StreamSteps", "WatchTask")
# Safe to send twice: they read, or (WatchTask) resume from the caller's cursor.
_IDEMPOTENT_METHODS = ("GetTask", "GetAgentCard", "WatchTask")
_HEALTH_PATH = "/grpc.health.v1.Health/"
_REFLECTION_PREFIXES = (
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)
# The request never reached the service, so sending it again is safe for any call:
# no connection (a replica gone), REFUSED_STREAM (a stream above a stopping server's
# GOAWAY), a reset before Envoy wrote the request (a connection closing under it).
_NEVER_SENT = "connect-failure,refused-stream,reset-before-request"
# gRPC and gRPC-Web (application/grpc, application/grpc+proto, application/grpc-web…).
# Not RouteMatch.grpc: that matches application/grpc only, and the route is picked while
# the request still has the browser's content type (the gRPC-Web filter rewrites it
# later), so gRPC-Web calls to RunTask or SubmitTask found no route but the errors.
_GRPC_CONTENT = HeaderMatcher(
    name="content-type", string_match=StringMatcher(prefix="application/grpc")
)
# For routes that never read the body (answered by Envoy, or bidirectional streams).
_NO_BUFFER = {"envoy.filters.http.buffer": Any.pack(BufferPerRoute(disabled=True))}
# Only the request body, whole, and nothing else: no headers round trip (the method and
# path travel as attributes with the body), nothing on the response.
_BODY_ONLY = ProcessingMode(
    request_header_mode=ProcessingModeHeaderSendMode.SKIP,
    response_header_mode=ProcessingModeHeaderSendMode.SKIP,
    request_body_mode=ProcessingModeBodySendMode.BUFFERED,
    response_body_mode=ProcessingModeBodySendMode.NONE,
    request_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
    response_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
)
# The JSON routes that carry a body turn the body check on; everywhere else (gRPC,
# gRPC-Web, GETs, Envoy's own answers) the virtual host keeps it off.
_CHECK_JSON_BODY = {
    EXT_PROC_FILTER: Any.pack(
        ExtProcPerRoute(overrides=ExtProcOverrides(processing_mode=_BODY_ONLY))
    )
}
# google.rpc.Code for the HTTP statuses the gateway itself answers with (the inverse of
# google/rpc/code.proto's mapping), for the JSON bodies of its own errors.
_HTTP_TO_CODE = {
    400: 3,  # INVALID_ARGUMENT
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    404: 5,  # NOT_FOUND
    408: 4,  # DEADLINE_EXCEEDED
    409: 10,  # ABORTED
    413: 8,  # RESOURCE_EXHAUSTED (as for gRPC callers: a message over the limit)
    429: 8,  # RESOURCE_EXHAUSTED
    431: 8,  # RESOURCE_EXHAUSTED
    499: 1,  # CANCELLED
    500: 13,  # INTERNAL
    501: 12,  # UNIMPLEMENTED
    502: 14,  # UNAVAILABLE
    503: 14,  # UNAVAILABLE
    504: 4,  # DEADLINE_EXCEEDED
}
_CODE_NAMES = {
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    10: "ABORTED",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    16: "UNAUTHENTICATED",
}
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


# The routes a caller reaches without a token (the console's static files).
_NO_AUTH = {JWT_FILTER: Any.pack(PerRouteConfig(disabled=True))}


# Active health checks: a replica that answers NOT_SERVING leaves the rotation at once;
# one that does not answer (timeout, refused connection) after this many checks in a row,
# so one lost check is not enough. One passed check brings it back.
UNHEALTHY_THRESHOLD = 2
HEALTHY_THRESHOLD = 1
HEALTH_CHECK_TIMEOUT_SECONDS = 1.0
# Envoy adds up to this share of the interval to each keepalive PING's wait (its default,
# set explicitly so the detection bound below is exact).
KEEPALIVE_JITTER_PERCENT = 15.0
# TCP keepalive probes before the kernel gives up on a silent peer.
TCP_KEEPALIVE_PROBES = 3
# What the services' gRPC servers accept as request metadata, counted as gRPC counts it
# (name + value + 32 bytes per entry): runtime.server.MAX_METADATA_BYTES. Above it a
# server refuses calls with RESOURCE_EXHAUSTED, which the JSON transcoder answers as 429.
UPSTREAM_METADATA_LIMIT_BYTES = MAX_METADATA_BYTES
# What Envoy adds to a request on its way up (x-request-id, x-forwarded-for,
# x-forwarded-proto, x-envoy-expected-rq-timeout-ms, te, …), generously.
ENVOY_ADDED_HEADERS = 10
ENVOY_ADDED_HEADER_BYTES = 512


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)


@dataclass(frozen=True, order=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, address: str, *, allow_names: bool = False) -> HostPort:
        """`host:port` (IPv6 as `[::1]:port`); `localhost` becomes 127.0.0.1 for Envoy's EDS.

        EDS takes IPs only; `allow_names` accepts a DNS name too, for a cluster Envoy
        resolves itself (the control plane's, `is_name`).
        """
        host, sep, port = address.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
            raise ValueError(f"not a host:port address: {address!r}")
        host = host.strip("[]")
        if host == "localhost":
            host = "127.0.0.1"
        parsed = cls(host, int(port))
        if not (allow_names and parsed.is_name):
            ipaddress.ip_address(host)
        return parsed

    @property
    def is_name(self) -> bool:
        """A DNS name rather than an IP address."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return True
        return False


@dataclass(frozen=True)
class Directory:
    """What the gateway routes to: every agent's live replicas, and the registry's."""

    agents: Mapping[str, tuple[HostPort, ...]]
    registry: tuple[HostPort, ...]


@dataclass(frozen=True)
class JwtOptions:
    """Bearer tokens the edge accepts: signed by a key of the issuer's JWKS, for one of
    the audiences, within their `exp`/`nbf` (give or take `JWT_CLOCK_SKEW_SECONDS`).

    The keys come from exactly one of `jwks_uri` (fetched and cached by Envoy) and
    `jwks` (a JWKS document, given to Envoy inline). Which algorithms verify follows
    from the keys (RSA, EC P-256, Ed25519, …); `alg: none` never does.
    """

    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str | None = None
    jwks: str | None = None
    jwks_cache_seconds: float = 300.0
    # For an https `jwks_uri`: the CAs (a PEM file on Envoy's host) its certificate must
    # chain to. Envoy has no "system roots" of its own.
    jwks_ca_file: str = "/etc/ssl/certs/ca-certificates.crt"

    def __post_init__(self) -> None:
        if not self.issuer or not self.audiences:
            raise ValueError("a token check needs an issuer and at least one audience")
        if (self.jwks_uri is None) == (self.jwks is None):
            raise ValueError("a token check needs exactly one of jwks_uri and jwks")
        if self.jwks_uri is not None:
            check_jwks_uri(self.jwks_uri)


@dataclass(frozen=True)
class UpstreamTls:
    """Envoy's mTLS to agents and the registry: files Envoy reads itself (absolute paths)."""

    ca_file: str
    cert_file: str  # Envoy's own certificate, identity `gateway`
    key_file: str


@dataclass(frozen=True)
class GatewayOptions:
    """The edge policy. Defaults follow Envoy's edge-proxy best practices, sized for a dev box."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    default_agent: str = "assistant"
    # Origins allowed to call through gRPC-Web/JSON from a browser, besides the gateway's own.
    cors_origins: tuple[str, ...] = ()
    max_request_bytes: int = 1024 * 1024
    rate_limit_per_second: int = 1000
    rate_limit_burst: int = 2000
    # Each tenant's share, with tokens (`jwt`): its own bucket, keyed by the verified tenant
    # claim (`_tenant_rate_limit`). 0 per second: none; 0 burst: one second's worth.
    tenant_rate_limit_per_second: int = 100
    tenant_rate_limit_burst: int = 200
    unary_timeout_seconds: float = 330.0
    stream_idle_timeout_seconds: float = 300.0
    watch_idle_timeout_seconds: float = 3600.0
    health_check_interval_seconds: float = 1.0
    # HTTP/2 PINGs to every upstream connection (and TCP keepalive under them): the
    # mesh-wide keepalive settings, so Envoy pings agents as often as they allow.
    keepalive_seconds: float = 10.0
    keepalive_timeout_seconds: float = 10.0
    # Request headers the edge admits (431 over HTTP/1.1, a refused stream over HTTP/2):
    # room for bearer tokens and cookies, and small enough that whatever it admits, plus
    # what Envoy adds, stays within the services' metadata limit: otherwise they, not
    # the edge, refuse it (see `upstream_metadata_bytes`).
    max_request_headers_kb: int = 32
    max_request_headers: int = 100
    max_connections_per_cluster: int = 1024
    max_requests_per_cluster: int = 4096
    console: bool = True
    access_log: bool = True
    # Where the edge's audit lines (`_audit_logs`) go, on Envoy's host: the mesh's audit
    # file (`audit_log_file`); None: Envoy's stdout, with the access log.
    audit_log_file: str | None = None
    max_concurrent_streams: int = 1000
    # The OTLP/gRPC receiver the mesh's traces go to (AGENTPLEX_TRACE_EXPORTER or
    # OTEL_TRACES_EXPORTER = otlp): Envoy then opens each request's trace, as the span
    # "gateway", and the agent's spans become its children. None: no gateway spans.
    otlp_traces: HostPort | None = None
    # Bearer tokens required (everything but health, readiness, preflights and the
    # console); None: the edge lets every caller through.
    jwt: JwtOptions | None = None
    # mTLS to agents and the registry (service-to-service TLS on); None: plaintext.
    upstream_tls: UpstreamTls | None = None


@dataclass(frozen=True)
class Resources:
    listeners: list[Listener]
    routes: list[RouteConfiguration]
    clusters: list[Cluster]
    endpoints: list[ClusterLoadAssignment]


def agent_cluster(agent: str) -> str:
    return AGENT_CLUSTER_PREFIX + agent


def keepalive_detection_seconds(options: GatewayOptions) -> float:
    """Worst case from an upstream freezing to Envoy closing its connection.

    The next PING leaves within one interval (plus jitter) of the last one; unanswered
    for the timeout, the connection is closed and every call on it ends (UNAVAILABLE
    for a call not yet answered, a reset stream for one under way).
    """
    interval = options.keepalive_seconds * (1 + KEEPALIVE_JITTER_PERCENT / 100)
    return interval + options.keepalive_timeout_seconds


def ejection_seconds(options: GatewayOptions) -> float:
    """Worst case from a replica answering NOT_SERVING to Envoy no longer routing to it.

    Checks run every interval, and an answered check that says NOT_SERVING ejects at
    once (only unanswered ones count toward `UNHEALTHY_THRESHOLD`): the next check,
    within one interval plus its round trip (milliseconds on a live replica). Health
    changes reach the load balancer at once (`update_merge_window` 0).
    """
    return options.health_check_interval_seconds


def drain_fits(options: GatewayOptions, drain_seconds: float) -> bool:
    """True when a replica draining for `drain_seconds` is ejected with a check to spare.

    The timeline of one replica in a rolling restart, as this gateway runs it:

    - t=0, SIGTERM: its health turns NOT_SERVING; it still answers every call.
    - t <= `ejection_seconds` (1 s by default): Envoy's health checks have ejected it;
      new calls go to the other replicas. Calls already on it carry on.
    - t = drain_seconds (3 s by default): it stops accepting calls (GOAWAY). Nothing
      should arrive any more; a request that still races the stop is refused or
      never connects, and Envoy sends it to another replica (`_NEVER_SENT`).
    - t <= drain_seconds + grace: the calls it was running have finished (or are
      cancelled at the end of the grace period); it withdraws from the directory and
      the control plane drops it from the routes within two polls.

    So the drain must outlast the ejection; one more check interval of room covers a
    slow check, and a check lost on the way (which does not eject by itself).
    """
    return ejection_seconds(options) + options.health_check_interval_seconds <= drain_seconds


def upstream_metadata_bytes(options: GatewayOptions) -> int:
    """The most request metadata an admitted request can carry to a service, as gRPC
    counts it: the edge's byte limit, 32 bytes for each header the edge admits, and
    what Envoy adds. Must stay within `UPSTREAM_METADATA_LIMIT_BYTES`."""
    headers = options.max_request_headers + ENVOY_ADDED_HEADERS
    return options.max_request_headers_kb * 1024 + 32 * headers + ENVOY_ADDED_HEADER_BYTES


def build(directory: Directory, options: GatewayOptions) -> Resources:
    clusters = [
        _cluster(agent_cluster(name), options, callers.AGENT) for name in sorted(directory.agents)
    ]
    endpoints = [
        load_assignment(agent_cluster(name), directory.agents[name])
        for name in sorted(directory.agents)
    ]
    clusters.append(_cluster(REGISTRY_CLUSTER, options, callers.REGISTRY))
    endpoints.append(load_assignment(REGISTRY_CLUSTER, directory.registry))
    if options.otlp_traces is not None:
        clusters.append(_traces_cluster())
        endpoints.append(load_assignment(TRACES_CLUSTER, [options.otlp_traces]))
    if options.jwt is not None and options.jwt.jwks_uri is not None:
        jwks = _jwks_cluster(options.jwt.jwks_uri, options.jwt.jwks_ca_file)
        clusters.append(jwks)
        # The snapshot's consistency check wants an assignment for every cluster; Envoy
        # never asks EDS for a DNS cluster's, so this copy of its own is never sent.
        assert jwks.load_assignment is not None
        endpoints.append(jwks.load_assignment)
    return Resources(
        listeners=[_listener(options)],
        routes=[_route_configuration(directory, options)],
        clusters=clusters,
        endpoints=endpoints,
    )


# --- clusters and endpoints --------------------------------------------------------


def _traces_cluster() -> Cluster:
    """The OTLP receiver: plain HTTP/2 (gRPC), no health checks (a collector need not
    serve grpc.health), and nothing on the request path waits for it."""
    return Cluster(
        name=TRACES_CLUSTER,
        type=ClusterDiscoveryType.EDS,
        eds_cluster_config=ClusterEdsClusterConfig(eds_config=_ads()),
        connect_timeout=_seconds(1),
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": Any.pack(
                UpstreamHttpProtocolOptions(
                    explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                        http2_protocol_options=Http2ProtocolOptions()
                    )
                )
            )
        },
    )


def _jwks_cluster(uri: str, ca_file: str) -> Cluster:
    """The issuer's JWKS host, resolved by Envoy (a name or an IP); TLS for https, the
    certificate checked against `ca_file` and the host's name."""
    scheme, host, port, _ = check_jwks_uri(uri)
    cluster = Cluster(
        name=JWKS_CLUSTER,
        type=ClusterDiscoveryType.STRICT_DNS,
        dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED,
        connect_timeout=_seconds(JWKS_FETCH_TIMEOUT_SECONDS),
        load_assignment=load_assignment(JWKS_CLUSTER, [HostPort(host, port)]),
    )
    if scheme == "https":
        san_type = (
            SubjectAltNameMatcherSanType.DNS
            if HostPort(host, port).is_name
            else SubjectAltNameMatcherSanType.IP_ADDRESS
        )
        tls = UpstreamTlsContext(
            sni=host,
            common_tls_context=CommonTlsContext(
                validation_context=CertificateValidationContext(
                    trusted_ca=DataSource(filename=ca_file),
                    match_typed_subject_alt_names=[
                        SubjectAltNameMatcher(san_type=san_type, matcher=StringMatcher(exact=host))
                    ],
                )
            ),
        )
        cluster.transport_socket = TransportSocket(
            name="envoy.transport_sockets.tls", typed_config=Any.pack(tls)
        )
    return cluster


def _tracing(otlp_traces: HostPort | None) -> HttpConnectionManagerTracing | None:
    """Envoy's OpenTelemetry tracer: W3C trace context in and out (a caller's traceparent
    is continued, the agents get Envoy's), spans batched to the receiver."""
    if otlp_traces is None:
        return None
    return HttpConnectionManagerTracing(
        provider=TracingHttp(
            name="envoy.tracers.opentelemetry",
            typed_config=Any.pack(
                OpenTelemetryConfig(
                    grpc_service=GrpcService(
                        envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=TRACES_CLUSTER),
                        timeout=_seconds(1),
                    ),
                    service_name="gateway",
                )
            ),
        ),
    )


def _upstream_tls(tls: UpstreamTls, identity: str) -> TransportSocket:
    """Envoy presents the gateway's certificate and accepts only a peer certificate from
    the mesh CA naming `identity` (its URI SAN): replicas are reached by IP, so the
    identity, not the address, is what is checked. Health checks use it too."""
    context = UpstreamTlsContext(
        common_tls_context=CommonTlsContext(
            tls_certificates=[
                TlsCertificate(
                    certificate_chain=DataSource(filename=tls.cert_file),
                    private_key=DataSource(filename=tls.key_file),
                )
            ],
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(filename=tls.ca_file),
                match_typed_subject_alt_names=[
                    SubjectAltNameMatcher(
                        san_type=SubjectAltNameMatcherSanType.URI,
                        matcher=StringMatcher(exact=spiffe_id(identity)),
                    )
                ],
            ),
            # gRPC servers speak HTTP/2 over TLS only when ALPN says so.
            alpn_protocols=["h2"],
        ),
    )
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=Any.pack(context))


def _cluster(name: str, options: GatewayOptions, identity: str) -> Cluster:
    """An EDS cluster of replicas of one kind of service, whose mesh identity is
    `identity` (checked with mTLS on)."""
    http2 = UpstreamHttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http2_protocol_options=Http2ProtocolOptions(
                max_concurrent_streams=options.max_concurrent_streams,
                # A frozen replica (SIGSTOP, a hung host) keeps its TCP connection: its
                # kernel still acknowledges. Only an unanswered PING tells; the streams
                # on it then end instead of waiting out the idle timeout.
                connection_keepalive=KeepaliveSettings(
                    interval=_seconds(options.keepalive_seconds),
                    timeout=_seconds(options.keepalive_timeout_seconds),
                    interval_jitter=Percent(value=KEEPALIVE_JITTER_PERCENT),
                ),
            )
        )
    )
    interval = _seconds(options.health_check_interval_seconds)
    cluster = Cluster(
        name=name,
        type=ClusterDiscoveryType.EDS,
        eds_cluster_config=ClusterEdsClusterConfig(eds_config=_ads()),
        connect_timeout=_seconds(1),
        # A vanished host (powered off, partitioned) leaves no one to send a reset; TCP
        # keepalive finds such connections while they are idle, PINGs while in use.
        upstream_connection_options=UpstreamConnectionOptions(
            tcp_keepalive=TcpKeepalive(
                keepalive_probes=TCP_KEEPALIVE_PROBES,
                keepalive_time=math.ceil(options.keepalive_seconds),
                keepalive_interval=math.ceil(options.keepalive_timeout_seconds),
            )
        ),
        lb_policy=ClusterLbPolicy.LEAST_REQUEST,
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": Any.pack(http2)
        },
        # grpc.health.v1 answers SERVING only while the service's own dependencies
        # answer, so an agent that lost Redis leaves the rotation too; a stopping one
        # answers NOT_SERVING through its drain delay (`ejection_seconds`).
        health_checks=[
            HealthCheck(
                timeout=_seconds(HEALTH_CHECK_TIMEOUT_SECONDS),
                interval=interval,
                no_traffic_interval=interval,
                unhealthy_threshold=UNHEALTHY_THRESHOLD,
                healthy_threshold=HEALTHY_THRESHOLD,
                grpc_health_check=HealthCheckGrpcHealthCheck(),
            )
        ],
        # A replica that keeps failing is ejected before the next health check says so.
        outlier_detection=OutlierDetection(
            consecutive_5xx=5,
            consecutive_gateway_failure=3,
            interval=_seconds(1),
            base_ejection_time=_seconds(5),
            max_ejection_percent=100,
        ),
        circuit_breakers=CircuitBreakers(
            thresholds=[
                CircuitBreakersThresholds(
                    max_connections=options.max_connections_per_cluster,
                    max_pending_requests=options.max_connections_per_cluster,
                    max_requests=options.max_requests_per_cluster,
                    max_retries=16,
                )
            ]
        ),
        # No panic routing: with every replica unhealthy, fail fast (UNAVAILABLE)
        # instead of spraying requests at replicas known to be down.
        common_lb_config=ClusterCommonLbConfig(
            healthy_panic_threshold=Percent(value=0.0),
            # Apply health and membership changes at once instead of batching them for
            # a second: a started replica takes calls as soon as it passes a check.
            update_merge_window=_seconds(0),
        ),
        # A replica withdrawn from the directory leaves at once, healthy or not.
        ignore_health_on_host_removal=True,
    )
    if options.upstream_tls is not None:
        cluster.transport_socket = _upstream_tls(options.upstream_tls, identity)
    return cluster


def load_assignment(cluster: str, replicas: Sequence[HostPort]) -> ClusterLoadAssignment:
    return ClusterLoadAssignment(
        cluster_name=cluster,
        endpoints=[
            LocalityLbEndpoints(
                lb_endpoints=[
                    LbEndpoint(
                        endpoint=Endpoint(
                            address=Address(
                                socket_address=SocketAddress(
                                    address=replica.host, port_value=replica.port
                                )
                            )
                        )
                    )
                    for replica in sorted(set(replicas))
                ]
            )
        ],
    )


def _ads() -> ConfigSource:
    return ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)


# --- the listener ------------------------------------------------------------------


def _typed(name: str, config: betterproto2.Message) -> TypedExtensionConfig:
    return TypedExtensionConfig(name=name, typed_config=Any.pack(config))


def _http_filter(name: str, config: betterproto2.Message) -> HttpFilter:
    return HttpFilter(name=name, typed_config=Any.pack(config))


def _always() -> RuntimeFractionalPercent:
    return RuntimeFractionalPercent(default_value=FractionalPercent(numerator=100))


def _listener(options: GatewayOptions) -> Listener:
    manager = HttpConnectionManager(
        stat_prefix="gateway",
        # HTTP/1.1 for curl and browsers, h2c for gRPC, on one port.
        codec_type=HttpConnectionManagerCodecType.AUTO,
        rds=Rds(config_source=_ads(), route_config_name=ROUTE_CONFIG_NAME),
        # The caller's address is the TCP peer, not whatever X-Forwarded-For claims.
        use_remote_address=True,
        # Streams are bounded by idleness, not by total length (routes say more). The idle
        # timeout is for streams that stay silent while both ends are alive (a model
        # thinking for minutes is fine below it); a frozen agent is found sooner, by the
        # clusters' keepalive.
        stream_idle_timeout=_seconds(options.stream_idle_timeout_seconds),
        request_timeout=_seconds(0),
        request_headers_timeout=_seconds(10),
        common_http_protocol_options=HttpProtocolOptions(
            idle_timeout=_seconds(3600),
            headers_with_underscores_action=HttpProtocolOptionsHeadersWithUnderscoresAction.REJECT_REQUEST,
            max_headers_count=options.max_request_headers,
        ),
        http2_protocol_options=Http2ProtocolOptions(
            max_concurrent_streams=options.max_concurrent_streams,
            initial_stream_window_size=65536,
            initial_connection_window_size=1048576,
        ),
        # Oversize headers are the edge's to refuse (431), before a service would refuse
        # them as RESOURCE_EXHAUSTED (which the JSON transcoder turns into 429).
        max_request_headers_kb=options.max_request_headers_kb,
        # The audit lines whatever `access_log` says: refusals are a security record.
        access_log=[*([_access_log()] if options.access_log else []), *_audit_logs(options)],
        local_reply_config=_local_replies(options),
        early_header_mutation_extensions=[_strip_principal()],
        http_filters=_http_filters(options),
        tracing=_tracing(options.otlp_traces),
    )
    listener = http_listener(LISTENER_NAME, options.listen_host, options.listen_port, manager)
    listener.per_connection_buffer_limit_bytes = 32768
    return listener


def http_listener(name: str, host: str, port: int, manager: HttpConnectionManager) -> Listener:
    """A listener whose one filter chain is `manager` (the gateway's; the stats port's)."""
    return Listener(
        name=name,
        address=Address(socket_address=SocketAddress(address=host, port_value=port)),
        filter_chains=[
            FilterChain(
                filters=[
                    Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=Any.pack(manager),
                    )
                ]
            )
        ],
    )


def _http_filters(options: GatewayOptions) -> list[HttpFilter]:
    cluster_ready = {agent_cluster(options.default_agent): Percent(value=1.0)}
    return [
        # Liveness of the gateway itself, and readiness: the default agent routable.
        _http_filter(
            "envoy.filters.http.health_check.live",
            HealthCheckFilter(
                pass_through_mode=False,
                headers=[HeaderMatcher(name=":path", string_match=StringMatcher(exact="/health"))],
            ),
        ),
        _http_filter(
            "envoy.filters.http.health_check.ready",
            HealthCheckFilter(
                pass_through_mode=False,
                headers=[HeaderMatcher(name=":path", string_match=StringMatcher(exact="/ready"))],
                cluster_min_healthy_percentages=cluster_ready,
            ),
        ),
        _http_filter(
            "envoy.filters.http.local_ratelimit",
            LocalRateLimit(
                stat_prefix="gateway_rate_limit",
                token_bucket=TokenBucket(
                    max_tokens=options.rate_limit_burst,
                    tokens_per_fill=options.rate_limit_per_second,
                    fill_interval=_seconds(1),
                ),
                filter_enabled=_always(),
                filter_enforced=_always(),
                # gRPC callers see RESOURCE_EXHAUSTED (back off), not UNAVAILABLE (retry now).
                rate_limited_as_resource_exhausted=True,
            ),
        ),
        _http_filter("envoy.filters.http.cors", Cors()),
        _http_filter("envoy.filters.http.grpc_web", GrpcWeb()),
        # Tokens, when required: after gRPC-Web became gRPC (a refusal is then a gRPC
        # status the browser can read) and before anything buffers or reads a body.
        *([_http_filter(JWT_FILTER, _jwt_authn(options.jwt))] if options.jwt else []),
        # Each tenant's share of the edge: after the token check, which set the tenant.
        *_tenant_rate_limit(options),
        # Rejects oversize requests at the edge (413) before any agent sees a byte.
        _http_filter(
            "envoy.filters.http.buffer", Buffer(max_request_bytes=options.max_request_bytes)
        ),
        # Unknown fields in JSON bodies, refused by the control plane's ExternalProcessor
        # (`json_bodies.py`) before the transcoder would drop them. Off unless a route
        # turns it on (`_CHECK_JSON_BODY`): gRPC and gRPC-Web never reach it.
        _http_filter(EXT_PROC_FILTER, _json_body_check()),
        _http_filter(
            "envoy.filters.http.grpc_json_transcoder",
            GrpcJsonTranscoder(
                proto_descriptor_bin=descriptors.descriptor_set(),
                services=[descriptors.AGENT_SERVICE, descriptors.REGISTRY_SERVICE],
                # Route on the URL the caller sent (/v1/agents/NAME/…), which names the agent.
                match_incoming_request_route=True,
                auto_mapping=False,
                # Errors as JSON: a `google.rpc.Status` body (code, message, details) with
                # the matching HTTP status. Needs google/rpc/{status,error_details}.proto in
                # the descriptor set (descriptors.TRANSCODER_FILES).
                convert_grpc_status=True,
                # A query parameter that names no field of the request is the caller's
                # mistake: 400 naming it, not a pass-through of the untranscoded request to
                # an agent. (Not `reject_unknown_method`: the transcoder runs before the
                # router, so it would also refuse the console and `/v1/agents`, which
                # Envoy answers itself. Unknown JSON *body* fields have no such option:
                # the transcoder drops them, so the ext_proc body check refuses them.)
                request_validation_options=GrpcJsonTranscoderRequestValidationOptions(
                    reject_unknown_query_parameters=True,
                ),
                max_request_body_size=options.max_request_bytes,
                print_options=GrpcJsonTranscoderPrintOptions(
                    always_print_primitive_fields=True,
                    preserve_proto_field_names=True,
                    # Streams as one JSON message per line: curl and scripts read them live.
                    stream_newline_delimited=True,
                ),
            ),
        ),
        _http_filter("envoy.filters.http.router", Router()),
    ]


def _strip_principal() -> TypedExtensionConfig:
    """Drops the principal headers a caller sent (all four, `principal.HEADERS`), before
    any filter or route sees the request, in every mode: only the token check may set
    them (`PRINCIPAL_HEADERS`, `_mark_edge`), and without tokens nobody may, so a
    service never takes a caller's word for whose data it touches."""
    return _typed(
        "envoy.http.early_header_mutation.header_mutation",
        HeaderMutation(mutations=[HeaderMutationRule(remove=name) for name in principal.HEADERS]),
    )


def _mark_edge(options: GatewayOptions) -> list[HeaderValueOption]:
    """`x-agentplex-principal: edge` on every request routed to a service, with tokens on.

    Every such request passed the token check (it is required on every route but the
    console's files, which Envoy answers itself), so the marker says so even for a token
    without a `tenant` claim: the service then refuses it (`principal.from_metadata`)
    instead of taking it for the mesh's own call, which carries no principal headers.
    Without tokens the marker is never added (callers' copies are stripped either way)."""
    if options.jwt is None:
        return []
    return [
        HeaderValueOption(
            header=HeaderValue(key=principal.PRINCIPAL_HEADER, value=principal.EDGE),
            append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
        )
    ]


def _tenant_rate_limit(options: GatewayOptions) -> list[HttpFilter]:
    """A token bucket per tenant, so one tenant's burst cannot spend the whole edge's.

    Envoy's local rate limit with a wildcard descriptor (a key without a value): the
    filter's own `rate_limits` turn the tenant header the token check set (never a
    caller's: `_strip_principal`) into a `tenant` descriptor, and each distinct value
    gets a bucket of its own, up to `TENANT_RATE_LIMIT_MAX_TENANTS` at once. A request
    without a tenant (a token without the claim: the services refuse it anyway) falls
    to the default bucket, sized as the gateway-wide one, which a tenant's request does
    not also spend (`always_consume_default_token_bucket` off). Refusals answer as the
    gateway-wide limit's do: RESOURCE_EXHAUSTED, or 429 with a JSON status under /v1/.
    Only with tokens: without them there is no tenant to count by."""
    per_second = options.tenant_rate_limit_per_second
    if options.jwt is None or per_second <= 0:
        return []
    burst = options.tenant_rate_limit_burst or per_second
    return [
        _http_filter(
            TENANT_RATE_LIMIT_FILTER,
            LocalRateLimit(
                stat_prefix="gateway_tenant_rate_limit",
                token_bucket=TokenBucket(
                    max_tokens=options.rate_limit_burst,
                    tokens_per_fill=options.rate_limit_per_second,
                    fill_interval=_seconds(1),
                ),
                rate_limits=[
                    RateLimit(
                        actions=[
                            RateLimitAction(
                                request_headers=RateLimitActionRequestHeaders(
                                    header_name=principal.TENANT_HEADER,
                                    descriptor_key=TENANT_DESCRIPTOR,
                                )
                            )
                        ]
                    )
                ],
                descriptors=[
                    LocalRateLimitDescriptor(
                        entries=[RateLimitDescriptorEntry(key=TENANT_DESCRIPTOR, value="")],
                        token_bucket=TokenBucket(
                            max_tokens=burst,
                            tokens_per_fill=per_second,
                            fill_interval=_seconds(1),
                        ),
                    )
                ],
                max_dynamic_descriptors=TENANT_RATE_LIMIT_MAX_TENANTS,
                always_consume_default_token_bucket=False,
                filter_enabled=_always(),
                filter_enforced=_always(),
                rate_limited_as_resource_exhausted=True,
            ),
        )
    ]


def _jwt_authn(jwt: JwtOptions) -> JwtAuthentication:
    """One provider, required on every route but those that turn it off (`_NO_AUTH`)."""
    provider = JwtProvider(
        issuer=jwt.issuer,
        audiences=list(jwt.audiences),
        # Only `Authorization: Bearer …`: not Envoy's default `?access_token=` as well,
        # which would put tokens in URLs and so in the access log.
        from_headers=[JwtHeader(name="authorization", value_prefix="Bearer ")],
        require_expiration=True,
        clock_skew_seconds=JWT_CLOCK_SKEW_SECONDS,
        # The services get the verified claims, not the bearer credential itself.
        forward=False,
        payload_in_metadata=JWT_PAYLOAD_METADATA,
        failed_status_in_metadata=JWT_FAILURE_METADATA,
        claim_to_headers=[
            JwtClaimToHeader(header_name=header, claim_name=claim)
            for claim, header in PRINCIPAL_HEADERS.items()
        ],
    )
    if jwt.jwks_uri is not None:
        provider.remote_jwks = RemoteJwks(
            http_uri=HttpUri(
                uri=jwt.jwks_uri,
                cluster=JWKS_CLUSTER,
                timeout=_seconds(JWKS_FETCH_TIMEOUT_SECONDS),
            ),
            cache_duration=_seconds(jwt.jwks_cache_seconds),
            # Fetched when the listener starts (which waits for that first answer) and
            # again before the cache expires, not on a caller's request.
            async_fetch=JwksAsyncFetch(fast_listener=False),
        )
    else:
        provider.local_jwks = DataSource(inline_string=jwt.jwks)
    return JwtAuthentication(
        providers={JWT_PROVIDER: provider},
        rules=[
            RequirementRule(
                match=RouteMatch(prefix="/"),
                requires=JwtRequirement(provider_name=JWT_PROVIDER),
            )
        ],
        # A preflight carries no credentials; CORS answers it (or lets it fail) itself.
        bypass_cors_preflight=True,
        stat_prefix="gateway_jwt",
    )


def _json_body_check() -> ExternalProcessor:
    """The ext_proc filter's config: the request body, whole, to the control plane.

    Fails open: with the control plane down or slow (over
    `JSON_BODY_CHECK_TIMEOUT_SECONDS`), a JSON request goes on unchecked rather than
    failing, so the JSON API stays up whenever Envoy routes without a control plane
    (it keeps its last configuration). Only the unknown-field check is lost meanwhile;
    the transcoder and the services still validate everything else.
    """
    return ExternalProcessor(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=CONTROL_PLANE_CLUSTER)
        ),
        failure_mode_allow=True,
        message_timeout=_seconds(JSON_BODY_CHECK_TIMEOUT_SECONDS),
        processing_mode=_BODY_ONLY,
        request_attributes=list(json_bodies.REQUEST_ATTRIBUTES),
        stat_prefix="json_bodies",
    )


def json_status(code: int, message: str) -> dict[str, object]:
    """A `google.rpc.Status` as JSON, as the transcoder renders the services' errors."""
    return {
        "code": code,
        "message": message,
        "details": [
            {
                "@type": _ERROR_INFO,
                "reason": _CODE_NAMES.get(code, "UNKNOWN"),
                "domain": ERROR_DOMAIN,
            }
        ],
    }


def _status_is(status: int) -> AccessLogFilter:
    return AccessLogFilter(
        status_code_filter=StatusCodeFilter(
            comparison=ComparisonFilter(
                op=ComparisonFilterOp.EQ,
                value=RuntimeUInt32(default_value=status, runtime_key=f"gateway.{status}"),
            )
        )
    )


def _request_header(name: str, prefix: str) -> AccessLogFilter:
    return AccessLogFilter(
        header_filter=HeaderFilter(
            header=HeaderMatcher(name=name, string_match=StringMatcher(prefix=prefix))
        )
    )


def _jwt_refused() -> AccessLogFilter:
    """A request the token check refused (it says which check in its metadata)."""
    return AccessLogFilter(
        metadata_filter=MetadataFilter(
            matcher=MetadataMatcher(
                filter=JWT_FILTER,
                path=[MetadataMatcherPathSegment(key=JWT_FAILURE_METADATA)],
                value=ValueMatcher(present_match=True),
            ),
            match_if_key_not_found=False,
        )
    )


def _on_json_api() -> AccessLogFilter:
    """A request to the JSON API (`/v1/…`), as the caller sent it.

    The transcoder has rewritten :path once it took the request (malformed JSON, an
    agent nobody serves): the URL the caller sent is then in x-envoy-original-path."""
    return AccessLogFilter(
        or_filter=OrFilter(
            filters=[
                _request_header(":path", "/v1/"),
                _request_header("x-envoy-original-path", "/v1/"),
            ]
        )
    )


def _jwt_replies() -> list[ResponseMapper]:
    """Every refused token as 401 / UNAUTHENTICATED with Envoy's reason as the message.

    Envoy answers a token for another audience with 403 (PERMISSION_DENIED to gRPC
    callers), every other failure with 401; a token that is not for this gateway is
    no credential here either, so all of them become 401."""
    refused_json = AccessLogFilter(and_filter=AndFilter(filters=[_jwt_refused(), _on_json_api()]))
    return [
        ResponseMapper(
            filter=refused_json,
            status_code=401,
            body_format_override=SubstitutionFormatString(
                json_format=Struct.from_dict(json_status(16, "%LOCAL_REPLY_BODY%")),
                content_type="application/json",
            ),
        ),
        # gRPC and gRPC-Web: the status follows from the HTTP one, set explicitly as for 413.
        ResponseMapper(
            filter=_jwt_refused(),
            status_code=401,
            headers_to_add=[_header("grpc-status", "16")],
        ),
    ]


def _local_replies(options: GatewayOptions) -> LocalReplyConfig:
    """Edge rejections in the caller's terms.

    gRPC: Envoy turns a local 413 into grpc-status UNKNOWN for gRPC callers; an
    oversize request is RESOURCE_EXHAUSTED (what a gRPC server says for a
    message over its limit), so the status is set explicitly.

    JSON: every answer Envoy makes itself on a `/v1/` path — malformed JSON or an
    unknown query parameter (the transcoder), an unknown body field (the body
    check), an oversize body, an agent nobody serves, a method the transcoder does
    not know — gets the body the transcoder gives the services' errors: a JSON
    `google.rpc.Status` (`json_status`) with the code of its HTTP status and the
    text Envoy would have sent as its message.
    """
    mappers = [
        # First: a refused token is 401 whatever status Envoy picked (the first match wins).
        *(_jwt_replies() if options.jwt is not None else []),
        ResponseMapper(
            filter=AccessLogFilter(
                and_filter=AndFilter(
                    filters=[_status_is(413), _request_header("content-type", "application/grpc")]
                )
            ),
            headers_to_add=[_header("grpc-status", "8")],
            body=DataSource(inline_string="request larger than the gateway accepts"),
        ),
    ]
    for status, code in _HTTP_TO_CODE.items():
        body = json_status(code, "%LOCAL_REPLY_BODY%")
        mappers.append(
            ResponseMapper(
                filter=AccessLogFilter(
                    and_filter=AndFilter(
                        filters=[
                            _status_is(status),
                            # The transcoder has rewritten :path once it took the request
                            # (malformed JSON, an agent nobody serves): the URL the caller
                            # sent is then in x-envoy-original-path.
                            AccessLogFilter(
                                or_filter=OrFilter(
                                    filters=[
                                        _request_header(":path", "/v1/"),
                                        _request_header("x-envoy-original-path", "/v1/"),
                                    ]
                                )
                            ),
                        ]
                    )
                ),
                body_format_override=SubstitutionFormatString(
                    json_format=Struct.from_dict(body),
                    content_type="application/json",
                ),
            )
        )
    return LocalReplyConfig(mappers=mappers)


def _access_log() -> AccessLog:
    fields = {
        "time": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "protocol": "%PROTOCOL%",
        "status": "%RESPONSE_CODE%",
        "grpc_status": "%GRPC_STATUS%",
        "flags": "%RESPONSE_FLAGS%",
        "duration_ms": "%DURATION%",
        "bytes_in": "%BYTES_RECEIVED%",
        "bytes_out": "%BYTES_SENT%",
        "agent": f"%REQ({AGENT_HEADER.upper()})%",
        "upstream": "%UPSTREAM_HOST%",
        "client": "%DOWNSTREAM_REMOTE_ADDRESS%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        # W3C trace context: the same trace id the services log and export.
        "traceparent": "%REQ(TRACEPARENT)%",
    }
    return AccessLog(
        name="envoy.access_loggers.stdout",
        typed_config=Any.pack(
            StdoutAccessLog(
                log_format=SubstitutionFormatString(json_format=Struct.from_dict(fields))
            )
        ),
    )


def _audit_logs(options: GatewayOptions) -> list[AccessLog]:
    """One JSON line per request the gateway itself refuses, in the shape of the services'
    audit lines (`runtime/audit.py`): `audit`, `action` (the path), `outcome` `denied`,
    `reason`, `tenant` and `subject` when the token named them, and the trace context.

    Two kinds of refusal, told apart by what Envoy recorded rather than by the status
    (a service's own PERMISSION_DENIED is a 403 over JSON too, and a refusal of a gRPC
    call is an HTTP 200 with a grpc-status): a token the check refused (401, or 403 for
    another audience; `reason` is the failed check, from `jwt_failure`), and a request a
    rate limit refused (429 or RESOURCE_EXHAUSTED, gateway-wide or the tenant's;
    `reason` is Envoy's response code details). The services audit their own refusals.
    """
    token = {"reason": f"%DYNAMIC_METADATA({JWT_FILTER}:{JWT_FAILURE_METADATA}:message)%"}
    limited = {"reason": "%RESPONSE_CODE_DETAILS%"}
    refusals = [
        (
            AccessLogFilter(response_flag_filter=ResponseFlagFilter(flags=[RATE_LIMITED_FLAG])),
            limited,
        )
    ]
    if options.jwt is not None:
        refusals.insert(0, (_jwt_refused(), token))
    return [_audit_log(kind, fields, options.audit_log_file) for kind, fields in refusals]


def _audit_log(kind: AccessLogFilter, reason: dict[str, str], path: str | None) -> AccessLog:
    fields: dict[str, object] = {
        "time": "%START_TIME%",
        "service": "gateway",
        "audit": True,
        "action": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "resource": f"%REQ({AGENT_HEADER.upper()})%",
        "outcome": AUDIT_OUTCOME_DENIED,
        **reason,
        "tenant": f"%REQ({principal.TENANT_HEADER.upper()})%",
        "subject": f"%REQ({principal.SUBJECT_HEADER.upper()})%",
        "status": "%RESPONSE_CODE%",
        "grpc_status": "%GRPC_STATUS%",
        "client": "%DOWNSTREAM_REMOTE_ADDRESS%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        # The caller's trace context, and the trace id of the gateway's span when Envoy
        # traces (the `trace_id` of the services' log and audit lines).
        "traceparent": "%REQ(TRACEPARENT)%",
        "trace_id": "%TRACE_ID%",
    }
    log_format = SubstitutionFormatString(json_format=Struct.from_dict(fields))
    if path is None:
        return AccessLog(
            name="envoy.access_loggers.stdout",
            filter=kind,
            typed_config=Any.pack(StdoutAccessLog(log_format=log_format)),
        )
    return AccessLog(
        name="envoy.access_loggers.file",
        filter=kind,
        typed_config=Any.pack(FileAccessLog(path=path, log_format=log_format)),
    )


# --- routes ------------------------------------------------------------------------


def _route_configuration(directory: Directory, options: GatewayOptions) -> RouteConfiguration:
    # gRPC first: it is most of the traffic, and its routes cannot catch a JSON or
    # console request (they match gRPC paths or content types only).
    routes: list[Route] = _registry_grpc_routes(options)
    for name in sorted(directory.agents):
        routes.extend(_grpc_routes(agent_cluster(name), options, header=name))
    routes.extend(_grpc_routes(REGISTRY_CLUSTER, options, header=REGISTRY_TARGET))
    routes.append(
        _grpc_error_route(
            RouteMatch(
                prefix="/",
                headers=[HeaderMatcher(name=AGENT_HEADER, present_match=True), _GRPC_CONTENT],
            ),
            code=5,
            message=f"no agent with that {AGENT_HEADER} is routable (GET /v1/agents lists them)",
        )
    )
    if options.default_agent in directory.agents:
        routes.extend(_grpc_routes(agent_cluster(options.default_agent), options, header=None))
    routes.append(
        _grpc_error_route(
            RouteMatch(prefix="/", headers=[_GRPC_CONTENT]),
            code=14,
            message=f"the default agent {options.default_agent!r} is not routable right now",
        )
    )
    if options.console:
        console_routes = _console_routes()
        if options.jwt is not None:
            for route in console_routes:  # static files: open, like /health and /ready
                route.typed_per_filter_config = {**route.typed_per_filter_config, **_NO_AUTH}
        routes.extend(console_routes)
    routes.append(_agents_listing(directory, options))
    for name in sorted(directory.agents):
        routes.extend(_rest_routes(name, options))
    # Under /v1/ the local-reply mappers turn these messages into JSON statuses.
    routes.append(
        _error_route(
            RouteMatch(prefix="/v1/agents/"), 404, "no such agent: GET /v1/agents lists them"
        )
    )
    routes.append(_registry_rest_route(options))
    routes.append(_error_route(RouteMatch(prefix="/v1/"), 404, "no such path"))
    routes.append(
        _direct(
            RouteMatch(prefix="/"),
            404,
            json.dumps(json_status(5, "no such path")),
            "application/json",
        )
    )
    return RouteConfiguration(
        name=ROUTE_CONFIG_NAME,
        # The console is served from the route table itself.
        max_direct_response_body_size_bytes=1024 * 1024,
        virtual_hosts=[
            VirtualHost(
                name="gateway",
                domains=["*"],
                routes=routes,
                request_headers_to_add=_mark_edge(options),
                typed_per_filter_config={
                    "envoy.filters.http.cors": Any.pack(_cors_policy(options)),
                    # The JSON body check is off but where a route turns it on.
                    EXT_PROC_FILTER: Any.pack(ExtProcPerRoute(disabled=True)),
                },
            )
        ],
    )


def _cors_policy(options: GatewayOptions) -> CorsPolicy:
    return CorsPolicy(
        allow_origin_string_match=[StringMatcher(exact=origin) for origin in options.cors_origins],
        allow_methods="GET, POST, OPTIONS",
        allow_headers=(
            f"content-type, x-grpc-web, x-user-agent, grpc-timeout, traceparent, {AGENT_HEADER}"
            # A browser may send its bearer token only if the preflight says so.
            + (", authorization" if options.jwt is not None else "")
        ),
        expose_headers="grpc-status, grpc-message, grpc-status-details-bin",
        max_age="600",
    )


def _route_action(
    cluster: str,
    options: GatewayOptions,
    *,
    streaming: bool,
    idempotent: bool,
    idle_seconds: float | None = None,
) -> RouteAction:
    action = RouteAction(
        cluster=cluster,
        # Unary calls are bounded; a stream is bounded by idleness instead.
        timeout=_seconds(0 if streaming else options.unary_timeout_seconds),
        # A caller's grpc-timeout (its deadline) bounds the call at the edge too.
        max_stream_duration=RouteActionMaxStreamDuration(grpc_timeout_header_max=_seconds(0)),
        retry_policy=RetryPolicy(
            retry_on=f"{_NEVER_SENT},unavailable" if idempotent else _NEVER_SENT,
            num_retries=2,
            retry_host_predicate=[
                RetryPolicyRetryHostPredicate(
                    name="envoy.retry_host_predicates.previous_hosts",
                    typed_config=Any.pack(PreviousHostsPredicate()),
                )
            ],
            host_selection_retry_max_attempts=3,
        ),
    )
    if idle_seconds is not None:
        action.idle_timeout = _seconds(idle_seconds)
    return action


def _grpc_routes(cluster: str, options: GatewayOptions, *, header: str | None) -> list[Route]:
    """Routes to one gRPC upstream: by `x-agentplex-agent: header`, or by default (no header)."""
    if header is None:
        headers = [HeaderMatcher(name=AGENT_HEADER, present_match=True, invert_match=True)]
    else:
        headers = [HeaderMatcher(name=AGENT_HEADER, string_match=StringMatcher(exact=header))]

    def route(
        match: RouteMatch,
        action: RouteAction,
        *,
        typed_per_filter_config: dict[str, Any] | None = None,
    ) -> Route:
        match.headers = [*match.headers, *headers]
        return Route(
            match=match, route=action, typed_per_filter_config=typed_per_filter_config or {}
        )

    routes = []
    for method in _STREAMING_METHODS:
        routes.append(
            route(
                RouteMatch(path=_AGENT_SERVICE + method),
                _route_action(
                    cluster,
                    options,
                    streaming=True,
                    idempotent=method in _IDEMPOTENT_METHODS,
                    idle_seconds=options.watch_idle_timeout_seconds
                    if method == "WatchTask"
                    else None,
                ),
            )
        )
    for method in _IDEMPOTENT_METHODS:
        if method not in _STREAMING_METHODS:
            routes.append(
                route(
                    RouteMatch(path=_AGENT_SERVICE + method),
                    _route_action(cluster, options, streaming=False, idempotent=True),
                )
            )
    routes.append(
        route(
            RouteMatch(prefix=_HEALTH_PATH),
            _route_action(cluster, options, streaming=True, idempotent=True),
        )
    )
    for prefix in _REFLECTION_PREFIXES:
        # Reflection is a bidirectional stream: buffering it whole would deadlock it.
        routes.append(
            route(
                RouteMatch(prefix=prefix),
                _route_action(cluster, options, streaming=True, idempotent=False),
                typed_per_filter_config=_NO_BUFFER,
            )
        )
    routes.append(
        route(
            RouteMatch(prefix="/", headers=[_GRPC_CONTENT]),
            _route_action(cluster, options, streaming=False, idempotent=False),
        )
    )
    return routes


def _registry_grpc_routes(options: GatewayOptions) -> list[Route]:
    """The registry's RPCs, by path: no header needed (reflection for it: `registry`)."""
    read_only = ("ListTools", "GetTool")
    routes = [
        Route(
            match=RouteMatch(path=_REGISTRY_SERVICE + method),
            route=_route_action(REGISTRY_CLUSTER, options, streaming=False, idempotent=True),
        )
        for method in read_only
    ]
    routes.append(
        Route(
            match=RouteMatch(prefix=_REGISTRY_SERVICE),
            route=_route_action(REGISTRY_CLUSTER, options, streaming=False, idempotent=False),
        )
    )
    return routes


def _registry_rest_route(options: GatewayOptions) -> Route:
    return Route(
        match=RouteMatch(
            safe_regex=RegexMatcher(regex=r"/v1/tools(/[^/]+)?"),
            headers=[_method("GET")],
        ),
        route=_route_action(REGISTRY_CLUSTER, options, streaming=False, idempotent=True),
    )


def _method(name: str) -> HeaderMatcher:
    return HeaderMatcher(name=":method", string_match=StringMatcher(exact=name))


def _rest_routes(agent: str, options: GatewayOptions) -> list[Route]:
    """The JSON API of one agent; the URL names the agent, the transcoder picks the method."""
    cluster = agent_cluster(agent)
    base = f"/v1/agents/{agent}"
    return [
        Route(
            match=RouteMatch(path=f"{base}/tasks:stream"),
            route=_route_action(cluster, options, streaming=True, idempotent=False),
            typed_per_filter_config=_CHECK_JSON_BODY,
        ),
        Route(
            match=RouteMatch(safe_regex=RegexMatcher(regex=f"{base}/tasks/[^/]+/events")),
            route=_route_action(
                cluster,
                options,
                streaming=True,
                idempotent=True,
                idle_seconds=options.watch_idle_timeout_seconds,
            ),
        ),
        # The contract's other bindings (agent_service.proto's google.api.http), each
        # with its verb: reads retried on another replica, writes body-checked.
        *(
            Route(
                match=_json_path(base, path, "GET"),
                route=_route_action(cluster, options, streaming=False, idempotent=True),
            )
            for path in (r"card", r"tasks/[^/:]+")
        ),
        *(
            Route(
                match=_json_path(base, path, "POST"),
                route=_route_action(cluster, options, streaming=False, idempotent=False),
                typed_per_filter_config=_CHECK_JSON_BODY,
            )
            for path in (r"tasks:run", r"tasks", r"tasks/[^/:]+:cancel")
        ),
        # Anything else under the agent names no method: a 404 of the edge's own,
        # rather than an untranscoded request the agent would refuse as UNAVAILABLE.
        _error_route(
            RouteMatch(prefix=f"{base}/"),
            404,
            f"no method at this URL (or not with this HTTP method); {agent}'s JSON API: "
            "POST tasks:run, POST tasks:stream, POST tasks, GET tasks/ID, "
            "POST tasks/ID:cancel, GET tasks/ID/events, GET card",
        ),
    ]


def _json_path(base: str, path: str, method: str) -> RouteMatch:
    return RouteMatch(
        safe_regex=RegexMatcher(regex=f"{re.escape(base)}/{path}"), headers=[_method(method)]
    )


def _agents_listing(directory: Directory, options: GatewayOptions) -> Route:
    body = {
        "default_agent": options.default_agent,
        "agents": [
            {"name": name, "replicas": len(directory.agents[name])}
            for name in sorted(directory.agents)
        ],
    }
    return _direct(RouteMatch(path="/v1/agents"), 200, json.dumps(body), "application/json")


def _console_routes() -> list[Route]:
    routes = [
        Route(
            match=RouteMatch(path="/"),
            redirect=RedirectAction(path_redirect="/console/"),
            typed_per_filter_config=_NO_BUFFER,
        )
    ]
    for asset in console.assets():
        routes.append(
            _direct(
                RouteMatch(
                    path=f"/console/{asset.name}" if asset.name != "index.html" else "/console/"
                ),
                200,
                asset.body,
                asset.content_type,
            )
        )
    return routes


def _direct(match: RouteMatch, status: int, body: str, content_type: str) -> Route:
    return Route(
        match=match,
        direct_response=DirectResponseAction(status=status, body=DataSource(inline_string=body)),
        response_headers_to_add=[_header("content-type", content_type)],
        typed_per_filter_config=_NO_BUFFER,
    )


def _error_route(match: RouteMatch, status: int, message: str) -> Route:
    """An error Envoy answers itself; on `/v1/` paths `_local_replies` makes it JSON."""
    return _direct(match, status, message, "text/plain")


def _grpc_error_route(match: RouteMatch, *, code: int, message: str) -> Route:
    """A trailers-only gRPC answer (status in the headers), as a server would send it."""
    return Route(
        match=match,
        direct_response=DirectResponseAction(status=200),
        response_headers_to_add=[
            _header("content-type", "application/grpc"),
            _header("grpc-status", str(code)),
            _header("grpc-message", message),  # printable ASCII: no percent-encoding needed
        ],
        typed_per_filter_config=_NO_BUFFER,
    )


def _header(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=key, value=value))
