"""`ServiceHost`: what every agentplex gRPC server has besides its own servicers.

Health (SERVING only while the service's dependencies answer), server
reflection v1 and v1alpha (so grpcurl works without .proto files), the error/metrics edge
interceptor, OpenTelemetry server spans, a Prometheus endpoint, and graceful
shutdown: on SIGTERM health turns NOT_SERVING first and the server keeps
answering for the drain delay, so the gateway's health checks and clients'
balancers move away while nothing is refused; then it stops accepting calls
and in-flight ones get the grace period to finish. HTTP/2 keepalive both
ways, so a frozen peer is noticed (see `Keepalive`). With mesh TLS files
(runtime/tls.py) it serves mTLS only and authorizes each call by the peer's
certificate identity (runtime/peer_auth.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from agentplex.runtime.advertise import advertised_host, join
from agentplex.runtime.clients import Keepalive
from agentplex.runtime.interceptors import EdgeInterceptor
from agentplex.runtime.metrics import MetricsEndpoint
from agentplex.runtime.peer_auth import Access, CallAuthorization
from agentplex.runtime.process import Endpoint, quick_stop_requested, stop_each
from agentplex.runtime.process import write_ready_file as write_ready_file  # still importable here
from agentplex.runtime.settings import Settings
from agentplex.runtime.tls import TlsFiles
from agentplex.runtime.tracing import ServerTracing

log = logging.getLogger(__name__)

# Request metadata a server accepts (gRPC counts name + value + 32 bytes per entry).
# gRPC's default, 8 KiB, would refuse calls whose headers the gateway admits (bearer
# tokens, cookies) with RESOURCE_EXHAUSTED; the gateway's edge limit stays below this.
MAX_METADATA_BYTES = 64 * 1024
# The grpc.health.v1 service name a liveness probe asks for (Kubernetes `grpc.service`).
LIVENESS_SERVICE = "liveness"

DependencyCheck = Callable[[], Awaitable[None]]
"""Raises (or times out) when a dependency does not answer."""


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA = reflection.SERVICE_NAME
_V1ALPHA_PACKAGE = reflection_pb2.DESCRIPTOR.package


def _reflection_v1_file() -> FileDescriptor:
    """grpc/reflection/v1/reflection.proto, in a pool of its own.

    grpcio-reflection ships only v1alpha; v1 is the same protocol promoted
    unchanged (same messages, fields and numbers) under a new package. Its
    descriptor is v1alpha's with the package renamed, so `grpcurl describe`
    answers for it too.
    """
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.ClearField("deprecated")
    old, new = f".{_V1ALPHA_PACKAGE}.", f".{proto.package}."
    for message in proto.message_type:
        for message_field in message.field:
            if message_field.HasField("type_name"):
                message_field.type_name = message_field.type_name.replace(old, new, 1)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new, 1)
            method.output_type = method.output_type.replace(old, new, 1)
    return descriptor_pool.DescriptorPool().AddSerializedFile(proto.SerializeToString())


class ReflectionPool:
    """The descriptors reflection answers from: the default pool, then reflection v1's.

    It also finds the file of a method (`agentplex.v1.AgentService.StreamSteps`):
    protobuf's upb pool finds services, messages, fields and enums by name, but
    not methods, so `grpcurl describe` of a method would be "Symbol not found".
    Given to grpcio-reflection's servicer as its pool: these are the calls it makes.
    """

    def __init__(self, *pools: descriptor_pool.DescriptorPool) -> None:
        self._pools = pools

    def FindFileByName(self, name: str) -> FileDescriptor:
        for pool in self._pools:
            with contextlib.suppress(KeyError):
                return pool.FindFileByName(name)
        raise KeyError(name)

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        for pool in self._pools:
            with contextlib.suppress(KeyError):
                return pool.FindFileContainingSymbol(symbol)
            service, _, method = symbol.rpartition(".")
            with contextlib.suppress(KeyError):
                found = pool.FindServiceByName(service)
                if method in found.methods_by_name:
                    return found.file
        raise KeyError(symbol)

    def FindMessageTypeByName(self, name: str) -> Descriptor:
        for pool in self._pools:
            with contextlib.suppress(KeyError):
                return pool.FindMessageTypeByName(name)
        raise KeyError(name)

    def FindExtensionByNumber(self, message: Descriptor, number: int) -> FieldDescriptor:
        return message.file.pool.FindExtensionByNumber(message, number)

    def FindAllExtensions(self, message: Descriptor) -> list[FieldDescriptor]:
        return list(message.file.pool.FindAllExtensions(message))


def serve_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Server reflection v1 and v1alpha for these services (and for itself).

    One servicer, grpcio-reflection's, answers both: the two protocols' messages
    are the same on the wire, so v1 is v1alpha's handler under v1's name.
    """
    names = [*service_names, REFLECTION_V1, REFLECTION_V1ALPHA]
    pool = ReflectionPool(descriptor_pool.Default(), _reflection_v1_file().pool)
    servicer = reflection.aio.ReflectionServicer(names, pool=pool)
    # The stubs leave this generated function untyped.
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1})]
    )


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
    # Where others reach it, when not `host` (runtime/advertise.py).
    advertise_host: str | None = None
    metrics_port: int | None = 0
    dependency_checks: Sequence[DependencyCheck] = ()
    health_interval_seconds: float = 1.0
    grace_seconds: float = 10.0
    # Serving-while-NOT_SERVING time after a stop is asked for; 0 for in-process tests.
    drain_seconds: float = 0.0
    keepalive: Keepalive = field(default_factory=Keepalive)
    on_stop: Sequence[Callable[[], Awaitable[None]]] = ()
    # Run once serving, with the bound endpoint (e.g. to announce it to the registry).
    on_start: Sequence[Callable[[Endpoint], Awaitable[None]]] = ()
    # mTLS when set; then only identities `access.callers` allows for a service may
    # call it. Principals and scopes are checked either way (agentplex.contract.callers
    # .ACCESS; none given: health and reflection only, and no principal may be asserted).
    tls: TlsFiles | None = None
    access: Access = field(default_factory=Access)
    # A plaintext listener serving grpc.health.v1 only, for probes that cannot present a
    # certificate (the kubelet's gRPC probes); None: none. It tells no more than a probe
    # needs: the same statuses, no services, no reflection.
    health_port: int | None = None
    _server: grpc.aio.Server | None = field(default=None, init=False)
    _health_server: grpc.aio.Server | None = field(default=None, init=False)
    _health: health_aio.HealthServicer | None = field(default=None, init=False)
    _service_names: Sequence[str] = field(default=(), init=False)
    _watch: asyncio.Task[None] | None = field(default=None, init=False)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _stopping: bool = field(default=False, init=False)
    _metrics: MetricsEndpoint | None = field(default=None, init=False)
    _announced_at: float | None = field(default=None, init=False)

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
        access: Access | None = None,
    ) -> ServiceHost:
        """A host listening where settings say, with their health interval, grace and
        mesh TLS files."""
        return cls(
            name=name,
            register=register,
            host=settings.host,
            advertise_host=settings.advertise_host,
            port=port,
            metrics_port=metrics_port,
            dependency_checks=dependency_checks,
            health_interval_seconds=settings.health_interval_seconds,
            grace_seconds=settings.grace_seconds,
            drain_seconds=settings.drain_seconds,
            keepalive=Keepalive.from_settings(settings),
            on_start=on_start,
            on_stop=on_stop,
            tls=TlsFiles.from_settings(settings),
            access=access or Access(),
            health_port=settings.health_port,
        )

    async def start(self) -> Endpoint:
        """Serve; on any failure part-way, whatever was started is stopped again."""
        try:
            if self.metrics_port is not None:
                self._metrics = MetricsEndpoint(self.host, self.metrics_port)
            mesh_tls = await self.tls.load() if self.tls is not None else None
            # Innermost: a refusal is traced and counted like any other status.
            interceptors: list[grpc.aio.ServerInterceptor] = [
                ServerTracing(),
                EdgeInterceptor(),
                CallAuthorization(self.access, mtls=mesh_tls is not None),
            ]
            # No SO_REUSEPORT: a second mesh on the same port must fail, not share it.
            server = grpc.aio.server(
                interceptors=interceptors,
                options=[
                    ("grpc.so_reuseport", 0),
                    ("grpc.max_metadata_size", MAX_METADATA_BYTES),
                    ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
                    *self.keepalive.server_options(),
                ],
            )
            self._service_names = list(self.register(server))
            self._health = health_aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
            serve_reflection([*self._service_names, health_name], server)
            try:
                address = join(self.host, self.port)
                bound = (
                    server.add_secure_port(address, mesh_tls.server_credentials())
                    if mesh_tls is not None
                    else server.add_insecure_port(address)
                )
            except RuntimeError as exc:
                raise OSError(f"{self.name}: cannot listen on {self.host}:{self.port}") from exc
            self._server = server
            await server.start()
            if self.health_port is not None:
                await self._serve_plain_health(self._health)
            metrics_port = self._metrics.port if self._metrics else None
            advertised = await advertised_host(self.host, self.advertise_host)
            endpoint = Endpoint(address=join(advertised, bound), metrics_port=metrics_port)
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
            extra={
                "address": endpoint.address,
                "metrics_port": metrics_port,
                "mtls_identity": mesh_tls.identity if mesh_tls is not None else None,
            },
        )
        return endpoint

    async def _serve_plain_health(self, health: health_aio.HealthServicer) -> None:
        assert self.health_port is not None
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        address = join(self.host, self.health_port)
        try:
            server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"{self.name}: cannot listen on {address} for health") from exc
        self._health_server = server
        await server.start()

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
        # Liveness says only that this process answers, whatever its dependencies say:
        # a Redis outage must not get every pod restarted (graceful shutdown clears it).
        await self._health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    async def _watch_dependencies(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.health_interval_seconds)
            if not self._stopping:
                await self._set_health(await self._dependencies_ok())

    async def stop(self) -> None:
        """Drain and stop; safe to call more than once, and concurrently.

        Every step runs even if an earlier one fails (each failure is logged
        with the step's name): a hook that raises must not leave the server
        listening or the hooks after it undone.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            await stop_each(
                self.name,
                [
                    self.announce_stop,
                    self._drain,
                    self._stop_server,
                    self._close_metrics,
                    *self.on_stop,
                ],
            )
            log.info("%s stopped", self.name)
        finally:
            self._stopped.set()

    async def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch

    async def _enter_graceful_shutdown(self) -> None:
        # NOT_SERVING first, so balancers stop sending before the server drains.
        if self._health is not None:
            await self._health.enter_graceful_shutdown()

    async def announce_stop(self) -> None:
        """Say NOT_SERVING from now on, while still answering calls; idempotent.

        The first step of `stop`, public for a part that must tell its
        watchers before it starts letting go of work (a worker, before it
        hands tasks back); the drain delay counts from here.
        """
        if self._announced_at is not None:
            return
        self._announced_at = time.monotonic()
        await self._stop_watch()
        await self._enter_graceful_shutdown()

    async def _drain(self) -> None:
        # Still serving: calls that arrive before the balancers notice are answered.
        if self._server is None or quick_stop_requested() or self._announced_at is None:
            return
        left = self.drain_seconds - (time.monotonic() - self._announced_at)
        if left > 0:
            log.info("%s draining for %.1fs", self.name, left)
            await asyncio.sleep(left)

    async def _stop_server(self) -> None:
        # Health answers (NOT_SERVING) until the server it speaks for has stopped.
        if self._server is not None:
            await self._server.stop(self.grace_seconds)
        if self._health_server is not None:
            await self._health_server.stop(0)

    async def _close_metrics(self) -> None:
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            await asyncio.to_thread(metrics.close)

    async def run(self, stop: asyncio.Event) -> None:
        """A server's work is answering calls: wait until asked to stop."""
        await stop.wait()

    async def __aenter__(self) -> Endpoint:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
