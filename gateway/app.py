"""`python -m agentplex.gateway`: the control plane process Envoy's ADS stream connects to.

Serves the Aggregated Discovery Service, the ExternalProcessor that checks JSON
request bodies for unknown fields (`json_bodies.py`) and grpc.health.v1 with
grpclib (envoy-data-plane's service bases), and reports its address through the
same `--ready-file` contract as every other service, so `agentplex up`
starts it like the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, cast

import grpclib.const
import grpclib.server
from grpc_health.v1 import health_pb2
from grpclib.protocol import H2Protocol
from grpclib.server import Server

from agentplex.contract import callers
from agentplex.gateway import resources
from agentplex.gateway.ads import DiscoveryServer
from agentplex.gateway.control_plane import (
    ControlPlane,
    authorize_xds,
    xds_server_ssl,
    xds_tls,
)
from agentplex.gateway.directory import AgentDirectory
from agentplex.gateway.json_bodies import BodyChecker
from agentplex.gateway.settings import GatewaySettings
from agentplex.gateway.snapshot import SnapshotCache
from agentplex.runtime.clients import Keepalive, open_channel
from agentplex.runtime.metrics import MetricsEndpoint
from agentplex.runtime.process import CannotStart, Endpoint, run_process, stop_each
from agentplex.runtime.server import LIVENESS_SERVICE
from agentplex.runtime.settings import Settings
from agentplex.runtime.tls import MeshTls, TlsFiles, load_mesh_tls

if TYPE_CHECKING:  # grpclib's type of a service (what Server takes), not exported
    from grpclib._typing import IServable

log = logging.getLogger("agentplex.gateway")


class SnapshotHealth:
    """grpc.health.v1 Check for the control plane: SERVING once it has a snapshot to give,
    until it starts stopping (`shut_down`).

    (grpclib's own health service registers the same protobuf names as
    grpcio-health-checking, which the rest of the mesh imports; one process
    cannot hold both.)
    """

    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache
        self._shut_down = False

    def shut_down(self) -> None:
        """NOT_SERVING from now on, whatever the cache holds."""
        self._shut_down = True

    @property
    def serving(self) -> bool:
        return not self._shut_down and self._cache.current is not None

    async def check(
        self,
        stream: grpclib.server.Stream[
            health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        ],
    ) -> None:
        request = await stream.recv_message()
        status = health_pb2.HealthCheckResponse
        # Liveness (runtime.server.LIVENESS_SERVICE): alive until it stops, snapshot or not.
        live = request is not None and request.service == LIVENESS_SERVICE
        serving = not self._shut_down if live else self.serving
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

    def __init__(self, handlers: list[IServable]) -> None:
        super().__init__(handlers)
        self._transports: set[asyncio.BaseTransport] = set()

    def _protocol_factory(self) -> H2Protocol:
        protocol = super()._protocol_factory()
        connection_made = protocol.connection_made

        def track(transport: asyncio.BaseTransport) -> None:
            self._transports.add(transport)
            connection_made(transport)

        protocol.connection_made = track  # type: ignore[method-assign]  # wraps this one protocol's callback
        return protocol

    def close_connections(self) -> None:
        for transport in self._transports:
            transport.close()
        self._transports.clear()


def otlp_traces_receiver(settings: Settings) -> resources.HostPort | None:
    """Where Envoy sends its spans: the mesh's OTLP endpoint when traces go over OTLP
    (the OpenTelemetry SDK's default, localhost:4317, when none is set)."""
    if settings.trace_exporter != "otlp":
        return None
    endpoint = settings.otlp_traces_endpoint() or "http://localhost:4317"
    try:
        return resources.HostPort.parse(endpoint.split("://", 1)[-1].split("/", 1)[0])
    except ValueError:
        # Envoy's endpoints (EDS) take IP addresses; a collector's DNS name would need
        # a DNS cluster. The services still export; only the gateway's span is missing.
        log.warning("the gateway exports no spans: %s is not an ip:port address", endpoint)
        return None


# JWK members that only a private or symmetric key has: such a key must never reach
# Envoy's config (its admin API prints it), and whoever holds it can mint tokens.
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def envoy_upstream_tls(settings: Settings) -> resources.UpstreamTls | None:
    """Envoy's mTLS files towards agents and the registry, when service-to-service TLS is
    on: the mesh CA and the gateway's own certificate (identity `gateway`, not the control
    plane's: each is authorized for what it calls). Absolute: Envoy runs elsewhere."""
    mesh = TlsFiles.from_settings(settings)
    if mesh is None:
        return None
    cert, key = settings.tls_gateway_cert_file, settings.tls_gateway_key_file
    if cert is None or key is None:
        raise ValueError(
            "mTLS is on: set AGENTPLEX_TLS_GATEWAY_CERT_FILE and AGENTPLEX_TLS_GATEWAY_KEY_FILE "
            "to Envoy's certificate (identity gateway)"
        )
    return resources.UpstreamTls(
        ca_file=os.path.abspath(mesh.ca),
        cert_file=os.path.abspath(cert),
        key_file=os.path.abspath(key),
    )


def read_jwks(path: Path) -> str:
    """The public keys in the JWKS file `path`, as compact JSON for Envoy.

    ValueError, saying what is wrong (never a key's content), for a file that cannot be
    read, is not a JWKS, or holds a private or symmetric key."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the JWKS file {path}: {exc}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the JWKS file {path} is not JSON (line {exc.lineno})") from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ValueError(f'the JWKS file {path} has no "keys" list')
    for index, key in enumerate(keys):
        if not isinstance(key, dict) or not isinstance(key.get("kty"), str):
            raise ValueError(f'the JWKS file {path}: key {index} has no "kty"')
        if _PRIVATE_JWK_MEMBERS & set(key):
            name = key.get("kid", index)
            raise ValueError(
                f"the JWKS file {path}: key {name!r} is private or symmetric; "
                "give the gateway public keys only"
            )
    return json.dumps({"keys": keys}, separators=(",", ":"), sort_keys=True)


def _file_state(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class ControlPlaneServer:
    """The ADS server, the JSON body check and the directory poller, started and stopped
    together."""

    def __init__(
        self,
        settings: Settings,
        gateway: GatewaySettings,
        *,
        mesh_tls: MeshTls | None = None,
        xds_tls: TlsFiles | None = None,
        health_port: int | None = None,
    ) -> None:
        """`mesh_tls`: this process's mesh credentials (`load_mesh_tls`), required when
        settings turn service-to-service TLS on. `xds_tls`: the files the xDS port serves
        mutual TLS with, answering Envoy's identity only (None: plaintext). `health_port`:
        a plaintext port serving grpc.health.v1 only, for probes without a certificate."""
        self.settings = settings
        self.gateway = gateway
        self.cache = SnapshotCache()
        self.discovery = DiscoveryServer(self.cache)
        keepalive = Keepalive.from_settings(settings)
        upstream_tls = envoy_upstream_tls(settings)
        if upstream_tls is not None and mesh_tls is None:
            raise ValueError("mTLS is on: pass the control plane's mesh credentials")
        self._channel = open_channel(
            settings.registry_address, keepalive, tls=mesh_tls, server_identity=callers.REGISTRY
        )
        # A local JWKS goes to Envoy inline: read now (a bad file stops the start), and
        # again whenever it changes (`_watch_jwks`).
        self._jwks_file = gateway.jwks_file if gateway.auth == "jwt" else None
        self._jwks_state = _file_state(self._jwks_file) if self._jwks_file else None
        jwks = read_jwks(self._jwks_file) if self._jwks_file else None
        self.options = dataclasses.replace(
            gateway.options(keepalive, jwks=jwks),
            otlp_traces=otlp_traces_receiver(settings),
            upstream_tls=upstream_tls,
        )
        self._directory = AgentDirectory(self._channel, [settings.registry_address])
        self.control_plane = self._control_plane()
        self._jwks_watcher: asyncio.Task[None] | None = None
        self.health = SnapshotHealth(self.cache)
        self.body_checker = BodyChecker()
        self._server = _Server([self.discovery, self.body_checker, self.health])
        self._xds_ssl: ssl.SSLContext | None = None
        if xds_tls is not None:
            self._xds_ssl = xds_server_ssl(xds_tls)
            authorize_xds(self._server)
        self.health_port = health_port
        self._health_server = _Server([self.health]) if health_port is not None else None
        self._poller: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self.address = ""

    async def start(self, port: int = 0) -> str:
        # mTLS with `xds_tls`; else plaintext: keep it on loopback (`agentplex up`).
        await self._server.start(self.settings.host, port, ssl=self._xds_ssl)
        if self._health_server is not None:
            await self._health_server.start(self.settings.host, self.health_port)
        listening = self._server._server  # grpclib exposes the bound socket only here
        assert listening is not None
        # What loop.create_server made (an asyncio.Server, or uvloop's, which has the same
        # `sockets`): grpclib keeps it as an AbstractServer, which declares none.
        bound = cast(asyncio.Server, listening).sockets[0].getsockname()[1]
        self.address = f"{self.settings.host}:{bound}"
        self._poller = asyncio.create_task(self.control_plane.run())
        if self._jwks_file is not None:
            self._jwks_watcher = asyncio.create_task(self._watch_jwks(self._jwks_file))
        log.info("gateway control plane serving", extra={"address": self.address})
        # drain_seconds 0 asks for no drain at all (development, tests): nothing to fit.
        drain = self.settings.drain_seconds
        if drain > 0 and not resources.drain_fits(self.options, drain):
            log.warning(
                "replicas draining for drain_seconds may still get calls: the health checks "
                "eject a stopping replica up to %.1fs after it turns NOT_SERVING; make "
                "AGENTPLEX_DRAIN_SECONDS at least %.1f or the health check interval shorter",
                resources.ejection_seconds(self.options),
                resources.ejection_seconds(self.options)
                + self.options.health_check_interval_seconds,
                extra={"drain_seconds": drain},
            )
        return self.address

    def _control_plane(self) -> ControlPlane:
        return ControlPlane(
            self._directory,
            self.options,
            self.cache,
            poll_seconds=self.gateway.directory_poll_seconds,
        )

    async def _watch_jwks(self, path: Path) -> None:
        """Re-reads the JWKS file when it changes (a key rotated in, or out) and publishes
        the new keys; a file that does not read as a JWKS leaves the last keys in place."""
        while True:
            await asyncio.sleep(self.gateway.directory_poll_seconds)
            state = _file_state(path)
            if state == self._jwks_state:
                continue
            self._jwks_state = state
            try:
                jwks = read_jwks(path)
            except ValueError as exc:
                log.warning("keeping the last JWKS", extra={"error": str(exc)})
                continue
            jwt = self.options.jwt
            if jwt is None or jwt.jwks == jwks:
                continue
            self.options = dataclasses.replace(
                self.options, jwt=dataclasses.replace(jwt, jwks=jwks)
            )
            # A control plane with nothing published yet builds a snapshot from the next
            # directory read, with the new keys; the old one stops polling.
            previous, self.control_plane = self._poller, self._control_plane()
            self._poller = asyncio.create_task(self.control_plane.run())
            if previous is not None:
                previous.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await previous
            log.info("JWKS changed; publishing its keys", extra={"file": str(path)})

    async def stop(self) -> None:
        """Health NOT_SERVING first, then stop polling, drop Envoy's connections and close
        the registry channel.

        Safe to call more than once and concurrently: a second call waits for the first
        to finish. Every step runs even if an earlier one fails. No drain delay: Envoy
        keeps the configuration it has, so there is nothing to move away from.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            await stop_each(
                "gateway",
                [self._not_serving, self._stop_poller, self._close_server, self._channel.close],
            )
        finally:
            self._stopped.set()

    async def _not_serving(self) -> None:
        self.health.shut_down()

    async def _stop_poller(self) -> None:
        if self._jwks_watcher is not None:
            self._jwks_watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._jwks_watcher
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    async def _close_server(self) -> None:
        for server in (self._server, self._health_server):
            if server is None or server._server is None:  # never started
                continue
            server.close()
            server.close_connections()
            await server.wait_closed()


class ControlPlaneProcess:
    """The control plane and its metrics endpoint, as one process part (runtime/process.py)."""

    def __init__(self, server: ControlPlaneServer, *, port: int, metrics_port: int) -> None:
        self.server = server
        self._port = port
        self._metrics_port = metrics_port
        self._metrics: MetricsEndpoint | None = None
        self._stopping = False
        self._stopped = asyncio.Event()

    async def start(self) -> Endpoint:
        try:
            self._metrics = MetricsEndpoint(self.server.settings.host, self._metrics_port)
            address = await self.server.start(self._port)
        except BaseException:
            await self.stop()
            raise
        return Endpoint(address, self._metrics.port)

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()

    async def stop(self) -> None:
        """Stop the server (NOT_SERVING first), then the metrics endpoint; safe to call more
        than once and concurrently (a second call waits for the first)."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            await stop_each("gateway", [self.server.stop, self._close_metrics])
            log.info("gateway stopped")
        finally:
            self._stopped.set()

    async def _close_metrics(self) -> None:
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            await asyncio.to_thread(metrics.close)


def main(argv: list[str] | None = None) -> None:
    async def build(settings: Settings, args: argparse.Namespace) -> ControlPlaneProcess:
        gateway = GatewaySettings.from_settings(settings)
        if (problem := gateway.open_to_anyone()) is not None:
            raise CannotStart(problem)
        server = ControlPlaneServer(
            settings,
            gateway,
            mesh_tls=await load_mesh_tls(settings),
            xds_tls=xds_tls(TlsFiles.from_settings(settings), settings.host),
            health_port=settings.health_port,
        )
        return ControlPlaneProcess(server, port=args.port, metrics_port=args.metrics_port)

    run_process(
        "python -m agentplex.gateway",
        build,
        name="gateway",
        port_help="xDS (ADS) port (0 = any free port)",
        argv=argv,
    )
