"""Authorization on every call: by peer identity (mTLS), then by principal.

With mTLS, the TLS handshake has already refused a client without a certificate from the
mesh CA (it never gets a call through: the client sees UNAVAILABLE). Every
call that does arrive is checked here: the identity in the peer's verified
certificate (its `spiffe://agentplex/<identity>` URI SAN, as gRPC lists it in
the auth context) must be one the caller table allows for the called service,
else PERMISSION_DENIED naming both. The table is the contract's
(`agentplex.contract.callers.CALLERS`), handed in by each service's process:
runtime sits below contract.

Then, with or without mTLS, the principal the call asserts (runtime/principal.py)
is checked — who may assert one, which scope the method needs from a token
(`agentplex.contract.scopes.SCOPES`) — and bound for the handler. Every refusal
is an audit line.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from agentplex.runtime import audit
from agentplex.runtime import principal as principals
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
ADMIN_SUFFIX = ":admin"
# What an audit line names of an administrative request: its identifying fields.
_RESOURCE_FIELDS = ("name", "version", "agent", "session_id", "state", "replacement", "endpoint")
ScopeTable = Mapping[str, str]


@dataclass(frozen=True)
class Access:
    """What a server enforces: the identities that may call each service (checked
    only with mTLS), those that may assert a principal, and the scope each method
    needs from a token. The contract's is `agentplex.contract.callers.ACCESS`."""

    callers: CallerTable = field(default_factory=dict)
    asserters: Collection[str] = ()
    scopes: ScopeTable = field(default_factory=dict)


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


class CallAuthorization(grpc.aio.ServerInterceptor):
    """Refuses calls the policy does not allow; binds the principal of those it does."""

    def __init__(self, access: Access, *, mtls: bool) -> None:
        self._access = access
        self._mtls = mtls

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        # "/package.Service/Method": the peer is known only once the call runs.
        check = _Check(handler_call_details.method, self._access, self._mtls)
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
    def __init__(self, method: str, access: Access, mtls: bool) -> None:
        self._method = method
        self._service = method.lstrip("/").partition("/")[0]
        self._access = access
        self._mtls = mtls
        self._open = self._service in ANY_MESH_PEER
        # Administrative calls are audited when allowed too, not only when refused.
        self._admin = access.scopes.get(method, "").endswith(ADMIN_SUFFIX)

    async def _authorize(self, context: Context) -> str | None:
        """Aborts a refused call; returns the peer's mesh identity (None without mTLS)."""
        access = self._access
        identity = peer_identity(context) if self._mtls else None
        if self._mtls:
            reason = refusal(self._service, identity, access.callers)
            if reason is not None:
                await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, reason, identity)
        if self._open:
            return identity
        try:
            metadata = cast(
                "Iterable[tuple[str, str | bytes]]", context.invocation_metadata() or ()
            )
            asserted = principals.from_metadata(metadata)
        except principals.PrincipalError as exc:
            await self._refuse(context, exc.code, str(exc), identity)
            raise  # not reached: the abort raised
        denial = principals.refusal(
            asserted,
            method=self._method,
            peer_identity=identity,
            mtls=self._mtls,
            asserters=access.asserters,
            scopes=access.scopes,
        )
        if denial is not None:
            await self._refuse(context, *denial, identity, asserted)
        if asserted is not None:
            # Each RPC runs in its own task: the binding ends with it.
            principals.bind(asserted.principal)
        return identity

    async def _refuse(
        self,
        context: Context,
        code: grpc.StatusCode,
        reason: str,
        identity: str | None,
        asserted: principals.Asserted | None = None,
    ) -> None:
        log.warning("refused a call: %s", reason, extra={"peer": context.peer()})
        audit.record(
            self._method,
            "",
            outcome=audit.DENIED,
            reason=reason,
            principal=asserted.principal if asserted is not None else principals.MESH,
            peer=identity,
        )
        await context.abort(code, reason)

    def unary(self, inner: Behavior) -> Behavior:
        async def call(request: Any, context: Context) -> Any:
            identity = await self._authorize(context)
            if self._admin:
                audit.record(self._method, _resource(request), outcome=audit.ALLOWED, peer=identity)
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


def _resource(request: Any, depth: int = 0) -> str:
    """The identifying fields of a request, e.g. `definition.name=calculator`: enough
    for an audit line to say what was changed, never a whole tool contract."""
    if not isinstance(request, Message):
        return ""
    parts: list[str] = []
    for descriptor, value in request.ListFields():
        if descriptor.message_type is not None and not descriptor.is_repeated:
            if depth == 0:
                inner = _resource(value, depth + 1)
                parts.extend(f"{descriptor.name}.{part}" for part in inner.split() if part)
        elif descriptor.name in _RESOURCE_FIELDS:
            parts.append(f"{descriptor.name}={value}")
    return " ".join(parts)[:300]
