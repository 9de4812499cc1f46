"""Versioned, consistency-checked snapshots of the gateway's Envoy resources.

A snapshot is published only if it is self-consistent — every route names a
cluster that exists, every cluster has its endpoints, the listener's route
table is there — because Envoy applies what it is given: a dangling
reference would turn into 404s and 503s at the edge. Each resource type is
versioned by its content, so an unchanged type is never sent again.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import betterproto2
from envoy_data_plane.google.protobuf import Any

from agentplex.gateway.resources import Resources

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
# Make before break: clusters (and their endpoints) before the routes that use them.
ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)


class InconsistentSnapshot(ValueError):
    """The resources reference something that is not in the snapshot."""


@dataclass(frozen=True)
class TypedResources:
    version: str
    by_name: dict[str, Any]


@dataclass(frozen=True)
class Snapshot:
    types: dict[str, TypedResources]

    @classmethod
    def of(cls, resources: Resources) -> Snapshot:
        check_consistency(resources)
        named: dict[str, list[tuple[str, betterproto2.Message]]] = {
            LISTENER: [(r.name, r) for r in resources.listeners],
            ROUTE: [(r.name, r) for r in resources.routes],
            CLUSTER: [(r.name, r) for r in resources.clusters],
            ENDPOINT: [(r.cluster_name, r) for r in resources.endpoints],
        }
        return cls({type_url: _typed(items) for type_url, items in named.items()})

    def version(self, type_url: str) -> str:
        return self.types[type_url].version if type_url in self.types else ""

    def resources(self, type_url: str, names: Sequence[str] = ()) -> list[Any]:
        """All resources of a type, or only `names` (EDS and RDS subscribe by name)."""
        typed = self.types.get(type_url)
        if typed is None:
            return []
        if not names:
            return list(typed.by_name.values())
        return [typed.by_name[name] for name in names if name in typed.by_name]


def _typed(items: list[tuple[str, betterproto2.Message]]) -> TypedResources:
    digest = hashlib.sha256()
    by_name: dict[str, Any] = {}
    for name, message in sorted(items, key=lambda item: item[0]):
        packed = Any.pack(message)
        digest.update(name.encode())
        digest.update(packed.value)
        by_name[name] = packed
    return TypedResources(digest.hexdigest()[:16], by_name)


def check_consistency(resources: Resources) -> None:
    clusters = {cluster.name for cluster in resources.clusters}
    assignments = {assignment.cluster_name for assignment in resources.endpoints}
    if missing := clusters - assignments:
        raise InconsistentSnapshot(f"clusters without endpoints: {sorted(missing)}")
    if extra := assignments - clusters:
        raise InconsistentSnapshot(f"endpoints for unknown clusters: {sorted(extra)}")
    route_names = {route.name for route in resources.routes}
    for route_config in resources.routes:
        for host in route_config.virtual_hosts:
            for route in host.routes:
                if route.route is not None and route.route.cluster not in clusters:
                    raise InconsistentSnapshot(
                        f"route {route.match} sends to unknown cluster {route.route.cluster!r}"
                    )
    for listener in resources.listeners:
        for chain in listener.filter_chains:
            for network_filter in chain.filters:
                if network_filter.typed_config is None:
                    continue
                manager = network_filter.typed_config.unpack()
                rds = getattr(manager, "rds", None)
                if rds is not None and rds.route_config_name not in route_names:
                    raise InconsistentSnapshot(
                        f"listener {listener.name} uses unknown routes {rds.route_config_name!r}"
                    )


class SnapshotCache:
    """The current snapshot, and a way to wait for the next one."""

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._changed = asyncio.Condition()

    @property
    def current(self) -> Snapshot | None:
        return self._snapshot

    async def publish(self, snapshot: Snapshot) -> bool:
        """Make `snapshot` current; False (and no wake-up) when nothing changed."""
        async with self._changed:
            if self._snapshot is not None and all(
                self._snapshot.version(t) == snapshot.version(t) for t in ORDER
            ):
                return False
            self._snapshot = snapshot
            self._changed.notify_all()
            return True

    async def wait_for_change(self, than: Snapshot | None) -> Snapshot:
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._snapshot is not None and self._snapshot is not than
            )
            assert self._snapshot is not None
            return self._snapshot
