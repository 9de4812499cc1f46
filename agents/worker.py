"""A worker process: `python -m agentplex.agents.worker --agent NAME`.

Runs the agent's AgentRunner against its queue. It serves no RPCs of its own,
only health (SERVING while Redis, memory and the registry answer) and
metrics, so orchestrators can probe and scrape it like any other part.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from pathlib import Path

from agentplex.agents.app import build_parts
from agentplex.agents.catalog import CATALOG, AgentSpec
from agentplex.agents.llm.base import LLMProvider
from agentplex.runtime import loop as event_loop
from agentplex.runtime.server import ServiceHost, stop_on_signals, write_ready_file
from agentplex.runtime.settings import Settings
from agentplex.runtime.telemetry import configure_logging, configure_tracing
from agentplex.tasks.worker import Worker


def default_consumer_name(agent: str) -> str:
    return f"{agent}-{socket.gethostname()}-{os.getpid()}"


def build_worker(
    spec: AgentSpec,
    settings: Settings,
    *,
    consumer: str | None = None,
    metrics_port: int | None = 0,
    llm: LLMProvider | None = None,
) -> tuple[Worker, ServiceHost]:
    parts = build_parts(spec, settings, llm=llm)
    worker = Worker(
        store=parts.tasks,
        runner=parts.runner,
        consumer=consumer or default_consumer_name(spec.name),
        lease_seconds=settings.task_lease_seconds,
        max_attempts=settings.task_max_attempts,
        concurrency=settings.worker_concurrency,
        grace_seconds=settings.grace_seconds,
        task_timeout_seconds=settings.default_task_timeout_seconds,
        event_linger_seconds=settings.task_event_linger_seconds,
    )
    host = ServiceHost.for_settings(
        settings,
        name=f"{spec.name}-worker",
        register=lambda server: [],
        port=0,
        metrics_port=metrics_port,
        dependency_checks=parts.dependency_checks,
        on_stop=[parts.close],
    )
    return worker, host


async def serve(worker: Worker, host: ServiceHost, ready_file: Path | None) -> None:
    """Run until SIGTERM/SIGINT: then drain the worker, then stop the host."""
    endpoint = await host.start()
    if ready_file is not None:
        write_ready_file(ready_file, endpoint)
    stop = asyncio.Event()
    stop_on_signals(stop)
    try:
        await worker.run(stop)
    finally:
        await host.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agentplex.agents.worker")
    parser.add_argument("--agent", required=True, choices=sorted(CATALOG), help="which agent")
    parser.add_argument("--name", help="consumer name (default: agent-host-pid)")
    parser.add_argument("--port", type=int, default=0, help="ignored; workers serve no RPCs")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0 = any)")
    parser.add_argument("--ready-file", type=Path, help="write the health address here once up")
    args = parser.parse_args(argv)
    settings = Settings()
    name = f"{args.agent}-worker"
    configure_logging(name, settings.log_level)
    configure_tracing(name, settings.trace_exporter)

    async def run() -> None:
        worker, host = build_worker(
            CATALOG[args.agent], settings, consumer=args.name, metrics_port=args.metrics_port
        )
        await serve(worker, host, args.ready_file)

    event_loop.run(run())


if __name__ == "__main__":
    main()
