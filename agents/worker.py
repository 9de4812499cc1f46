"""A worker process: `python -m agentplex.agents.worker --agent NAME [--agents FILE]`.

Runs the agent's AgentRunner against its queue. It serves no RPCs of its own,
only health (SERVING while Redis, memory and the registry answer) and
metrics, so orchestrators can probe and scrape it like any other part.

On SIGTERM, health turns NOT_SERVING first; then the worker drains (stops
claiming, lets running tasks finish within the grace period, hands the rest
back) while the host waits out its drain delay and stops listening; the
worker's connections close last, once the drain is over.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field

from agentplex.agents.app import (
    add_agent_arguments,
    build_parts,
    require_agent_model,
    spec_from_args,
)
from agentplex.agents.catalog import AgentSpec
from agentplex.agents.llm.base import LLMProvider
from agentplex.runtime.process import Endpoint, run_process
from agentplex.runtime.server import ServiceHost
from agentplex.runtime.settings import Settings
from agentplex.tasks.metrics import QueueGauges
from agentplex.tasks.worker import Worker

log = logging.getLogger(__name__)


def default_consumer_name(agent: str) -> str:
    return f"{agent}-{socket.gethostname()}-{os.getpid()}"


def build_worker(
    spec: AgentSpec,
    settings: Settings,
    *,
    consumer: str | None = None,
    port: int = 0,
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
        reconcile_seconds=settings.task_reconcile_seconds,
    )
    host = ServiceHost.for_settings(
        settings,
        name=f"{spec.name}-worker",
        register=lambda server: [],
        port=port,
        metrics_port=metrics_port,
        dependency_checks=parts.dependency_checks,
        # The host may stop while the worker still drains (`WorkerProcess`):
        # the connections the worker's tasks use close only after the drain.
        on_stop=[worker.stopped, parts.close],
    )
    return worker, host


@dataclass
class WorkerProcess:
    """A worker with its health/metrics host, as one process part (runtime/process.py).

    On a stop signal the host announces it (health NOT_SERVING) and then the
    worker drains, while health still answers: so whoever watches the health
    knows the worker is going before it hands anything back. The drain delay
    counts from the announcement, so it overlaps the drain instead of adding
    to it; the host's stop then closes the listener, and its last steps wait
    for the drain before closing the worker's connections.
    """

    worker: Worker
    host: ServiceHost
    # Refreshes the agent's queue gauges while the worker runs (None: no gauges).
    gauges: QueueGauges | None = None
    _endpoint: Endpoint | None = field(default=None, init=False)

    async def start(self) -> Endpoint:
        self._endpoint = await self.host.start()
        return self._endpoint

    async def run(self, stop: asyncio.Event) -> None:
        drain = asyncio.Event()
        working = asyncio.create_task(self.worker.run(drain), name="worker")
        stopped = asyncio.create_task(stop.wait())
        gauged = asyncio.Event()
        gauging = (
            asyncio.create_task(self.gauges.run(gauged), name="queue-gauges")
            if self.gauges is not None
            else None
        )
        try:
            await asyncio.wait({working, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not working.done():
                # NOT_SERVING first, so whoever watches the health knows the worker
                # is going before it hands anything back; health keeps answering
                # through the drain, and the host's stop (after `run`) closes it.
                await self.host.announce_stop()
                drain.set()
                await working
        finally:
            stopped.cancel()
            drain.set()  # however this ends, the worker drains (the host's stop waits for it)
            gauged.set()
            if gauging is not None:
                await asyncio.wait({gauging}, timeout=1.0)
                gauging.cancel()
        await working  # a worker that ended by itself failed: its error is the process's

    async def stop(self) -> None:
        await self.host.stop()


def main(argv: list[str] | None = None) -> None:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_agent_arguments(parser)
        parser.add_argument("--name", help="consumer name (default: agent-host-pid)")

    async def build(settings: Settings, args: argparse.Namespace) -> WorkerProcess:
        spec = spec_from_args(args)
        require_agent_model(spec.settings(settings))
        worker, host = build_worker(
            spec,
            settings,
            consumer=args.name,
            port=args.port,
            metrics_port=args.metrics_port,
        )
        gauges = QueueGauges(worker.store, settings.task_queue_gauge_seconds)
        return WorkerProcess(worker, host, gauges=gauges)

    run_process(
        "python -m agentplex.agents.worker",
        build,
        name=lambda args: f"{args.agent}-worker",
        add_arguments=add_arguments,
        port_help="port of the worker's health endpoint (0 = any free port); it serves no RPCs",
        argv=argv,
    )


if __name__ == "__main__":
    main()
