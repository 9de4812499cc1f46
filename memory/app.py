"""Assembles the Memory service process: Redis connection, store, servicer, host."""

from __future__ import annotations

import argparse

import grpc

from agentplex.contract.access import ACCESS
from agentplex.memory.servicer import MemoryServicer
from agentplex.memory.store import MemoryStore
from agentplex.runtime import redis_client
from agentplex.runtime.process import run_process
from agentplex.runtime.server import ServiceHost
from agentplex.runtime.settings import Settings
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

    return ServiceHost.for_settings(
        settings,
        name="memory",
        register=register,
        port=port,
        metrics_port=metrics_port,
        dependency_checks=[redis_client.answers(redis)],
        on_stop=[redis.aclose],
        access=ACCESS,
    )


def main(argv: list[str] | None = None) -> None:
    async def build(settings: Settings, args: argparse.Namespace) -> ServiceHost:
        return build_host(settings, port=args.port, metrics_port=args.metrics_port)

    run_process("python -m agentplex.memory", build, name="memory", argv=argv)
