"""The principal a call acts for: tenant, subject and scopes, verified and carried.

The gateway verifies a bearer token and stamps its claims on the request as
headers (`TENANT_HEADER`, `SUBJECT_HEADER`, `SCOPE_HEADER`) with
`PRINCIPAL_HEADER: edge`; it drops any copies a caller sent first. A service
reads them in `PrincipalCheck` and runs the handler with the principal bound
to a context variable (`current()`), so every store keys its data by the
tenant (`tenant_prefix`) and every outgoing call carries the principal on
(`outgoing_metadata`, marked `delegated`): the agent's calls to memory and
the registry, the registry's to tool backends and sub-agents. A queued task
stores its principal and the worker binds it again before running it.

Trust: with mTLS a service accepts these headers only from the identities the
contract says may assert a principal (the gateway, agents, workers, the
registry); anyone else naming one is refused. Without mTLS the network is the
trust boundary (docs/SECURITY.md). A call with no principal headers acts as the
mesh itself (`MESH`: the default tenant, every scope): a service's own
housekeeping, an operator's `agentplex` command, a mesh without tokens.

Scopes are checked only on calls that come from the edge: a delegated call is
made by a service doing the work it was authorized for (an agent loading the
history of a task its caller may run), and the caller table authorizes that
service, not the user.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import grpc

from agentplex.v1 import principal_pb2

TENANT_HEADER = "x-agentplex-tenant"
SUBJECT_HEADER = "x-agentplex-subject"
SCOPE_HEADER = "x-agentplex-scope"
# Who vouches for the principal: the edge (it checked the token) or a service carrying
# it on (`delegated`). The edge removes callers' copies of all four headers.
PRINCIPAL_HEADER = "x-agentplex-principal"
EDGE = "edge"
DELEGATED = "delegated"
HEADERS = (TENANT_HEADER, SUBJECT_HEADER, SCOPE_HEADER, PRINCIPAL_HEADER)

DEFAULT_TENANT = "default"
# Safe inside a Redis key and a log line; what a tenant claim must look like.
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_SCOPE_HEADER = 2048


class PrincipalError(Exception):
    """Principal headers that cannot be honoured, with the status they earn."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Principal:
    """Who a call acts for. `scopes` None: unrestricted (the mesh itself)."""

    tenant: str
    subject: str = ""
    scopes: frozenset[str] | None = None

    def allows(self, scope: str) -> bool:
        return self.scopes is None or scope in self.scopes

    @property
    def is_mesh(self) -> bool:
        """The mesh acting for itself: nothing to carry on, nothing to scope."""
        return self.scopes is None

    def describe(self) -> dict[str, object]:
        """For audit lines and task records: never more than the token said."""
        return {
            "tenant": self.tenant,
            "subject": self.subject,
            "scopes": sorted(self.scopes) if self.scopes is not None else ["*"],
        }


MESH = Principal(DEFAULT_TENANT)

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "agentplex_principal", default=MESH
)


def current() -> Principal:
    """The principal the running call or task acts for (`MESH` outside any)."""
    return _current.get()


def bind(principal: Principal) -> contextvars.Token[Principal]:
    """Act for `principal` in this task from now on (each RPC and each queued task
    runs in its own asyncio task, so nothing leaks to the next one)."""
    return _current.set(principal)


def reset(token: contextvars.Token[Principal]) -> None:
    _current.reset(token)


def as_proto(principal: Principal) -> principal_pb2.Principal:
    """As task records and events keep it; empty for the mesh itself."""
    if principal.is_mesh:
        return principal_pb2.Principal()
    return principal_pb2.Principal(
        tenant=principal.tenant, subject=principal.subject, scopes=sorted(principal.scopes or ())
    )


def from_proto(message: principal_pb2.Principal) -> Principal:
    """The principal a record names (empty: the mesh's own)."""
    if not message.tenant:
        return MESH
    return Principal(message.tenant, message.subject, frozenset(message.scopes))


