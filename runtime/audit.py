"""The audit trail: administrative actions and refused requests, as JSON lines.

One line per event on the `agentplex.audit` logger, through the process's
JSON log format (time, service, trace id), with `audit`, `action`, `resource`,
`outcome`, `reason` and the principal's `tenant`, `subject` and `scopes`. The
lines go wherever the logs go; with `audit_log_file` set they are also
appended to that file, and only they, so a collector can ship the trail
without the noise.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agentplex.runtime import principal as principals
from agentplex.runtime.telemetry import JsonFormatter

log = logging.getLogger("agentplex.audit")

ALLOWED = "allowed"
DENIED = "denied"


def record(
    action: str,
    resource: str,
    *,
    outcome: str,
    reason: str = "",
    principal: principals.Principal | None = None,
    peer: str | None = None,
) -> None:
    """One audit line. `action` is what was asked (e.g. a gRPC method), `resource`
    what it names (a tool, a task, a session), `reason` why it was refused."""
    acting = principal if principal is not None else principals.current()
    level = logging.WARNING if outcome == DENIED else logging.INFO
    log.log(
        level,
        "%s %s %s",
        outcome,
        action,
        resource,
        extra={
            "audit": True,
            "action": action,
            "resource": resource,
            "outcome": outcome,
            "reason": reason,
            "tenant": acting.tenant,
            "subject": acting.subject,
            "scopes": " ".join(sorted(acting.scopes)) if acting.scopes is not None else "*",
            "peer_identity": peer or "",
        },
    )


def write_to(path: Path, service: str) -> None:
    """Also append the audit lines, alone, to `path` (several processes may share it:
    each line is one small append)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(old)  # one trail per process: a second mesh in it moves it
        old.close()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(JsonFormatter(service))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
