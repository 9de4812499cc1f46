"""Authorization by peer identity, on servers that require client certificates.

The TLS handshake has already refused a client without a certificate from the
mesh CA (it never gets a call through: the client sees UNAVAILABLE). Every
call that does arrive is checked here: the identity in the peer's verified
certificate (its `spiffe://agentplex/<identity>` URI SAN, as gRPC lists it in
the auth context) must be one the caller table allows for the called service,
else PERMISSION_DENIED naming both. The table is the contract's
(`agentplex.contract.callers.CALLERS`), handed in by each service's process:
runtime sits below contract.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from agentplex.runtime.tls import identity_from_sans

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # generic in the stubs only
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Behavior: TypeAlias = Callable[..., Any]
    MethodHandler: TypeAlias = grpc.RpcMethodHandler[Any, Any]

# Open to any mesh certificate: probes, the gateway's health checks, grpcurl.
ANY_MESH_PEER = frozenset(
    {
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
        "grpc.reflection.v1.ServerReflection",
    }
)
# gRPC sets this only for a certificate with exactly one URI SAN, a valid SPIFFE ID: never
# from a DNS or email name that merely reads like one, never a pick among several.
_SPIFFE_ID = "peer_spiffe_id"

CallerTable = Mapping[str, Collection[str]]


def peer_identity(context: Context) -> str | None:
    """The mesh identity of the verified client certificate on this call, if any."""
    spiffe_ids = list(context.auth_context().get(_SPIFFE_ID, ()))
    return identity_from_sans(value.decode(errors="replace") for value in spiffe_ids[:1])


def refusal(service: str, identity: str | None, callers: CallerTable) -> str | None:
    """Why `identity` may not call `service`, or None when it may."""
    if identity is None:
        return f"{service} accepts only callers with a mesh identity certificate"
    if service in ANY_MESH_PEER or identity in callers.get(service, ()):
        return None
    return f"identity {identity!r} may not call {service}"


class PeerAuthorization(grpc.aio.ServerInterceptor):
    """Refuses calls whose peer identity the caller table does not allow."""

    def __init__(self, callers: CallerTable) -> None:
        self._callers = callers

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        # "/package.Service/Method": the peer is known only once the call runs.
        service = handler_call_details.method.lstrip("/").partition("/")[0]
        check = _Check(service, self._callers)
        kinds = (
            (handler.unary_unary, grpc.unary_unary_rpc_method_handler, check.unary),
            (handler.unary_stream, grpc.unary_stream_rpc_method_handler, check.stream),
            (handler.stream_unary, grpc.stream_unary_rpc_method_handler, check.unary),
            (handler.stream_stream, grpc.stream_stream_rpc_method_handler, check.stream),
        )
        for behavior, make, wrap in kinds:
            if behavior is not None:
                factory = cast("Callable[..., MethodHandler]", make)
                return factory(
                    wrap(cast("Behavior", behavior)),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler


class _Check:
    def __init__(self, service: str, callers: CallerTable) -> None:
        self._service = service
        self._callers = callers

    async def _authorize(self, context: Context) -> None:
        reason = refusal(self._service, peer_identity(context), self._callers)
        if reason is not None:
            log.warning("refused a call: %s", reason, extra={"peer": context.peer()})
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)

    def unary(self, inner: Behavior) -> Behavior:
        async def call(request: Any, context: Context) -> Any:
            await self._authorize(context)
            return await inner(request, context)

        return call

    def stream(self, inner: Behavior) -> Behavior:
        if not inspect.isasyncgenfunction(inner):
            # A coroutine that streams with `await context.write(...)`: same shape.
            return self.unary(inner)

        async def call(request: Any, context: Context) -> Any:
            await self._authorize(context)
            async for response in inner(request, context):
                yield response

        return call
