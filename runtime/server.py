"""`ServiceHost`: what every agentplex gRPC server has besides its own servicers.

Health (SERVING only while the service's dependencies answer), server
reflection (so grpcurl works without .proto files), the error/metrics edge
interceptor, OpenTelemetry server spans, a Prometheus endpoint, and graceful
shutdown: on SIGTERM health turns NOT_SERVING first so balancers drain the
instance, then in-flight calls get the grace period to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from agentplex.runtime.interceptors import EdgeInterceptor
from agentplex.runtime.metrics import MetricsEndpoint
from agentplex.runtime.settings import Settings
from agentplex.runtime.tracing import ServerTracing

log = logging.getLogger(__name__)

DependencyCheck = Callable[[], Awaitable[None]]
"""Raises (or times out) when a dependency does not answer."""


@dataclass(frozen=True)
class Endpoint:
    """Where a started service listens."""

    address: str
    metrics_port: int | None


@dataclass
class ServiceHost:
    """Runs one gRPC server with the cross-cutting parts every service needs.

    `register` adds the service's own servicers and returns their full names
    (for reflection and per-service health).
    """

    name: str
    register: Callable[[grpc.aio.Server], Sequence[str]]
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = 0
    dependency_checks: Sequence[DependencyCheck] = ()
    health_interval_seconds: float = 1.0
    grace_seconds: float = 10.0
    on_stop: Sequence[Callable[[], Awaitable[None]]] = ()
    # Run once serving, with the bound endpoint (e.g. to announce it to the registry).
    on_start: Sequence[Callable[[Endpoint], Awaitable[None]]] = ()
    _server: grpc.aio.Server | None = field(default=None, init=False)
    _health: health_aio.HealthServicer | None = field(default=None, init=False)
    _service_names: Sequence[str] = field(default=(), init=False)
    _watch: asyncio.Task[None] | None = field(default=None, init=False)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _stopping: bool = field(default=False, init=False)
    _metrics: MetricsEndpoint | None = field(default=None, init=False)

    @classmethod
    def for_settings(
        cls,
        settings: Settings,
        *,
        name: str,
        register: Callable[[grpc.aio.Server], Sequence[str]],
        port: int,
        metrics_port: int | None,
        dependency_checks: Sequence[DependencyCheck] = (),
        on_start: Sequence[Callable[[Endpoint], Awaitable[None]]] = (),
        on_stop: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> ServiceHost:
        """A host listening where settings say, with their health interval and grace."""
        return cls(
            name=name,
            register=register,
            host=settings.host,
            port=port,
            metrics_port=metrics_port,
            dependency_checks=dependency_checks,
            health_interval_seconds=settings.health_interval_seconds,
            grace_seconds=settings.grace_seconds,
            on_start=on_start,
            on_stop=on_stop,
        )

    async def start(self) -> Endpoint:
        """Serve; on any failure part-way, whatever was started is stopped again."""
        try:
            if self.metrics_port is not None:
                self._metrics = MetricsEndpoint(self.host, self.metrics_port)
            # No SO_REUSEPORT: a second mesh on the same port must fail, not share it.
            server = grpc.aio.server(
                interceptors=[ServerTracing(), EdgeInterceptor()],
                options=[("grpc.so_reuseport", 0)],
            )
            self._service_names = list(self.register(server))
            self._health = health_aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
            reflection.enable_server_reflection(
                [*self._service_names, health_name, reflection.SERVICE_NAME], server
            )
            try:
                bound = server.add_insecure_port(f"{self.host}:{self.port}")
            except RuntimeError as exc:
                raise OSError(f"{self.name}: cannot listen on {self.host}:{self.port}") from exc
            self._server = server
            await server.start()
            metrics_port = self._metrics.port if self._metrics else None
            endpoint = Endpoint(address=f"{self.host}:{bound}", metrics_port=metrics_port)
            for hook in self.on_start:
                await hook(endpoint)
            await self._set_health(await self._dependencies_ok())
        except BaseException:
            await self.stop()
            raise
        self._watch = asyncio.create_task(self._watch_dependencies(), name=f"{self.name}-health")
        log.info(
            "%s listening",
            self.name,
            extra={"address": endpoint.address, "metrics_port": metrics_port},
        )
        return endpoint

    async def _dependencies_ok(self) -> bool:
        for check in self.dependency_checks:
            try:
                await asyncio.wait_for(check(), timeout=max(self.health_interval_seconds, 1.0))
            except Exception as exc:  # any failure means "not ready", never a crash
                log.warning("%s dependency check failed: %s", self.name, exc)
                return False
        return True

    async def _set_health(self, ok: bool) -> None:
        assert self._health is not None
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", *self._service_names):
            await self._health.set(service, status)

    async def _watch_dependencies(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.health_interval_seconds)
            if not self._stopping:
                await self._set_health(await self._dependencies_ok())

    async def stop(self) -> None:
        """Drain and stop; safe to call more than once."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.grace_seconds)
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.close)
            self._metrics = None
        for hook in self.on_stop:
            await hook()
        log.info("%s stopped", self.name)
        self._stopped.set()

    async def __aenter__(self) -> Endpoint:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve_until_signalled(self, ready_file: Path | None = None) -> None:
        """Start, announce the endpoint, and run until SIGTERM or SIGINT."""
        endpoint = await self.start()
        if ready_file is not None:
            write_ready_file(ready_file, endpoint)
        try:
            await wait_for_stop_signal()
            log.info("%s received a stop signal; draining", self.name)
        finally:
            await self.stop()


def stop_on_signals(stop: asyncio.Event) -> None:
    """Set `stop` on SIGTERM or SIGINT (the event loop must be running)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def wait_for_stop_signal() -> None:
    """Return on the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    await stop.wait()


def write_ready_file(path: Path, endpoint: Endpoint) -> None:
    """Publish the bound address atomically, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(
        json.dumps(
            {"address": endpoint.address, "metrics_port": endpoint.metrics_port, "pid": os.getpid()}
        )
    )
    tmp.replace(path)
