"""`python -m agentplex.gateway`: the control plane process Envoy's ADS stream connects to.

Serves the Aggregated Discovery Service and grpc.health.v1 with grpclib
(envoy-data-plane's service base), and reports its address through the
same `--ready-file` contract as every other service, so `agentplex up`
starts it like the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import grpclib.const
import grpclib.server
from grpc_health.v1 import health_pb2
from grpclib.server import Server

from agentplex.gateway.ads import DiscoveryServer
from agentplex.gateway.control_plane import ControlPlane
from agentplex.gateway.directory import AgentDirectory
from agentplex.gateway.settings import GatewaySettings
from agentplex.gateway.snapshot import SnapshotCache
from agentplex.runtime import loop as event_loop
from agentplex.runtime.clients import open_channel
from agentplex.runtime.metrics import MetricsEndpoint
from agentplex.runtime.server import Endpoint, write_ready_file
from agentplex.runtime.settings import Settings
from agentplex.runtime.telemetry import configure_logging

log = logging.getLogger("agentplex.gateway")


class SnapshotHealth:
    """grpc.health.v1 Check for the control plane: SERVING once it has a snapshot to give.

    (grpclib's own health service registers the same protobuf names as
    grpcio-health-checking, which the rest of the mesh imports; one process
    cannot hold both.)
    """

    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache

    async def check(
        self,
        stream: grpclib.server.Stream[
            health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        ],
    ) -> None:
        await stream.recv_message()
        serving = self._cache.current is not None
        status = health_pb2.HealthCheckResponse
        await stream.send_message(status(status=status.SERVING if serving else status.NOT_SERVING))

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            "/grpc.health.v1.Health/Check": grpclib.const.Handler(
                self.check,
                grpclib.const.Cardinality.UNARY_UNARY,
                health_pb2.HealthCheckRequest,
                health_pb2.HealthCheckResponse,
            )
        }


class _Server(Server):
    """grpclib's server, able to drop the connections it accepted.

    `Server.close()` only stops listening and cancels the handlers; a
    cancelled handler sends no trailers, so Envoy's ADS stream — and the
    HTTP/2 connection under it — stays open to a server that no longer
    answers, and Envoy never reconnects to a control plane started in its
    place. Closing the transports makes Envoy see the disconnect and retry.
    """

    def __init__(self, handlers: list[object]) -> None:
        super().__init__(handlers)  # type: ignore[arg-type]
        self._transports: set[asyncio.BaseTransport] = set()

    def _protocol_factory(self):  # type: ignore[no-untyped-def]
        protocol = super()._protocol_factory()
        connection_made = protocol.connection_made

        def track(transport: asyncio.BaseTransport) -> None:
            self._transports.add(transport)
            connection_made(transport)

        protocol.connection_made = track  # type: ignore[method-assign]
        return protocol

    def close_connections(self) -> None:
        for transport in self._transports:
            transport.close()
        self._transports.clear()


class ControlPlaneServer:
    """The ADS server and the directory poller, started and stopped together."""

    def __init__(self, settings: Settings, gateway: GatewaySettings) -> None:
        self.settings = settings
        self.gateway = gateway
        self.cache = SnapshotCache()
        self.discovery = DiscoveryServer(self.cache)
        self._channel = open_channel(settings.registry_address)
        self.control_plane = ControlPlane(
            AgentDirectory(self._channel, [settings.registry_address]),
            gateway.options(),
            self.cache,
            poll_seconds=gateway.directory_poll_seconds,
        )
        self._server = _Server([self.discovery, SnapshotHealth(self.cache)])
        self._poller: asyncio.Task[None] | None = None
        self.address = ""

    async def start(self, port: int = 0) -> str:
        await self._server.start(self.settings.host, port)
        assert self._server._server is not None  # grpclib exposes the bound socket only here
        bound = self._server._server.sockets[0].getsockname()[1]
        self.address = f"{self.settings.host}:{bound}"
        self._poller = asyncio.create_task(self.control_plane.run())
        log.info("gateway control plane serving", extra={"address": self.address})
        return self.address

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        self._server.close()
        self._server.close_connections()
        await self._server.wait_closed()
        await self._channel.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agentplex.gateway")
    parser.add_argument("--port", type=int, default=0, help="xDS (ADS) port (0 = any free port)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0 = any)")
    parser.add_argument("--ready-file", type=Path, help="write the bound address here once serving")
    args = parser.parse_args(argv)
    settings, gateway = Settings(), GatewaySettings()
    configure_logging("gateway", settings.log_level)

    async def run() -> None:
        server = ControlPlaneServer(settings, gateway)
        metrics = MetricsEndpoint(settings.host, args.metrics_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            address = await server.start(args.port)
            if args.ready_file is not None:
                write_ready_file(args.ready_file, Endpoint(address, metrics.port))
            await stop.wait()
        finally:
            await server.stop()
            metrics.close()

    try:
        event_loop.run(run())
    except OSError as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(1) from None
