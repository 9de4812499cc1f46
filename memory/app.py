"""Assembles the Memory service process: Redis connection, store, servicer, host."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc

from agentplex.memory.servicer import MemoryServicer
from agentplex.memory.store import MemoryStore
from agentplex.runtime import redis_client
from agentplex.runtime.server import ServiceHost
from agentplex.runtime.settings import Settings
from agentplex.runtime.telemetry import configure_logging, configure_tracing
from agentplex.v1 import memory_service_pb2, memory_service_pb2_grpc

SERVICE_NAME = memory_service_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name


def build_host(settings: Settings, *, port: int = 0, metrics_port: int | None = 0) -> ServiceHost:
    redis = redis_client.connect(settings.redis_url)
    store = MemoryStore(
        redis,
        key_prefix=settings.key_prefix,
        ttl_seconds=settings.memory_ttl_seconds,
        max_messages=settings.memory_max_messages,
        default_context_tokens=settings.memory_default_context_tokens,
    )

    def register(server: grpc.aio.Server) -> list[str]:
        memory_service_pb2_grpc.add_MemoryServiceServicer_to_server(MemoryServicer(store), server)
        return [SERVICE_NAME]

    async def redis_answers() -> None:
        await redis.ping()

    return ServiceHost(
        name="memory",
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
    parser = argparse.ArgumentParser(prog="python -m agentplex.memory")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0 = any free port)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0 = any)")
    parser.add_argument("--ready-file", type=Path, help="write the bound address here once serving")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging("memory", settings.log_level)
    configure_tracing("memory", settings.trace_exporter)

    async def run() -> None:
        # gRPC channels and Redis clients bind to the running loop: build inside it.
        host = build_host(settings, port=args.port, metrics_port=args.metrics_port)
        await host.serve_until_signalled(args.ready_file)

    asyncio.run(run())
