"""Domain errors and the one table that maps them to gRPC status codes.

Service code raises these plain exceptions and never touches gRPC status
codes; `runtime.interceptors` translates them at the edge, with a
`google.rpc.ErrorInfo` detail that clients can branch on (`reason`), with the
error's `metadata` (facts a client acts on, such as when a quota resets).
`from_rpc_error` maps a received status back into the same exceptions, so a
failure crosses any number of hops with its meaning intact.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
import redis.exceptions
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "agentplex.dev"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_STREAM_RESET = "RST_STREAM"


class AgentplexError(Exception):
    """Base of every error that has a defined gRPC status."""

    reason = "ERROR"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        # ErrorInfo.metadata: what a client needs to act without parsing the message
        # (a quota's `resets_at`); part of the protocol like the reason.
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(AgentplexError):
    """The request itself is malformed, whatever the system's state."""

    reason = "INVALID_ARGUMENT"


class NotFound(AgentplexError):
    """A named entity (tool, agent, session) does not exist."""

    reason = "NOT_FOUND"


class FailedPrecondition(AgentplexError):
    """The request is well-formed but conflicts with the current state."""

    reason = "FAILED_PRECONDITION"


class PermissionDenied(AgentplexError):
    """The caller is known but not allowed to do this."""

    reason = "PERMISSION_DENIED"


class ResourceExhausted(AgentplexError):
    """A quota, budget or queue limit was hit."""

    reason = "RESOURCE_EXHAUSTED"


class Unavailable(AgentplexError):
    """A dependency could not be reached; retrying later may succeed."""

    reason = "UNAVAILABLE"


class OutOfRange(AgentplexError):
    """Asked for something past a valid range, e.g. events beyond retention."""

    reason = "OUT_OF_RANGE"


class Aborted(AgentplexError):
    """A read-modify-write lost a race (optimistic concurrency): read again, then retry."""

    reason = "ABORTED"


class DeadlineExceeded(AgentplexError):
    """The caller's deadline passed before the work could finish."""

    reason = "DEADLINE_EXCEEDED"


# The one table. Order matters only for subclasses, which come first.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (Aborted, grpc.StatusCode.ABORTED),
    # A Redis that cannot be reached is a dependency outage, not a bug.
    (redis.exceptions.ConnectionError, grpc.StatusCode.UNAVAILABLE),
    (redis.exceptions.TimeoutError, grpc.StatusCode.UNAVAILABLE),
)

_EXCEPTION_FOR_CODE: dict[grpc.StatusCode, type[AgentplexError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.ABORTED: Aborted,
}


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """Status code for an exception; INTERNAL for anything not in the table."""
    for exc_type, code in STATUS_TABLE:
        if isinstance(exc, exc_type):
            return code
    return grpc.StatusCode.INTERNAL


def to_status(exc: BaseException) -> status_pb2.Status:
    """A `google.rpc.Status` carrying the message and an ErrorInfo (reason, metadata)."""
    code = status_code_for(exc)
    metadata: dict[str, str] = {}
    if isinstance(exc, AgentplexError):
        message, reason, metadata = exc.message, exc.reason, exc.metadata
    elif code is grpc.StatusCode.UNAVAILABLE:
        message, reason = f"Redis is unavailable: {exc}", "REDIS_UNAVAILABLE"
    else:
        message, reason = "internal error; the server log has the details", "INTERNAL"
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))
    return status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])


def from_rpc_error(err: grpc.aio.AioRpcError | grpc.RpcError) -> AgentplexError:
    """Map a received gRPC error back into the domain exception it stands for."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    reason = None
    metadata: dict[str, str] = {}
    # Read the rich status from the trailer directly: grpc_status' helper only
    # accepts the sync API's grpc.Call, and AioRpcError is not one.
    trailers = err.trailing_metadata() if callable(getattr(err, "trailing_metadata", None)) else ()
    for key, value in trailers or ():  # type: ignore[misc]  # stubs: sync items aren't tuples
        if key == _STATUS_DETAILS_KEY:
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reason = info.reason
                    metadata = dict(info.metadata)
    if code == grpc.StatusCode.INTERNAL and reason is None and _STREAM_RESET in (details or ""):
        # A proxy (the gateway) that lost the upstream after the response began
        # can only reset the stream, which gRPC reports as INTERNAL; it means a
        # lost connection, and a caller may retry it like one.
        return Unavailable(f"the connection was lost mid-call ({details})")
    exc_type = _EXCEPTION_FOR_CODE.get(code, AgentplexError)
    return exc_type(details or code.name, reason=reason or code.name, metadata=metadata)
