"""The catalog of `google.rpc.ErrorInfo` reasons and structured tool-error codes.

A reason is part of the protocol: clients branch on it (retry, re-read,
tell the model), so it must mean the same in every service and never be
renamed. Every reason a service raises is a member here; a new one is added
here first, with what it means. The status code that carries it comes from
the error class (`runtime/errors.py`), not from the reason.

`Reason` is a `StrEnum`: a member is its own string on the wire.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # --- tools and the registry ---------------------------------------------------
    TOOL_NOT_FOUND = "TOOL_NOT_FOUND"
    """No published version of the tool matches (NOT_FOUND)."""
    TOOL_RETIRED = "TOOL_RETIRED"
    """The matching version is retired; the message names its replacement (NOT_FOUND)."""
    TOOL_NOT_SERVED = "TOOL_NOT_SERVED"
    """A tool backend was asked for a tool it does not serve (NOT_FOUND)."""
    TOOL_NOT_ALLOWED = "TOOL_NOT_ALLOWED"
    """The calling agent's access list does not grant the tool (PERMISSION_DENIED)."""
    TOOL_VERSION_NOT_ALLOWED = "TOOL_VERSION_NOT_ALLOWED"
    """The agent is pinned to another major version (PERMISSION_DENIED)."""
    AGENT_NOT_FOUND = "AGENT_NOT_FOUND"
    """The registry has no access list for the agent (NOT_FOUND)."""
    VERSION_EXISTS = "VERSION_EXISTS"
    """That version is published with a different contract; versions are immutable."""
    VERSION_NOT_NEWER = "VERSION_NOT_NEWER"
    """A new version must be the newest of its major (FAILED_PRECONDITION)."""
    BREAKING_CHANGE = "BREAKING_CHANGE"
    """A minor or patch release would break callers of its major (FAILED_PRECONDITION)."""
    NO_BACKEND = "NO_BACKEND"
    """The version is published but no backend serves it now (FAILED_PRECONDITION)."""
    IDEMPOTENCY_KEY_REQUIRED = "IDEMPOTENCY_KEY_REQUIRED"
    """A side-effecting tool was invoked without an idempotency key (INVALID_ARGUMENT)."""
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    """The key was used before with other arguments (FAILED_PRECONDITION)."""
    POLICY_DENIED = "POLICY_DENIED"
    """An argument breaks one of the tool's declared argument policies (a URL to a
    host that is not public, a path leaving the tool's root, …); the message names
    the argument and the rule. Refused before any backend runs (INVALID_ARGUMENT);
    a backend enforcing the same policy answers it as a tool error code."""
    APPROVAL_REQUIRED = "APPROVAL_REQUIRED"
    """The tool needs a person's approval for every call, and approvals are not
    available yet: every call is refused (PERMISSION_DENIED)."""
    # --- delegation ---------------------------------------------------------------
    DELEGATION_CYCLE = "DELEGATION_CYCLE"
    """The target agent already works on this task further up (FAILED_PRECONDITION)."""
    DELEGATION_DEPTH_EXCEEDED = "DELEGATION_DEPTH_EXCEEDED"
    """The sub-task would be deeper than the mesh allows (FAILED_PRECONDITION)."""
    # --- tasks ----------------------------------------------------------------------
    TASK_NOT_FOUND = "TASK_NOT_FOUND"
    """Never submitted to this agent, or its record expired (NOT_FOUND)."""
    TASK_ID_REUSED = "TASK_ID_REUSED"
    """The task id was submitted before with another request (FAILED_PRECONDITION)."""
    QUEUE_FULL = "QUEUE_FULL"
    """The agent's queue holds its limit of unfinished tasks (RESOURCE_EXHAUSTED)."""
    QUOTA_EXHAUSTED = "QUOTA_EXHAUSTED"
    """The tenant has used its token quota for the current period; no model call is
    made until the period ends (RESOURCE_EXHAUSTED). The message names the tenant,
    the quota, the period and when it resets; ErrorInfo.metadata carries `tenant`,
    `quota_tokens`, `used_tokens`, `period_seconds`, `resets_at` (RFC 3339, UTC) and
    `retry_after_seconds`."""
    EVENTS_EXPIRED = "EVENTS_EXPIRED"
    """The events asked for are past retention (OUT_OF_RANGE)."""
    # --- memory and models ------------------------------------------------------------
    SUMMARY_CONFLICT = "SUMMARY_CONFLICT"
    """Another summary of the session won the race: reload and retry (ABORTED)."""
    LLM_FAILED = "LLM_FAILED"
    """The model provider failed permanently or after its retries."""
    REDIS_UNAVAILABLE = "REDIS_UNAVAILABLE"
    """Redis could not be reached (UNAVAILABLE)."""
    BACKEND_DEPENDENCY_UNAVAILABLE = "BACKEND_DEPENDENCY_UNAVAILABLE"
    """A tool backend could not run a call because a dependency of its own (its
    Redis) is unavailable. The call took no effect that running it again under
    the same idempotency key would duplicate, so the registry may give the key
    back for a retry (UNAVAILABLE)."""
    TOOL_UNAVAILABLE = "TOOL_UNAVAILABLE"
    """A task's tool call could not be run because the mesh's own dependencies
    (Redis, the registry, the tool's backend) are unavailable: an outage, not
    the tool's answer. The task's attempt fails so that it can be run again
    (UNAVAILABLE); a queued task is retried by its workers."""
    INTERNAL = "INTERNAL"
    """A bug; the server log has the details (INTERNAL)."""


