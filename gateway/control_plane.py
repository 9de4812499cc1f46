"""The gateway's control plane: follows the agent directory, publishes Envoy snapshots.

It polls the registry (cheap: one list and one lookup per agent) and builds
a new snapshot only from a successful read. While the registry cannot be
read the last snapshot stays published — Envoy keeps routing to the agents
it knows, and its health checks still take dead replicas out.

With service-to-service TLS on, the xDS port (ADS and the JSON body check) serves mutual
TLS with the control plane's own certificate (`xds_server_ssl`) and answers only Envoy's
identity, `gateway` (`authorize_xds`): whoever can feed Envoy configuration can route
every caller anywhere. Health stays open to any mesh certificate, as on every server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from collections.abc import Iterable
from typing import Any

import grpc
import grpclib.events
import grpclib.server
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from prometheus_client import Counter, Gauge

from agentplex.contract import callers
from agentplex.gateway import resources
from agentplex.gateway.directory import AgentDirectory
from agentplex.gateway.resources import Directory, GatewayOptions
from agentplex.gateway.snapshot import InconsistentSnapshot, Snapshot, SnapshotCache
from agentplex.runtime.tls import SPIFFE_PREFIX, TlsFiles, identity_from_sans

log = logging.getLogger(__name__)

snapshots_published = Counter(
    "agentplex_gateway_snapshots_published_total", "Envoy config snapshots published."
)
directory_errors = Counter(
    "agentplex_gateway_directory_errors_total", "Failed reads of the agent directory."
)
routable_replicas = Gauge(
    "agentplex_gateway_routable_replicas", "Agent replicas in the published snapshot.", ["agent"]
)


class ControlPlane:
    def __init__(
        self,
        directory: AgentDirectory,
        options: GatewayOptions,
        cache: SnapshotCache,
        *,
        poll_seconds: float,
    ) -> None:
        self._directory = directory
        self._options = options
        self._cache = cache
        self._poll_seconds = poll_seconds
        self._last: Directory | None = None
        self._failing = False

    async def refresh(self) -> bool:
        """Read the directory once; True when a new snapshot was published."""
        try:
            directory = await self._directory.read()
        except grpc.aio.AioRpcError as exc:
            directory_errors.inc()
            if not self._failing:  # one line per outage, not one per poll
                log.warning(
                    "cannot read the agent directory; keeping the last snapshot",
                    extra={"code": exc.code().name, "error": exc.details()},
                )
            self._failing = True
            return False
        if self._failing:
            log.info("agent directory readable again")
            self._failing = False
        if directory == self._last:
            return False
        try:
            snapshot = Snapshot.of(resources.build(directory, self._options))
        except InconsistentSnapshot as exc:
            log.error("refusing an inconsistent snapshot", extra={"error": str(exc)})
            return False
        published = await self._cache.publish(snapshot)
        self._report(directory)
        self._last = directory
        if published:
            snapshots_published.inc()
        return published

    def _report(self, directory: Directory) -> None:
        before = self._last.agents if self._last is not None else {}
        for agent in sorted(set(before) | set(directory.agents)):
            old, new = before.get(agent, ()), directory.agents.get(agent, ())
            if old != new:
                log.info(
                    "agent routes changed",
                    extra={"agent": agent, "replicas": [f"{h.host}:{h.port}" for h in new]},
                )
            routable_replicas.labels(agent).set(len(new))

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug must not silently freeze the routes: say so, keep polling
                log.exception("gateway snapshot refresh failed")
            await asyncio.sleep(self._poll_seconds)


# Any mesh certificate may ask the control plane's health, as on every server.
_OPEN_TO_MESH = ("/grpc.health.v1.Health/",)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def xds_tls(files: TlsFiles | None, host: str) -> TlsFiles | None:
    """The files the xDS port serves mTLS with: the mesh's, unless mTLS is off or the port
    is on loopback (`agentplex up`: Envoy on the same host boots from it in plaintext)."""
    return None if files is None or is_loopback(host) else files


def xds_server_ssl(files: TlsFiles) -> ssl.SSLContext:
    """Mutual TLS for the xDS server: only clients with a mesh CA certificate connect."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files.ca))
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(files.cert), str(files.key))
    context.set_alpn_protocols(["h2"])
    return context


def peer_identity(cert: dict[str, Any] | None) -> str | None:
    """The mesh identity of a verified peer certificate (`SSLSocket.getpeercert()`): its one
    URI SAN, as gRPC's `peer_spiffe_id` requires; never a pick among several."""
    sans: Iterable[tuple[str, str]] = (cert or {}).get("subjectAltName", ())
    uris = [value for kind, value in sans if kind == "URI"]
    return identity_from_sans(uris) if len(uris) == 1 else None


def authorize_xds(server: grpclib.server.Server, allowed: str = callers.GATEWAY) -> None:
    """Refuses, PERMISSION_DENIED, every call but health from any identity but `allowed`."""

    async def check(event: grpclib.events.RecvRequest) -> None:
        if event.method_name.startswith(_OPEN_TO_MESH):
            return
        identity = peer_identity(event.peer.cert())
        if identity != allowed:
            log.warning(
                "refused an xDS call",
                extra={"method": event.method_name, "identity": identity},
            )
            raise GRPCError(
                Status.PERMISSION_DENIED,
                f"identity {identity!r} may not call {event.method_name}; "
                f"only {SPIFFE_PREFIX}{allowed}",
            )

    grpclib.events.listen(server, grpclib.events.RecvRequest, check)
