"""Client-side plumbing: channels that carry trace context, deadlines, error mapping.

Every outgoing call goes through `call_with_deadline`, so no call is made
without a deadline and no status comes back as a raw `AioRpcError`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentplex.runtime import errors
from agentplex.runtime.settings import Settings
from agentplex.runtime.tracing import client_interceptors

if TYPE_CHECKING:  # only the type: the agent client's base install has no cryptography
    from agentplex.runtime.tls import MeshTls

T = TypeVar("T")


class TimeLeft(Protocol):
    """What a deadline is read from: a grpc.aio.ServicerContext (whose stubs leave out
    that `time_remaining()` is None when the caller set no deadline)."""

    def time_remaining(self) -> float | None: ...


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keepalive, so a frozen or half-open peer fails calls instead of hanging them.

    TCP alone cannot tell: a stopped process's kernel still acknowledges
    packets. A PING unanswered for `timeout_seconds` closes the connection
    and every call on it ends with UNAVAILABLE, within `seconds + timeout_seconds`.
    """

    seconds: float = 10.0
    timeout_seconds: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Keepalive:
        return cls(settings.keepalive_seconds, settings.keepalive_timeout_seconds)

    def channel_options(self, *, any_server: bool = False) -> list[tuple[str, int]]:
        """Options for a channel; `any_server` for peers that may not be ours.

        Our servers accept a PING every `seconds`, with or without calls and
        data. A server with gRPC's defaults (a tool backend in another
        language) answers pings without data more often than every 5 minutes
        with GOAWAY after two: to such a peer, ping only during calls and at
        most twice without data (a call's deadline bounds the rest).
        """
        options = [
            ("grpc.keepalive_time_ms", int(self.seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.timeout_seconds * 1000)),
            # How long a PING's answer is awaited (gRPC's default is 60 s, whatever
            # the keepalive timeout says).
            ("grpc.http2.ping_timeout_ms", int(self.timeout_seconds * 1000)),
        ]
        if any_server:
            return options
        return [
            *options,
            # A stream waiting on a slow model sends no data for minutes; without
            # these, pings stop after two and a freeze then goes unnoticed.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def server_options(self) -> list[tuple[str, int]]:
        """Accept our clients' (and Envoy's) pings at this rate, and ping them back."""
        return [
            ("grpc.keepalive_time_ms", int(self.seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.timeout_seconds * 1000)),
            ("grpc.http2.ping_timeout_ms", int(self.timeout_seconds * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Peers ping every `seconds`; allow some jitter before calling it abuse.
            ("grpc.http2.min_recv_ping_interval_without_data_ms", int(self.seconds * 500)),
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.seconds * 500)),
            ("grpc.http2.max_ping_strikes", 0),
        ]


def open_channel(
    address: str,
    keepalive: Keepalive | None = None,
    *,
    any_server: bool = False,
    tls: MeshTls | None = None,
    server_identity: str | None = None,
) -> grpc.aio.Channel:
    """A loopback/cluster channel that propagates W3C trace context and
    detects a dead peer through keepalive (defaults unless the caller's settings say;
    `any_server` for a peer that may not be an agentplex server, see `Keepalive`).

    With `tls` (the process's mesh credentials, `runtime.tls.load_mesh_tls`) it is
    mTLS: this process presents its certificate and accepts only a server
    certificate from the mesh CA that names `server_identity` (a mesh identity such as
    `memory`), which it must then give: every mesh certificate also names the shared
    development names (`localhost`, 127.0.0.1), so the address alone would accept any
    of them. Plaintext without `tls`.

    Round robin over every address the name resolves to: a headless Kubernetes
    Service gives one per replica, and one HTTP/2 connection per replica spreads
    the calls (the default, pick_first, would send them all to one).
    """
    keepalive_options = (keepalive or Keepalive()).channel_options(any_server=any_server)
    options: list[tuple[str, str | int]] = [
        *keepalive_options,
        ("grpc.enable_retries", 0),
        ("grpc.lb_policy_name", "round_robin"),
    ]
    if tls is None:
        return grpc.aio.insecure_channel(
            address, interceptors=client_interceptors(), options=options
        )
    if server_identity is None:
        raise ValueError(f"an mTLS channel to {address} must name the server's mesh identity")
    # Replicas are dialled by pod IP, which one shared certificate cannot list: verify
    # the identity's DNS SAN instead (grpcio offers no URI SAN check to clients).
    options.append(("grpc.ssl_target_name_override", server_identity))
    return grpc.aio.secure_channel(
        address, tls.channel_credentials(), interceptors=client_interceptors(), options=options
    )


async def health_status(channel: grpc.aio.Channel, *, timeout: float) -> int:
    """What the server on `channel` says of its own health (grpc.health.v1 Check of
    service ""), e.g. `health_pb2.HealthCheckResponse.SERVING`. A bare probe: a failed
    call raises grpc.aio.AioRpcError."""
    stub = health_pb2_grpc.HealthStub(channel)
    check = stub.Check  # type: ignore[attr-defined]  # types-grpcio-health-checking's HealthStub declares no methods
    response: health_pb2.HealthCheckResponse = await check(
        health_pb2.HealthCheckRequest(), timeout=timeout
    )
    return response.status


@dataclass(frozen=True)
class Deadline:
    """An absolute point in (monotonic) time by which work must be done.

    It travels with a task so every downstream call gets the time that is
    actually left, never a fresh full timeout.
    """

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    @classmethod
    def from_context(cls, context: TimeLeft, default_seconds: float) -> Deadline:
        """The caller's deadline, or `default_seconds` when the caller set none."""
        remaining = context.time_remaining()
        if remaining is None:
            return cls.after(default_seconds)
        return cls.after(remaining)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def timeout(self, cap: float | None = None) -> float:
        """Seconds left for one call (optionally capped); raises if none are left."""
        left = self.remaining()
        if left <= 0:
            raise errors.DeadlineExceeded("the task's deadline passed")
        return left if cap is None else min(left, cap)


async def call_with_deadline(
    rpc: Callable[..., Awaitable[T]], request: object, *, timeout: float
) -> T:
    """Invoke a unary RPC with a timeout, mapping failures to domain errors."""
    try:
        return await rpc(request, timeout=timeout)
    except grpc.aio.AioRpcError as err:
        raise errors.from_rpc_error(err) from err
    except TimeoutError as err:
        raise errors.DeadlineExceeded("call timed out") from err
