"""Assembles the Tool Registry process: Redis, ledger, backend router, servicer, host.

The registry runs no tools itself: backends publish their contracts (with
their address) when they start, and the registry routes each invocation
there. At start-up it only seeds the catalog agents' access lists.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc

from agentplex.agents.catalog import CATALOG
from agentplex.registry.backends import BackendRouter
from agentplex.registry.ledger import IdempotencyLedger
from agentplex.registry.service import ToolRegistry
from agentplex.registry.servicer import ToolRegistryServicer
from agentplex.registry.store import RegistryStore
from agentplex.runtime import redis_client
from agentplex.runtime.server import ServiceHost
from agentplex.runtime.settings import Settings
from agentplex.runtime.telemetry import configure_logging, configure_tracing
from agentplex.v1 import tool_registry_service_pb2, tool_registry_service_pb2_grpc

SERVICE_NAME = tool_registry_service_pb2.DESCRIPTOR.services_by_name[
    "ToolRegistryService"
].full_name


async def build_host(
    settings: Settings, *, port: int = 0, metrics_port: int | None = 0
) -> ServiceHost:
    """Build the registry and seed access lists; Redis must answer."""
    redis = redis_client.connect(settings.redis_url)
    router = BackendRouter(tool_timeout_seconds=settings.tool_timeout_seconds)
    registry = ToolRegistry(
        store=RegistryStore(redis, key_prefix=settings.key_prefix),
        ledger=IdempotencyLedger(
            redis,
            key_prefix=settings.key_prefix,
            ttl_seconds=settings.idempotency_ttl_seconds,
            pending_ttl_seconds=settings.tool_timeout_seconds * 2,
        ),
        router=router,
    )
    await registry.seed_access({spec.name: list(spec.tools) for spec in CATALOG.values()})

    def register(server: grpc.aio.Server) -> list[str]:
        tool_registry_service_pb2_grpc.add_ToolRegistryServiceServicer_to_server(
            ToolRegistryServicer(registry, default_timeout_seconds=settings.tool_timeout_seconds),
            server,
        )
        return [SERVICE_NAME]

    async def redis_answers() -> None:
        await redis.ping()

    async def close() -> None:
        await router.close()
        await redis.aclose()

    return ServiceHost(
        name="registry",
        register=register,
        host=settings.host,
        port=port,
        metrics_port=metrics_port,
        dependency_checks=[redis_answers],
        health_interval_seconds=settings.health_interval_seconds,
        grace_seconds=settings.grace_seconds,
        on_stop=[close],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agentplex.registry")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0 = any free port)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0 = any)")
    parser.add_argument("--ready-file", type=Path, help="write the bound address here once serving")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging("registry", settings.log_level)
    configure_tracing("registry", settings.trace_exporter)

    async def run() -> None:
        host = await build_host(settings, port=args.port, metrics_port=args.metrics_port)
        await host.serve_until_signalled(args.ready_file)

    asyncio.run(run())
