"""`Reconciler`: puts back on the queue what the queue lost.

A task's record and its queue entry are written together and end together,
so they agree — until the stream loses entries behind the store's back: an
operator's `XTRIM`, a Redis restored from an older file. A pending task with
no entry is never claimed; a running one whose worker dies is never reclaimed
(the scan for abandoned work only sees entries); and the depth counter keeps
counting both, so the queue's backpressure capacity is lost for good.

Every `interval_seconds` (jittered, so workers started together do not try
together) each worker asks for the agent's reconcile turn, a lock with expiry
in Redis; one gets it, and a holder that crashes frees it by the expiry. The
holder keeps the turn for a whole interval even after its pass, so the mesh
makes one pass per interval however many workers it has. A pass walks the
unfinished tasks, re-enqueues those with no queue entry that no worker has
(`TaskStore.requeue_lost`, one script per batch), then recounts the depth from
the open tasks.

"No worker has it" is decided the way the scan for abandoned entries decides
it, by the lease: a running task's lease is live, or a pending task's lost
entry was claimed by a worker (read from the queue, in the consumer group's
pending list) less than a lease ago: that worker is about to start it, and a
copy on the queue would have a second worker start it too, the two running at
once. A worker that stalls longer than a lease between its claim and its
start can still meet a copy, as it can meet a reclaim: attempt fencing then
keeps the task's events and result to one attempt.

Correctness does not rest on the lock: a task re-enqueued has an entry again,
so a second pass leaves it alone, and a re-enqueued task's next start takes a
new attempt, which fences off any write of the attempt it replaces, as after
a reclaim. The lock only keeps the walks from repeating one another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from dataclasses import dataclass

from prometheus_client import Counter
from redis.exceptions import RedisError

from agentplex.tasks.store import RUNNING, TaskStore

log = logging.getLogger(__name__)

tasks_reconciled = Counter(
    "agentplex_worker_tasks_reconciled_total",
    "Tasks put back on the queue because their queue entry was lost, by the status they had.",
    ["agent", "status"],
)

BATCH = 100  # tasks per script: each batch blocks Redis for its length only
# The workers' lease unless told otherwise (`AGENTPLEX_TASK_LEASE_SECONDS`'s default).
DEFAULT_LEASE_SECONDS = 10.0


@dataclass(frozen=True)
class Pass:
    """What one reconcile pass did."""

    requeued: int
    depth_before: int
    depth_after: int


@dataclass
class Reconciler:
    store: TaskStore
    consumer: str
    interval_seconds: float = 30.0
    batch: int = BATCH
    # The workers' lease: how long a claimed, unstarted entry counts as held.
    lease_seconds: float = DEFAULT_LEASE_SECONDS

    @property
    def _hold_ms(self) -> int:
        return max(1, int(self.interval_seconds * 1000))

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease_seconds * 1000))

    async def run(self, stop: asyncio.Event) -> None:
        """Try for a pass every interval until `stop` is set. A failed pass is
        logged and tried again next time: this runs beside the worker's claim
        loop and must never take it down."""
        while not stop.is_set():
            # Half to one interval: a turn lasts one, so someone passes about once per interval.
            wait = self.interval_seconds * random.uniform(0.5, 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)
            if stop.is_set():
                return
            try:
                await self.run_once()
            except (OSError, RedisError) as exc:
                log.warning(
                    "cannot reconcile the %s queue (%s); trying again next round",
                    self.store.agent,
                    exc,
                )
            except Exception:
                log.exception("reconcile pass of the %s queue crashed", self.store.agent)

    async def run_once(self) -> Pass | None:
        """One pass, if this worker gets the turn; None if another holds it (or
        took it over during the pass: the rest is left to that one)."""
        agent = self.store.agent
        token = f"{self.consumer}:{uuid.uuid4().hex}"
        if not await self.store.take_reconcile_turn(token, self._hold_ms):
            return None
        # A queue whose stream key was deleted lost its consumer group too.
        await self.store.ensure_group()
        seen: set[str] = set()
        requeued = 0
        async for ids in self.store.open_task_ids(self.batch):
            fresh = [task_id for task_id in dict.fromkeys(ids) if task_id not in seen]
            if not fresh:
                continue
            seen.update(fresh)
            if not await self.store.keep_reconcile_turn(token, self._hold_ms):
                log.warning("the %s reconcile turn ran out mid-pass; leaving the rest", agent)
                return None
            for task in await self.store.requeue_lost(fresh, self._lease_ms):
                requeued += 1
                status = "running" if task.status == RUNNING else "pending"
                tasks_reconciled.labels(agent, status).inc()
                log.warning(
                    "task re-enqueued: it was %s but had lost its queue entry",
                    status,
                    extra={"task_id": task.task_id, "agent": agent},
                )
        # Only after a whole walk, which brings the open index up to date (records
        # deleted from under it out, tasks submitted before it existed in), and
        # only by the turn's holder.
        if not await self.store.keep_reconcile_turn(token, self._hold_ms):
            log.warning("the %s reconcile turn ran out before the recount; leaving it", agent)
            return None
        depth = await self.store.recount_depth()
        if depth.before != depth.after:
            log.warning(
                "%s queue depth recounted: %d, not %d",
                agent,
                depth.after,
                depth.before,
                extra={"agent": agent},
            )
        return Pass(requeued=requeued, depth_before=depth.before, depth_after=depth.after)
