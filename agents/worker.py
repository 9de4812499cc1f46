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
from dataclasses import dataclass

from agentplex.agents.app import build_parts, require_agent_model
from agentplex.agents.catalog import CATALOG, AgentSpec
from agentplex.agents.llm.base import LLMProvider
from agentplex.runtime.process import Endpoint, run_process
from agentplex.runtime.server import ServiceHost
from agentplex.runtime.settings import Settings
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


@dataclass
class WorkerProcess:
    """A worker with its health/metrics host, as one process part (runtime/process.py).

    On a stop signal the worker drains first (running tasks finish or are
    handed back), then the host stops.
    """

    worker: Worker
    host: ServiceHost

    async def start(self) -> Endpoint:
        return await self.host.start()

    async def run(self, stop: asyncio.Event) -> None:
        await self.worker.run(stop)

    async def stop(self) -> None:
        await self.host.stop()


def main(argv: list[str] | None = None) -> None:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--agent", required=True, choices=sorted(CATALOG), help="which agent")
        parser.add_argument("--name", help="consumer name (default: agent-host-pid)")

    async def build(settings: Settings, args: argparse.Namespace) -> WorkerProcess:
        require_agent_model(settings)
        worker, host = build_worker(
            CATALOG[args.agent], settings, consumer=args.name, metrics_port=args.metrics_port
        )
        return WorkerProcess(worker, host)

    run_process(
        "python -m agentplex.agents.worker",
        build,
        name=lambda args: f"{args.agent}-worker",
        add_arguments=add_arguments,
        port_help="ignored; workers serve no RPCs",
        argv=argv,
    )


if __name__ == "__main__":
    main()