class ToolErrorCode(StrEnum):
    """`ToolError.code` values: what a calling model is told when a tool call fails.

    These never fail the caller's task; the model reads them and routes around.
    A refused call (any `Reason` above) reaches the model with that reason as
    its code. The one exception is `MESH_UNAVAILABLE`: not the tool's answer but
    the mesh's failure to get one, which fails the caller's attempt instead.
    """

    EXECUTION_FAILED = "EXECUTION_FAILED"
    """The tool ran and could not do what was asked (e.g. division by zero)."""
    INVALID_RESULT = "INVALID_RESULT"
    """The backend's result did not match the tool's output schema."""
    OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"
    """A side-effecting call was interrupted; it will not run again under its key."""
    NO_SESSION = "NO_SESSION"
    """A session-scoped tool was called without a session."""
    TIMEOUT = "TIMEOUT"
    """The tool took longer than its time limit. It says nothing of the tool's
    result, so for a tool safe to repeat the key is not kept (a retry runs it
    again); a side-effecting tool keeps it, since it may have taken effect."""
    UNAVAILABLE = "UNAVAILABLE"
    """No backend answered. Kept for callers of earlier registries, which sent it for
    any unavailable backend; the registry now says `MESH_UNAVAILABLE` when the call
    took no effect and `OUTCOME_UNKNOWN` when a side-effecting call may have."""
    MESH_UNAVAILABLE = "MESH_UNAVAILABLE"
    """The mesh could not run the tool: its backend is down or unreachable, a
    dependency of the backend (its Redis) is, or the downstream agent's circuit is
    open because it was unreachable. The call took no effect that running it again
    under its idempotency key would duplicate, so the registry does not keep this
    outcome under the key, and a calling agent does not show it to its model: it
    fails the task's attempt with UNAVAILABLE (`Reason.TOOL_UNAVAILABLE`), to be
    run again once the mesh has recovered."""
    CIRCUIT_OPEN = "CIRCUIT_OPEN"
    """The downstream agent kept failing and is not called during its cool-down."""
    CANCELLED = "CANCELLED"
    """The delegated sub-task was cancelled."""
    AGENT_FAILED = "AGENT_FAILED"
    """The delegated sub-task failed."""
    TOKEN_BUDGET_EXCEEDED = "TOKEN_BUDGET_EXCEEDED"
    """Too little of the caller's budget is left for a sub-task."""
