"""Gauges of an agent's queue: depth, the oldest unclaimed task's wait, dead letters.

Prometheus collects on its own thread, where the asyncio Redis client cannot
be used; so `QueueGauges` reads the queue from the event loop every few
seconds (one script, `TaskStore.queue_gauges`) and sets plain gauges, which a
scrape reads as they last were. Every worker of an agent refreshes the same
values (aggregate replicas with `max by (agent)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import Gauge
from redis.exceptions import RedisError

from agentplex.tasks.store import TaskStore

log = logging.getLogger(__name__)

queue_depth = Gauge(
    "agentplex_task_queue_depth",
    "Unfinished tasks (pending and running) of an agent's queue.",
    ["agent"],
)
queue_oldest_pending_seconds = Gauge(
    "agentplex_task_queue_oldest_pending_seconds",
    "How long the oldest task no worker has claimed yet has been waiting (0: none waits).",
    ["agent"],
)
dead_letters = Gauge(
    "agentplex_task_dead_letters",
    "Tasks in an agent's dead-letter stream (they kept killing workers).",
    ["agent"],
)


class QueueGauges:
    """Keeps one agent's queue gauges fresh, from the event loop."""

    def __init__(self, store: TaskStore, interval_seconds: float) -> None:
        self.store = store
        self.interval_seconds = interval_seconds
        agent = store.agent
        self._depth = queue_depth.labels(agent)
        self._oldest = queue_oldest_pending_seconds.labels(agent)
        self._dead = dead_letters.labels(agent)
        self._failing = False

    async def refresh(self) -> None:
        """Read the queue once and set the gauges."""
        gauges = await self.store.queue_gauges()
        self._depth.set(gauges.depth)
        self._oldest.set(gauges.oldest_pending_seconds)
        self._dead.set(gauges.dead_letters)

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every `interval_seconds` until `stop` is set; Redis errors wait a turn."""
        while not stop.is_set():
            try:
                await self.refresh()
                self._failing = False
            except (OSError, RedisError) as exc:
                if not self._failing:  # once per outage, not once per turn
                    log.warning("cannot read the queue's gauges (%s); keeping the last", exc)
                self._failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval_seconds)
