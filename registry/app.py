"""Assembles the Tool Registry process: Redis, ledger, backend router, servicer, host.

The registry runs no tools itself and knows no agent in advance: backends
publish their contracts (with their address) when they start, agents publish
their `agent.<name>` tool and their default access list, and the registry
routes each invocation there.
"""

from __future__ import annotations

import argparse

import grpc

from agentplex.contract.access import ACCESS
from agentplex.registry.backends import BackendRouter
from agentplex.registry.ledger import IdempotencyLedger
from agentplex.registry.service import ToolRegistry
from agentplex.registry.servicer import ToolRegistryServicer
from agentplex.registry.store import RegistryStore
from agentplex.runtime import redis_client
from agentplex.runtime.clients import Keepalive
from agentplex.runtime.process import run_process
from agentplex.runtime.server import ServiceHost
from agentplex.runtime.settings import Settings
from agentplex.runtime.tls import load_mesh_tls
from agentplex.v1 import tool_registry_service_pb2, tool_registry_service_pb2_grpc

SERVICE_NAME = tool_registry_service_pb2.DESCRIPTOR.services_by_name[
    "ToolRegistryService"
].full_name


async def build_host(
    settings: Settings, *, port: int = 0, metrics_port: int | None = 0
) -> ServiceHost:
    """Build the registry; Redis must answer."""
    redis = redis_client.connect(settings.redis_url)
    router = BackendRouter(
        tool_timeout_seconds=settings.tool_timeout_seconds,
        breaker_failure_threshold=settings.breaker_failure_threshold,
        breaker_reset_seconds=settings.breaker_reset_seconds,
        keepalive=Keepalive.from_settings(settings),
        tls=await load_mesh_tls(settings),
    )
    registry = ToolRegistry(
        store=RegistryStore(redis, key_prefix=settings.key_prefix),
        ledger=IdempotencyLedger(
            redis,
            key_prefix=settings.key_prefix,
            ttl_seconds=settings.idempotency_ttl_seconds,
            pending_ttl_seconds=settings.tool_timeout_seconds * 2,
        ),
        router=router,
        max_delegation_depth=settings.max_delegation_depth,
    )

    def register(server: grpc.aio.Server) -> list[str]:
        tool_registry_service_pb2_grpc.add_ToolRegistryServiceServicer_to_server(
            ToolRegistryServicer(registry, default_timeout_seconds=settings.tool_timeout_seconds),
            server,
        )
        return [SERVICE_NAME]

    async def close() -> None:
        await router.close()
        await redis.aclose()

    return ServiceHost.for_settings(
        settings,
        name="registry",
        register=register,
        port=port,
        metrics_port=metrics_port,
        dependency_checks=[redis_client.answers(redis)],
        on_stop=[close],
        access=ACCESS,
    )


def main(argv: list[str] | None = None) -> None:
    async def build(settings: Settings, args: argparse.Namespace) -> ServiceHost:
        return await build_host(settings, port=args.port, metrics_port=args.metrics_port)

    run_process("python -m agentplex.registry", build, name="registry", argv=argv)
