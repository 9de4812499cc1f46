"""`agentplex serve envoy`: Envoy for a host of its own, booted from a control plane by address.

A small Python parent that writes the bootstrap (`bootstrap.py`) into a
temporary directory, runs the real Envoy binary (logs to this process's
output, as a container's should) and exits with Envoy's exit code if Envoy
dies, so the orchestrator restarts both. On SIGTERM it drains the way a
rolling update needs, as Istio's pilot-agent does for its Envoys: the health
check filter answers 503 (`/healthcheck/fail`: the readiness probe and any
balancer in front stop sending), `drain_seconds` later the listeners drain
gracefully, and Envoy stops once in-flight requests had the grace period.
SIGINT stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import httpx

from agentplex.gateway.bootstrap import BootstrapOptions
from agentplex.gateway.control_plane import is_loopback
from agentplex.gateway.envoy import EnvoyError, EnvoyProcess
from agentplex.gateway.resources import HostPort, UpstreamTls
from agentplex.gateway.settings import GatewaySettings
from agentplex.runtime import loop as event_loop
from agentplex.runtime.process import (
    EXIT_CANNOT_START,
    STOP_OVERRUN_SECONDS,
    Endpoint,
    quick_stop_requested,
    read_settings,
    stop_on_signals,
    write_ready_file,
)
from agentplex.runtime.settings import Settings
from agentplex.runtime.telemetry import configure_logging

log = logging.getLogger("agentplex.gateway.edge")

START_TIMEOUT_SECONDS = 60.0
# Envoy's own graceful listener drain (`--drain-time-s` in envoy.py).
LISTENER_DRAIN_SECONDS = 2.0


def xds_client_tls(settings: Settings, control_plane: HostPort) -> UpstreamTls | None:
    """Envoy's mTLS to the control plane: with service-to-service TLS on, the gateway's
    certificate (`tls_gateway_*_file`, else `tls_cert_file`: identity `gateway`) and the
    mesh CA, unless the control plane is on loopback (it then serves plaintext:
    `control_plane.xds_tls`). Absolute paths: Envoy reads the files itself."""
    ca = settings.tls_ca_file
    if ca is None or is_loopback(control_plane.host):
        return None
    cert = settings.tls_gateway_cert_file or settings.tls_cert_file
    key = settings.tls_gateway_key_file or settings.tls_key_file
    assert cert is not None and key is not None  # settings set all three or none
    return UpstreamTls(
        ca_file=os.path.abspath(ca), cert_file=os.path.abspath(cert), key_file=os.path.abspath(key)
    )


def options_from(gateway: GatewaySettings, settings: Settings | None = None) -> BootstrapOptions:
    """The bootstrap a settings-configured Envoy boots from; ValueError names a bad setting.
    `settings`: the mesh's, for mTLS to the control plane (`xds_client_tls`)."""
    try:
        control_plane = HostPort.parse(gateway.control_plane_address, allow_names=True)
    except ValueError as exc:
        raise ValueError(f"AGENTPLEX_GATEWAY_CONTROL_PLANE_ADDRESS: {exc}") from None
    stats = None
    if gateway.stats_port is not None:
        stats = HostPort(gateway.listen_host, gateway.stats_port)
    return BootstrapOptions(
        control_plane,
        node_id="gateway",
        admin_port=gateway.admin_port,
        stats=stats,
        xds_tls=xds_client_tls(settings, control_plane) if settings is not None else None,
    )


class EdgeEnvoy:
    """Envoy and its admin API, from start to a drained stop."""

    def __init__(self, envoy: EnvoyProcess, settings: Settings) -> None:
        self.envoy = envoy
        self.settings = settings

    async def start(self) -> HostPort:
        admin = await self.envoy.start(timeout=START_TIMEOUT_SECONDS)
        log.info(
            "envoy started; configuration from the control plane",
            extra={
                "control_plane": self.settings.gateway_control_plane_address,
                "admin": f"{admin.host}:{admin.port}",
            },
        )
        return admin

    async def run(self, stop: asyncio.Event) -> int:
        """Until a stop signal (then drain and stop: 0) or Envoy's exit (its code)."""
        process = self.envoy.process
        assert process is not None
        exited = asyncio.ensure_future(process.wait())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if exited.done():
            code = exited.result()
            log.error("envoy exited with code %s", code)
            # Never 0: whatever stopped Envoy, the orchestrator must start it again.
            return 128 - code if code < 0 else (code or EXIT_CANNOT_START)
        exited.cancel()
        await self.drain()
        await self.envoy.stop(timeout=self.settings.grace_seconds)
        return 0

    async def drain(self) -> None:
        if quick_stop_requested():
            return
        admin = self.envoy.admin
        assert admin is not None
        base = f"http://{admin.host}:{admin.port}"
        async with httpx.AsyncClient(timeout=2.0) as client:
            with contextlib.suppress(httpx.HTTPError):
                await client.post(f"{base}/healthcheck/fail")
            log.info("envoy draining for %.1fs", self.settings.drain_seconds)
            await asyncio.sleep(self.settings.drain_seconds)
            with contextlib.suppress(httpx.HTTPError):
                await client.post(f"{base}/drain_listeners", params={"graceful": ""})
        await asyncio.sleep(min(LISTENER_DRAIN_SECONDS, self.settings.grace_seconds))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="agentplex serve envoy",
        description="Run Envoy as the gateway, configured by the control plane at "
        "AGENTPLEX_GATEWAY_CONTROL_PLANE_ADDRESS (docs/SETTINGS.md).",
    )
    parser.add_argument(
        "--work-dir", type=Path, help="where the bootstrap is written (default: a new temp dir)"
    )
    parser.add_argument("--ready-file", type=Path, help="write the admin address here once up")
    args = parser.parse_args(argv)
    settings = read_settings("agentplex serve envoy")
    configure_logging("envoy", settings.log_level)
    try:
        options = options_from(GatewaySettings.from_settings(settings), settings)
    except ValueError as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(EXIT_CANNOT_START) from None
    code = event_loop.run(_serve(settings, options, args.work_dir, args.ready_file), settings)
    raise SystemExit(code)


async def _serve(
    settings: Settings, options: BootstrapOptions, work_dir: Path | None, ready_file: Path | None
) -> int:
    stop = asyncio.Event()
    stop_on_signals(
        stop,
        name="envoy",
        exit_after=settings.drain_seconds + settings.grace_seconds + STOP_OVERRUN_SECONDS,
    )
    with tempfile.TemporaryDirectory(prefix="agentplex-envoy-") as scratch:
        envoy = EnvoyProcess(options, work_dir=work_dir or Path(scratch), log_path=None)
        edge = EdgeEnvoy(envoy, settings)
        try:
            admin = await edge.start()
        except EnvoyError as exc:
            log.error("cannot start: %s", exc)
            await envoy.stop()
            return EXIT_CANNOT_START
        if ready_file is not None:
            write_ready_file(
                ready_file, Endpoint(address=f"{admin.host}:{admin.port}", metrics_port=None)
            )
        try:
            return await edge.run(stop)
        finally:
            await envoy.stop()
