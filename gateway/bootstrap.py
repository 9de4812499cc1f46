"""Envoy's bootstrap: only the way to the control plane, and the process-wide limits.

Everything that routes traffic (listeners, routes, clusters, endpoints) comes
over ADS, so this file never changes while agents come and go. The control
plane may be named by DNS (a Kubernetes Service): Envoy resolves it itself.
Optionally one static listener serves Envoy's Prometheus stats and nothing
else, so they can be scraped from other hosts while the admin API, which can
stop Envoy, stays on loopback (as Istio's sidecars expose theirs).

With `xds_tls` the way to the control plane is mutual TLS: Envoy presents the
gateway's certificate and accepts only a control plane whose certificate, from the
mesh CA, carries `spiffe://agentplex/gateway-control-plane` (the address may be a
Service name that no certificate lists, so the identity is what is checked).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any as AnyJson

from envoy_data_plane.envoy.config.bootstrap.v3 import (
    Admin,
    Bootstrap,
    BootstrapDynamicResources,
    BootstrapStaticResources,
)
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    AggregatedConfigSource,
    ApiConfigSource,
    ApiConfigSourceApiType,
    ApiVersion,
    ConfigSource,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    Http2ProtocolOptions,
    Node,
    SocketAddress,
    TransportSocket,
)
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.config.overload.v3 import OverloadManager, ResourceMonitor
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import (
    DownstreamConnectionsConfig,
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
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.google.protobuf import Any

from agentplex.contract import callers
from agentplex.gateway.resources import (
    CONTROL_PLANE_CLUSTER,
    HostPort,
    UpstreamTls,
    http_listener,
    load_assignment,
)
from agentplex.runtime.tls import spiffe_id

# ADS, and the JSON body check (`json_bodies.py`): both served by the control plane.
XDS_CLUSTER = CONTROL_PLANE_CLUSTER


STATS_LISTENER = "stats"
STATS_PATH = "/stats/prometheus"
_ADMIN_CLUSTER = "envoy_admin"


@dataclass(frozen=True)
class BootstrapOptions:
    control_plane: HostPort  # an IP, or a DNS name Envoy resolves (`HostPort.is_name`)
    node_id: str = "gateway"
    admin_host: str = "127.0.0.1"  # Envoy's admin API can stop Envoy: never off loopback
    admin_port: int = 9901
    max_downstream_connections: int = 10000
    # Where a listener serves only STATS_PATH (None: the stats stay on the admin API).
    stats: HostPort | None = None
    # mTLS to the control plane: the mesh CA and the gateway's certificate (None: plaintext).
    xds_tls: UpstreamTls | None = None

    def __post_init__(self) -> None:
        if self.stats is not None and self.admin_port == 0:
            raise ValueError("the stats listener forwards to the admin port: give it one, not 0")


def build(options: BootstrapOptions) -> Bootstrap:
    ads = ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)
    http2 = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http2_protocol_options=Http2ProtocolOptions()
        )
    )
    return Bootstrap(
        node=Node(id=options.node_id, cluster="agentplex-gateway"),
        admin=Admin(
            address=Address(
                socket_address=SocketAddress(
                    address=options.admin_host, port_value=options.admin_port
                )
            )
        ),
        dynamic_resources=BootstrapDynamicResources(
            ads_config=ApiConfigSource(
                api_type=ApiConfigSourceApiType.GRPC,
                transport_api_version=ApiVersion.V3,
                set_node_on_first_message_only=True,
                grpc_services=[
                    GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=XDS_CLUSTER))
                ],
            ),
            lds_config=ads,
            cds_config=ads,
        ),
        static_resources=BootstrapStaticResources(
            clusters=[
                Cluster(
                    name=XDS_CLUSTER,
                    # A name is re-resolved as it changes (a Service's endpoints move).
                    type=ClusterDiscoveryType.STRICT_DNS
                    if options.control_plane.is_name
                    else ClusterDiscoveryType.STATIC,
                    connect_timeout=datetime.timedelta(seconds=1),
                    typed_extension_protocol_options={
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": Any.pack(http2)
                    },
                    load_assignment=load_assignment(XDS_CLUSTER, [options.control_plane]),
                    transport_socket=_xds_tls(options.xds_tls),
                ),
                *_stats_clusters(options),
            ],
            listeners=_stats_listeners(options),
        ),
        # A hard ceiling on open client connections, whatever the listeners say.
        overload_manager=OverloadManager(
            resource_monitors=[
                ResourceMonitor(
                    name="envoy.resource_monitors.global_downstream_max_connections",
                    typed_config=Any.pack(
                        DownstreamConnectionsConfig(
                            max_active_downstream_connections=options.max_downstream_connections
                        )
                    ),
                )
            ]
        ),
    )


def to_json(bootstrap: Bootstrap) -> dict[str, AnyJson]:
    return bootstrap.to_dict()


def write(options: BootstrapOptions, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(build(options)), indent=2))
    return path


def _xds_tls(tls: UpstreamTls | None) -> TransportSocket | None:
    """Envoy's certificate towards the control plane, and the control plane's identity."""
    if tls is None:
        return None
    identity = callers.GATEWAY_CONTROL_PLANE
    context = UpstreamTlsContext(
        # Its DNS SAN: what the mesh's own clients verify servers by (runtime/tls.py).
        sni=identity,
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
            alpn_protocols=["h2"],
        ),
    )
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=Any.pack(context))


def _stats_clusters(options: BootstrapOptions) -> list[Cluster]:
    if options.stats is None:
        return []
    admin = HostPort(options.admin_host, options.admin_port)
    return [
        Cluster(
            name=_ADMIN_CLUSTER,
            type=ClusterDiscoveryType.STATIC,
            connect_timeout=datetime.timedelta(seconds=1),
            load_assignment=load_assignment(_ADMIN_CLUSTER, [admin]),
        )
    ]


def _stats_listeners(options: BootstrapOptions) -> list[Listener]:
    """GET STATS_PATH goes to the admin API; any other path or method is a 404."""
    if options.stats is None:
        return []
    stats_only = RouteMatch(
        path=STATS_PATH,
        headers=[HeaderMatcher(name=":method", string_match=StringMatcher(exact="GET"))],
    )
    routes = RouteConfiguration(
        name=STATS_LISTENER,
        virtual_hosts=[
            VirtualHost(
                name=STATS_LISTENER,
                domains=["*"],
                routes=[
                    Route(match=stats_only, route=RouteAction(cluster=_ADMIN_CLUSTER)),
                    Route(
                        match=RouteMatch(prefix="/"),
                        direct_response=DirectResponseAction(status=404),
                    ),
                ],
            )
        ],
    )
    manager = HttpConnectionManager(
        stat_prefix=STATS_LISTENER,
        codec_type=HttpConnectionManagerCodecType.AUTO,
        route_config=routes,
        http_filters=[
            HttpFilter(name="envoy.filters.http.router", typed_config=Any.pack(Router()))
        ],
    )
    return [http_listener(STATS_LISTENER, options.stats.host, options.stats.port, manager)]
