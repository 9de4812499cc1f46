"""`envoy --mode validate` on what the gateway would give Envoy.

The bootstrap is validated as written. The xDS resources are validated as
their static equivalent — the listener with its route table inline instead of
RDS, STATIC clusters with their endpoints inline instead of EDS — so a field
Envoy does not know, a bad regex or an impossible value in `resources.py`
fails here, not in a live Envoy that NACKs it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
)
from envoy_data_plane.envoy.type.matcher.v3 import RegexMatcher
from envoy_data_plane.google.protobuf import Any

from agentplex.gateway import bootstrap, envoy, resources
from agentplex.gateway.resources import Directory, GatewayOptions, HostPort, Resources


def directory(*agents: str, replicas: int = 1) -> Directory:
    return Directory(
        agents={
            name: tuple(HostPort("127.0.0.1", 7000 + 10 * i + r) for r in range(replicas))
            for i, name in enumerate(agents)
        },
        registry=(HostPort("127.0.0.1", 6000),),
    )


def static_equivalent(built: Resources) -> Bootstrap:
    """The same listeners, routes, clusters and endpoints, with nothing left to discover."""
    routes = {config.name: config for config in built.routes}
    listeners: list[Listener] = []
    for listener in built.listeners:
        listener = replace(listener)
        chains = []
        for chain in listener.filter_chains:
            filters = []
            for network_filter in chain.filters:
                assert network_filter.typed_config is not None
                manager = network_filter.typed_config.unpack()
                assert isinstance(manager, HttpConnectionManager), manager
                if manager.rds is not None:
                    name = manager.rds.route_config_name
                    manager.rds = None
                    manager.route_config = routes[name]
                filters.append(replace(network_filter, typed_config=Any.pack(manager)))
            chains.append(replace(chain, filters=filters))
        listener.filter_chains = chains
        listeners.append(listener)
    assignments = {assignment.cluster_name: assignment for assignment in built.endpoints}
    clusters: list[Cluster] = []
    for cluster in built.clusters:
        cluster = replace(
            cluster,
            type=ClusterDiscoveryType.STATIC,
            eds_cluster_config=None,
            load_assignment=assignments[cluster.name],
        )
        clusters.append(cluster)
    return Bootstrap(
        admin=Admin(
            address=Address(socket_address=SocketAddress(address="127.0.0.1", port_value=0))
        ),
        static_resources=BootstrapStaticResources(listeners=listeners, clusters=clusters),
    )


def _proto_json(value: object) -> object:
    """betterproto2's camelCase misnames `consecutive_5xx` (and its kin) as `…5Xx`;
    protobuf's JSON name is `…5xx`. ADS ships binary protos, so only this JSON
    rendering needs the fix."""
    if isinstance(value, dict):
        return {k.replace("5Xx", "5xx"): _proto_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_proto_json(v) for v in value]
    return value


def to_json(config: Bootstrap) -> str:
    return json.dumps(_proto_json(config.to_dict()), indent=1)


def validate(config: Bootstrap, path: Path) -> None:
    path.write_text(to_json(config))
    result = envoy.validate(path)
    # Envoy quotes the offending message whole (the console's files included): keep the end
    assert result.returncode == 0, (
        f"envoy rejected {path.name}: {(result.stdout + result.stderr)[-2000:]}"
    )


def test_bootstrap_validates(tmp_path: Path) -> None:
    path = bootstrap.write(
        bootstrap.BootstrapOptions(HostPort("127.0.0.1", 18000), admin_port=0),
        tmp_path / "bootstrap.json",
    )
    result = envoy.validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    written = json.loads(path.read_text())
    assert written["admin"]["address"]["socketAddress"]["address"] == "127.0.0.1"
    assert written["dynamicResources"]["adsConfig"]["apiType"] == "GRPC"


def test_bootstrap_for_an_ipv6_control_plane_validates(tmp_path: Path) -> None:
    path = bootstrap.write(
        bootstrap.BootstrapOptions(HostPort.parse("[::1]:18000"), admin_port=0),
        tmp_path / "bootstrap.json",
    )
    result = envoy.validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("name", "built"),
    [
        (
            "defaults",
            lambda: resources.build(
                directory("assistant", "researcher", "supervisor", replicas=2),
                GatewayOptions(listen_port=0),
            ),
        ),
        (
            "empty-directory-cors-no-console",
            lambda: resources.build(
                directory(),
                GatewayOptions(
                    listen_port=0,
                    console=False,
                    access_log=False,
                    cors_origins=("http://app.example", "https://other.example:8443"),
                ),
            ),
        ),
    ],
)
def test_built_resources_validate_as_static_config(name: str, built, tmp_path: Path) -> None:
    validate(static_equivalent(built()), tmp_path / f"{name}.json")


def test_a_bad_route_fails_validation(tmp_path: Path) -> None:
    """The check above is not vacuous: Envoy does read the routes we hand it."""
    built = resources.build(directory("assistant"), GatewayOptions(listen_port=0))
    (config,) = built.routes
    broken = next(
        r.match
        for r in config.virtual_hosts[0].routes
        if r.match is not None and r.match.safe_regex is not None
    )
    broken.safe_regex = RegexMatcher(regex="/v1/tools(")
    path = tmp_path / "broken.json"
    path.write_text(to_json(static_equivalent(built)))
    result = envoy.validate(path)
    assert result.returncode != 0
    assert "/v1/tools(" in result.stdout + result.stderr


def test_bootstrap_for_a_control_plane_by_name_with_a_stats_listener_validates(
    tmp_path: Path,
) -> None:
    options = bootstrap.BootstrapOptions(
        HostPort.parse("gateway-control-plane:50051", allow_names=True),
        admin_port=9901,
        stats=HostPort("0.0.0.0", 9902),
    )
    path = bootstrap.write(options, tmp_path / "bootstrap.json")
    result = envoy.validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    written = json.loads(path.read_text())
    xds = next(
        c for c in written["staticResources"]["clusters"] if c["name"] == bootstrap.XDS_CLUSTER
    )
    assert xds["type"] == "STRICT_DNS"  # Envoy re-resolves the Service name itself
    assert [listener["name"] for listener in written["staticResources"]["listeners"]] == ["stats"]
    # The admin API stays on loopback; only the stats path is forwarded to it.
    assert written["admin"]["address"]["socketAddress"]["address"] == "127.0.0.1"


def test_a_stats_listener_needs_a_fixed_admin_port() -> None:
    with pytest.raises(ValueError, match="admin port"):
        bootstrap.BootstrapOptions(
            HostPort("127.0.0.1", 1), admin_port=0, stats=HostPort("127.0.0.1", 2)
        )


def test_names_are_refused_where_envoy_needs_an_ip() -> None:
    with pytest.raises(ValueError):
        HostPort.parse("memory:50051")
    assert HostPort.parse("memory:50051", allow_names=True).is_name
    assert not HostPort.parse("10.0.0.1:1", allow_names=True).is_name
