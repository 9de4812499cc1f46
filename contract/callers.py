"""Who may call whom: the mesh identities allowed to call each gRPC service.

With mTLS on (runtime/tls.py), a server checks every call's peer identity —
the `spiffe://agentplex/<identity>` URI SAN of its verified client certificate —
against this table (runtime/peer_auth.py). A service missing here accepts no
caller; grpc.health.v1 and server reflection accept any mesh certificate (the
runtime allows those itself: probes and grpcurl are not services' callers).
"""

from __future__ import annotations

from collections.abc import Mapping

from agentplex.v1 import (
    agent_service_pb2,
    memory_service_pb2,
    mesh_control_service_pb2,
    tool_executor_service_pb2,
    tool_registry_service_pb2,
)

# The identities, one per kind of process (every replica of a part shares one).
MEMORY = "memory"
REGISTRY = "registry"
TOOLS = "tools"
AGENT = "agent"
WORKER = "worker"
GATEWAY_CONTROL_PLANE = "gateway-control-plane"
GATEWAY = "gateway"  # Envoy
CLI = "cli"

IDENTITIES = (MEMORY, REGISTRY, TOOLS, AGENT, WORKER, GATEWAY_CONTROL_PLANE, GATEWAY, CLI)

MEMORY_SERVICE = memory_service_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name
TOOL_REGISTRY_SERVICE = tool_registry_service_pb2.DESCRIPTOR.services_by_name[
    "ToolRegistryService"
].full_name
TOOL_EXECUTOR_SERVICE = tool_executor_service_pb2.DESCRIPTOR.services_by_name[
    "ToolExecutorService"
].full_name
AGENT_SERVICE = agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
MESH_CONTROL_SERVICE = mesh_control_service_pb2.DESCRIPTOR.services_by_name[
    "MeshControlService"
].full_name

CALLERS: Mapping[str, frozenset[str]] = {
    # Sessions are read and written by whoever runs a task.
    MEMORY_SERVICE: frozenset({AGENT, WORKER}),
    # Agents and workers list and invoke; tool backends publish; the control plane reads
    # the directory; Envoy routes the registry's public API; operators use the CLI.
    TOOL_REGISTRY_SERVICE: frozenset({AGENT, WORKER, TOOLS, GATEWAY_CONTROL_PLANE, GATEWAY, CLI}),
    # Only through the registry, which checks access, schemas and idempotency.
    TOOL_EXECUTOR_SERVICE: frozenset({REGISTRY}),
    # Callers through Envoy, sub-tasks through the registry, operators.
    AGENT_SERVICE: frozenset({GATEWAY, REGISTRY, CLI}),
    MESH_CONTROL_SERVICE: frozenset({CLI}),
}

# Who may state, in a call's headers, the principal it acts for (runtime/principal.py):
# Envoy for the token it verified; agents, workers and the registry for the task or
# call they are doing. Any other identity naming a principal is refused.
PRINCIPAL_ASSERTERS = frozenset({GATEWAY, AGENT, WORKER, REGISTRY})
