"""The gateway's control plane: follows the agent directory, publishes Envoy snapshots.

It polls the registry (cheap: one list and one lookup per agent) and builds
a new snapshot only from a successful read. While the registry cannot be
read the last snapshot stays published — Envoy keeps routing to the agents
it knows, and its health checks still take dead replicas out.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from prometheus_client import Counter, Gauge

from agentplex.gateway import resources
from agentplex.gateway.directory import AgentDirectory
from agentplex.gateway.resources import Directory, GatewayOptions
from agentplex.gateway.snapshot import InconsistentSnapshot, Snapshot, SnapshotCache

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
