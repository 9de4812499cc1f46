"""Assembles the Tool Registry process: Redis, built-in tool backends, servicer, host."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc

from agentplex.agents.catalog import CATALOG
from agentplex.registry.ledger import IdempotencyLedger
from agentplex.registry.service import ToolRegistry
from agentplex.registry.servicer import ToolRegistryServicer
from agentplex.registry.store import RegistryStore
from agentplex.runtime import redis_client
from agentplex.runtime.server import ServiceHost
from agentplex.runtime.settings import Settings
from agentplex.runtime.telemetry import configure_logging, configure_tracing
from agentplex.tools.base import Tool
from agentplex.tools.calculator import Calculator
from agentplex.tools.docs_search import DocsSearch
from agentplex.tools.notes import NotesRead, NotesWrite
from agentplex.v1 import tool_registry_service_pb2, tool_registry_service_pb2_grpc

SERVICE_NAME = tool_registry_service_pb2.DESCRIPTOR.services_by_name[
    "ToolRegistryService"
].full_name


async def builtin_backends(docs_dir: Path) -> list[Tool]:
    return [Calculator(), NotesWrite(), NotesRead(), await DocsSearch.from_directory(docs_dir)]


async def build_host(
    settings: Settings, *, port: int = 0, metrics_port: int | None = 0
) -> ServiceHost:
    """Build the registry and publish built-in contracts; Redis must answer."""
    redis = redis_client.connect(settings.redis_url)
    backends = await builtin_backends(settings.docs_dir)
    registry = ToolRegistry(
        store=RegistryStore(redis, key_prefix=settings.key_prefix),
        ledger=IdempotencyLedger(
            redis,
            key_prefix=settings.key_prefix,
            pending_ttl_seconds=settings.tool_timeout_seconds * 2,
        ),
        backends={backend.definition.name: backend for backend in backends},
        redis=redis,
        key_prefix=settings.key_prefix,
        tool_timeout_seconds=settings.tool_timeout_seconds,
    )
    await registry.seed(
        [backend.definition for backend in backends],
        {spec.name: list(spec.tools) for spec in CATALOG.values()},
    )

    def register(server: grpc.aio.Server) -> list[str]:
        tool_registry_service_pb2_grpc.add_ToolRegistryServiceServicer_to_server(
            ToolRegistryServicer(registry, default_timeout_seconds=settings.tool_timeout_seconds),
            server,
        )
        return [SERVICE_NAME]

    async def redis_answers() -> None:
        await redis.ping()

    return ServiceHost(
        name="registry",
        register=register,
        host=settings.host,
        port=port,
        metrics_port=metrics_port,
        dependency_checks=[redis_answers],
        health_interval_seconds=settings.health_interval_seconds,
        grace_seconds=settings.grace_seconds,
        on_stop=[redis.aclose],
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