def tenant_prefix(key_prefix: str, tenant: str | None = None) -> str:
    """The Redis key prefix of a tenant's data: the configured prefix for the default
    tenant (so data written before tenancy stays where it was), `prefix@tenant` for
    every other. `@` is in no agent, session, task or tool name, so no two tenants'
    keys can ever collide, whatever names they choose."""
    tenant = current().tenant if tenant is None else tenant
    return key_prefix if tenant == DEFAULT_TENANT else f"{key_prefix}@{tenant}"


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Headers that carry the current principal on a call this service makes."""
    principal = current()
    if principal.is_mesh:
        return ()
    headers = [(TENANT_HEADER, principal.tenant), (PRINCIPAL_HEADER, DELEGATED)]
    if principal.subject:
        headers.append((SUBJECT_HEADER, principal.subject))
    if principal.scopes is not None:
        headers.append((SCOPE_HEADER, " ".join(sorted(principal.scopes))))
    return tuple(headers)


@dataclass(frozen=True)
class Asserted:
    """A principal as a call's headers state it, and who vouches for it."""

    principal: Principal
    vouched_by: str  # EDGE or DELEGATED


def from_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> Asserted | None:
    """The principal the headers assert, None when they assert none.

    A token without a tenant claim, or with one that is no tenant name, is
    UNAUTHENTICATED: the edge verified who signed it, but it does not say whose
    data the caller may touch, and guessing (the default tenant) would hand it
    someone else's.
    """
    values: dict[str, str] = {}
    for key, value in metadata:
        if key in HEADERS and key not in values:
            values[key] = value.decode() if isinstance(value, bytes) else value
    if not values:
        return None
    vouched_by = values.get(PRINCIPAL_HEADER, EDGE)
    if vouched_by not in (EDGE, DELEGATED):
        raise PrincipalError(
            grpc.StatusCode.UNAUTHENTICATED,
            f"{PRINCIPAL_HEADER} must be {EDGE!r} or {DELEGATED!r}, not {vouched_by[:40]!r}",
        )
    tenant = values.get(TENANT_HEADER, "")
    if not tenant:
        raise PrincipalError(
            grpc.StatusCode.UNAUTHENTICATED,
            "the token names no tenant: it needs a 'tenant' claim",
        )
    if not TENANT_PATTERN.fullmatch(tenant):
        raise PrincipalError(
            grpc.StatusCode.UNAUTHENTICATED,
            f"the token's tenant claim {tenant[:70]!r} is not a tenant name "
            "(1-64 letters, digits and ._-, starting with a letter or digit)",
        )
    if tenant == DEFAULT_TENANT:
        # The mesh's own tenant (its housekeeping, the operator's commands): a token
        # naming it would read everything they made.
        raise PrincipalError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"tenant {DEFAULT_TENANT!r} is the mesh's own: a token must name another tenant",
        )
    scope_text = values.get(SCOPE_HEADER, "")[:MAX_SCOPE_HEADER]
    return Asserted(
        Principal(
            tenant=tenant,
            subject=values.get(SUBJECT_HEADER, "")[:256],
            scopes=frozenset(scope_text.split()),
        ),
        vouched_by,
    )


def refusal(
    asserted: Asserted | None,
    *,
    method: str,
    peer_identity: str | None,
    mtls: bool,
    asserters: Collection[str],
    scopes: Mapping[str, str],
) -> tuple[grpc.StatusCode, str] | None:
    """Why this call may not run as it asserts, or None when it may."""
    if asserted is None:
        return None
    if mtls and peer_identity not in asserters:
        return (
            grpc.StatusCode.PERMISSION_DENIED,
            f"identity {peer_identity!r} may not act for a principal",
        )
    if asserted.vouched_by == DELEGATED:
        return None  # authorized where it entered the mesh; the caller table covers the hop
    required = scopes.get(method)
    if required is None:
        return (grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to tokens")
    if not asserted.principal.allows(required):
        return (
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method.rsplit('/', 1)[-1]} needs the scope {required!r}; the token grants "
            + (" ".join(sorted(asserted.principal.scopes or ())) or "none"),
        )
    return None
