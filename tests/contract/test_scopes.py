"""Every RPC has a scope: a new method is closed to tokens until it is given one."""

from __future__ import annotations

from agentplex.contract import callers, scopes


def test_every_method_of_every_service_has_a_scope() -> None:
    from agentplex.v1 import (
        agent_service_pb2,
        memory_service_pb2,
        mesh_control_service_pb2,
        tool_executor_service_pb2,
        tool_registry_service_pb2,
    )

    methods = {
        f"/{service.full_name}/{method.name}"
        for module in (
            agent_service_pb2,
            memory_service_pb2,
            mesh_control_service_pb2,
            tool_executor_service_pb2,
            tool_registry_service_pb2,
        )
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert set(scopes.SCOPES) == methods
    assert set(scopes.SCOPES.values()) == set(scopes.ALL_SCOPES)


def test_ordinary_tokens_administer_nothing() -> None:
    admin_methods = {m for m, scope in scopes.SCOPES.items() if scope in scopes.ADMIN_SCOPES}
    assert not set(scopes.DEFAULT_SCOPES) & set(scopes.ADMIN_SCOPES)
    for method in (
        "ToolRegistryService/RegisterTool",
        "ToolRegistryService/SetAgentTools",
        "ToolRegistryService/SetToolState",
        "MemoryService/ClearSession",
    ):
        assert f"/agentplex.v1.{method}" in admin_methods
    assert callers.GATEWAY in callers.PRINCIPAL_ASSERTERS
    assert callers.CLI not in callers.PRINCIPAL_ASSERTERS
