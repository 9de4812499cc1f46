"""Which scope a token needs for each gRPC method: function-level authorization.

A call from the edge (the gateway verified a bearer token) runs only if the
token's `scope` claim grants the method's scope here; anything else is
PERMISSION_DENIED naming the scope (runtime/peer_auth.py). A method missing
from the table is open to no token at all, so a new RPC is closed until it is
given a scope here. Calls one service makes for another carry the principal for
tenancy only: the caller table authorizes those hops, not the user's scopes.

Ordinary tokens get `DEFAULT_SCOPES`; the `*:admin` scopes are for operators.
"""

from __future__ import annotations

from collections.abc import Mapping

from agentplex.contract import callers

TASKS_RUN = "tasks:run"
TASKS_READ = "tasks:read"
TASKS_CANCEL = "tasks:cancel"
AGENTS_READ = "agents:read"
MEMORY_READ = "memory:read"
MEMORY_WRITE = "memory:write"
MEMORY_ADMIN = "memory:admin"
TOOLS_READ = "tools:read"
TOOLS_INVOKE = "tools:invoke"
TOOLS_ADMIN = "tools:admin"
MESH_ADMIN = "mesh:admin"

# What `agentplex token` grants unless told otherwise: run, follow and cancel the
# tenant's tasks, read agent cards and tool contracts. No administration.
DEFAULT_SCOPES = (TASKS_RUN, TASKS_READ, TASKS_CANCEL, AGENTS_READ, TOOLS_READ)
ADMIN_SCOPES = (MEMORY_ADMIN, TOOLS_ADMIN, MESH_ADMIN)
ALL_SCOPES = (
    TASKS_RUN,
    TASKS_READ,
    TASKS_CANCEL,
    AGENTS_READ,
    MEMORY_READ,
    MEMORY_WRITE,
    MEMORY_ADMIN,
    TOOLS_READ,
    TOOLS_INVOKE,
    TOOLS_ADMIN,
    MESH_ADMIN,
)


def _methods(service: str, scopes: Mapping[str, str]) -> dict[str, str]:
    return {f"/{service}/{method}": scope for method, scope in scopes.items()}


SCOPES: Mapping[str, str] = {
    **_methods(
        callers.AGENT_SERVICE,
        {
            "RunTask": TASKS_RUN,
            "StreamSteps": TASKS_RUN,
            "SubmitTask": TASKS_RUN,
            "GetTask": TASKS_READ,
            "WatchTask": TASKS_READ,
            "CancelTask": TASKS_CANCEL,
            "GetAgentCard": AGENTS_READ,
        },
    ),
    **_methods(
        callers.MEMORY_SERVICE,
        {
            "LoadContext": MEMORY_READ,
            "ReadMessages": MEMORY_READ,
            "AppendMessages": MEMORY_WRITE,
            "StoreSummary": MEMORY_WRITE,
            "ClearSession": MEMORY_ADMIN,
        },
    ),
    **_methods(
        callers.TOOL_REGISTRY_SERVICE,
        {
            "ListTools": TOOLS_READ,
            "GetTool": TOOLS_READ,
            "InvokeTool": TOOLS_INVOKE,
            "InvokeToolStream": TOOLS_INVOKE,
            "RegisterTool": TOOLS_ADMIN,
            "SetToolState": TOOLS_ADMIN,
            "SetAgentTools": TOOLS_ADMIN,
            "WithdrawEndpoint": TOOLS_ADMIN,
        },
    ),
    **_methods(callers.TOOL_EXECUTOR_SERVICE, {"ExecuteTool": TOOLS_INVOKE}),
    **_methods(callers.MESH_CONTROL_SERVICE, {"ListParts": MESH_ADMIN, "RestartPart": MESH_ADMIN}),
}
