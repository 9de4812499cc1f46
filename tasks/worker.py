"""`Worker`: claims an agent's queued tasks and runs them with the AgentRunner.

New entries come through the store's `claim_new`; entries whose worker went
quiet for a whole lease through `reclaim_abandoned`. A running task's lease
is renewed by a heartbeat, and a `CancelWatch` is its one cancel signal;
every event and the final result are written with the attempt number, so if
this worker stalls and another takes over, whatever this one writes
afterwards is refused (attempt fencing) and it gives up the task.

On shutdown the worker stops claiming, lets running tasks finish within the
grace period, and hands the rest back, ready for another worker at once.
Beside the claim loop runs the agent's `Reconciler` (tasks/reconciler.py):
the workers take turns putting back on the queue the tasks that lost their
queue entry.
Tool calls carry idempotency keys derived from task, step and call index, so
a task that runs again replays its completed side effects instead of
repeating them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate
from prometheus_client import Counter
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agentplex.contract.events import is_final
from agentplex.contract.task_request import TaskRequest
from agentplex.runtime import principal as principals
from agentplex.runtime.clients import Deadline
from agentplex.runtime.errors import AgentplexError, Unavailable
from agentplex.tasks.events import EventWriter
from agentplex.tasks.reconciler import Reconciler
from agentplex.tasks.store import (
    Claimed,
    StaleAttempt,
    Started,
    TaskStore,
    public_task_id,
)
from agentplex.v1 import step_event_pb2, task_pb2

log = logging.getLogger(__name__)

tasks_claimed = Counter(
    "agentplex_worker_tasks_claimed_total", "Queue entries claimed, by how.", ["agent", "how"]
)
tasks_outcome = Counter(
    "agentplex_worker_task_outcomes_total",
    "What became of claimed entries.",
    ["agent", "outcome"],
)

EventSink = Callable[[step_event_pb2.StepEvent], Awaitable[None]]


class RunOutcome(Protocol):
    """How a run ended: the result to record, and the error when it FAILED."""

    @property
    def result(self) -> task_pb2.TaskResult: ...

    @property
    def failure(self) -> AgentplexError | None: ...


class TaskRunner(Protocol):
    """What a worker runs a task with (the agents' `AgentRunner`).

    The queue machinery knows nothing of agents: it hands the runner a
    validated request, the time left, where events go, the sequence to
    number on from and the cancel signal (`interrupt`, which it may also
    ask to be refreshed at a step boundary: `cancel_requested`).
    """

    async def run(
        self,
        task: TaskRequest,
        deadline: Deadline,
        sink: EventSink,
        *,
        last_sequence: int = 0,
        interrupt: asyncio.Event | None = None,
        cancel_requested: Callable[[], Awaitable[bool]] | None = None,
    ) -> RunOutcome: ...


class DependencyDown(Exception):
    """The attempt failed because a dependency was unavailable; retry it later."""


REDIS_RETRY_SECONDS = 0.5
CANCEL_WAIT_SECONDS = 5.0


@dataclass
class Worker:
    store: TaskStore
    runner: TaskRunner
    consumer: str
    lease_seconds: float = 10.0
    max_attempts: int = 3
    concurrency: int = 4
    grace_seconds: float = 10.0
    task_timeout_seconds: float = 300.0
    block_seconds: float = 0.5
    # How often a running task's cancel flag is read (one HGET per task).
    cancel_poll_seconds: float = 0.2
    # How long a task's first pending event waits for others to share its write.
    event_linger_seconds: float = 0.0
    # How often the workers of the agent (one at a time) reconcile its queue.
    reconcile_seconds: float = 30.0
    # Running jobs: task id, queue entry and (once started) attempt number.
    _running: dict[asyncio.Task[None], _Job] = field(default_factory=dict)
    # Where the last scan for abandoned entries stopped: each call scans only a
    # few pending entries, so starting over every time could starve the rest.
    _reclaim_cursor: str | None = None
    # When the last scan for abandoned entries found none (monotonic seconds).
    _last_idle_sweep: float = float("-inf")
    # Set while no `run` is in progress (see `stopped`).
    _idle: asyncio.Event = field(default_factory=lambda: _set(asyncio.Event()))

    @property
    def _sweep_seconds(self) -> float:
        """How often to scan for abandoned entries: a small part of the lease they
        wait out anyway, so a busy worker does not pay a scan for every claim."""
        return min(1.0, self.lease_seconds / 4)

    @property
    def _lease_ms(self) -> int:
        return int(self.lease_seconds * 1000)

    async def stopped(self) -> None:
        """Return once no `run` is in progress: at once if none is, else when the
        one running has drained. Whoever closes the store's connections waits
        for this first."""
        await self._idle.wait()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run tasks until `stop` is set, then drain."""
        self._idle.clear()
        try:
            await self._run(stop)
        finally:
            self._idle.set()

    async def _run(self, stop: asyncio.Event) -> None:
        await self.store.ensure_group()
        slots = asyncio.Semaphore(self.concurrency)
        reconciler = Reconciler(
            self.store, self.consumer, self.reconcile_seconds, lease_seconds=self.lease_seconds
        )
        reconciling = asyncio.create_task(
            reconciler.run(stop), name=f"reconciler-{self.store.agent}"
        )

        def ended(done: asyncio.Task[None]) -> None:
            self._running.pop(done, None)
            slots.release()

        agent = self.store.agent
        log.info("worker %s started", self.consumer, extra={"agent": agent})
        try:
            while await _acquire_unless_stopped(slots, stop):
                try:
                    claimed = await self._claim()
                except (OSError, RedisError) as exc:
                    # Redis restarting or unreachable: wait and try again; nothing
                    # claimed is lost, it stays pending in the consumer group.
                    slots.release()
                    log.warning("cannot claim from Redis (%s); retrying", exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=REDIS_RETRY_SECONDS)
                    continue
                if claimed is None:
                    slots.release()
                    continue
                entry, how = claimed
                if stop.is_set():
                    # Claimed while the stop arrived: give it straight back.
                    slots.release()
                    await self._give_back(entry.entry_id)
                    break
                tasks_claimed.labels(agent, how).inc()
                job = asyncio.create_task(
                    self._process(entry.entry_id, entry.task_id), name=f"task-{entry.task_id}"
                )
                self._running[job] = _Job(entry.task_id, entry.entry_id)
                job.add_done_callback(ended)
        finally:
            # A pass in flight may stop anywhere: each of its writes is atomic.
            reconciling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconciling
            await self._drain()

    async def _claim(self) -> tuple[Claimed, str] | None:
        """The next entry to run and how it came ('reclaimed' or 'new')."""
        # Abandoned work first: it has waited longest.
        if time.monotonic() - self._last_idle_sweep >= self._sweep_seconds:
            reclaimed = await self._reclaim()
            if reclaimed is not None:
                return reclaimed, "reclaimed"
        fresh = await self.store.claim_new(self.consumer, int(self.block_seconds * 1000))
        return None if fresh is None else (fresh, "new")

    async def _reclaim(self) -> Claimed | None:
        sweep = await self.store.reclaim_abandoned(
            self.consumer, self._lease_ms, self._reclaim_cursor
        )
        self._reclaim_cursor = sweep.cursor
        if sweep.complete:
            # A whole pass over the pending entries found nothing to take: rest a while.
            self._last_idle_sweep = time.monotonic()
        return sweep.claimed

    async def _give_back(self, entry_id: bytes) -> None:
        """Make a claimed, unstarted entry reclaimable by another worker at once."""
        await self.store.give_back(entry_id, self.consumer, self._lease_ms)

    async def _process(self, entry_id: bytes, task_id: str) -> None:
        agent = self.store.agent
        try:
            started = await self.store.start(
                task_id, self.consumer, self._lease_ms, self.max_attempts
            )
            if started in ("missing", "ended"):
                await self.store.ack_orphan(entry_id)
                tasks_outcome.labels(agent, "already_ended").inc()
                return
            if started == "exhausted":
                await self._dead_letter(task_id)
                tasks_outcome.labels(agent, "dead_lettered").inc()
                return
            assert isinstance(started, Started)
            current = asyncio.current_task()
            if current is not None and current in self._running:
                self._running[current].attempt = started.attempt
            # The task runs for whoever submitted it: its memory, tool calls and
            # sub-tasks are that tenant's (this job is its own asyncio task).
            principals.bind(principals.from_proto(started.principal))
            await self._run_attempt(task_id, started)
            tasks_outcome.labels(agent, "finished").inc()
        except StaleAttempt as exc:
            # Another worker owns the task now; whatever this attempt did is void.
            log.warning("attempt superseded: %s", exc, extra={"task_id": task_id})
            tasks_outcome.labels(agent, "stale").inc()
        except DependencyDown as exc:
            log.warning("task left for a retry: %s", exc, extra={"task_id": task_id})
            tasks_outcome.labels(agent, "retry_later").inc()
        except (OSError, RedisConnectionError, RedisTimeoutError) as exc:
            # Lost the connection to Redis mid-task (a restart, a failover): not the
            # task's fault, so it must not count towards dead-lettering. Hand it back
            # uncounted once Redis answers; if it doesn't, the lease runs out and the
            # task is reclaimed (counted), as after a crash.
            log.warning("task interrupted by a Redis failure: %s", exc, extra={"task_id": task_id})
            tasks_outcome.labels(agent, "interrupted").inc()
            await self._hand_back_after_outage(task_id)
        except RedisError as exc:
            # Redis answered with an error: leave the entry pending; once the lease
            # runs out, a worker reclaims it and the attempt counts.
            log.warning("task failed on a Redis error: %s", exc, extra={"task_id": task_id})
            tasks_outcome.labels(agent, "interrupted").inc()
        except Exception:
            # Never lose an error in a background job; the entry stays pending and
            # is reclaimed after the lease.
            log.exception("task attempt crashed", extra={"task_id": task_id})
            tasks_outcome.labels(agent, "crashed").inc()

    async def _hand_back_after_outage(self, task_id: str) -> None:
        current = asyncio.current_task()
        job = self._running.get(current) if current is not None else None
        if job is None or not job.attempt:
            return
        try:
            if await self.store.hand_back(task_id, job.attempt, self.consumer, self._lease_ms):
                tasks_outcome.labels(self.store.agent, "handed_back").inc()
                log.info("handed back", extra={"task_id": task_id, "attempt": job.attempt})
            else:
                # Refused: while Redis was out of reach (a partition, a stall) the lease ran
                # out and another worker took the task over, or it already ended.
                tasks_outcome.labels(self.store.agent, "stale").inc()
                log.warning(
                    "attempt superseded: the task moved on while this worker could not reach "
                    "Redis; nothing handed back",
                    extra={"task_id": task_id, "attempt": job.attempt},
                )
        except (OSError, RedisError) as exc:
            log.warning(
                "cannot hand the task back (%s); its lease will run out",
                exc,
                extra={"task_id": task_id},
            )

    async def _run_attempt(self, task_id: str, started: Started) -> None:
        final: list[step_event_pb2.StepEvent] = []
        running: asyncio.Task[RunOutcome] | None = None

        def stop_run() -> None:
            if running is not None:
                running.cancel()

        writer = EventWriter(
            self.store,
            task_id,
            started.attempt,
            on_error=stop_run,
            linger=self.event_linger_seconds,
        )

        async def sink(event: step_event_pb2.StepEvent) -> None:
            if is_final(event):
                final.append(event)  # written together with the result, atomically
            else:
                writer.add(event)

        task = TaskRequest.from_proto(started.spec)
        timeout = self.task_timeout_seconds
        if task.deadline_unix is not None:
            # The submitter's deadline (a parent task's, for a sub-task) wins; one
            # already past leaves no time, so the run ends before its first step.
            timeout = min(timeout, task.deadline_unix - time.time())
        cancel = CancelWatch(
            self.store,
            task_id,
            requested_at_start=started.cancel_requested,
            poll_seconds=self.cancel_poll_seconds,
        )
        # Continue the submitter's trace across the queue (create_task copies
        # the context, so the runner's spans are children of the submitter's).
        trace_context = propagate.extract(dict(started.spec.trace_context))
        token = otel_context.attach(trace_context)
        try:
            running = asyncio.create_task(
                self.runner.run(
                    task,
                    Deadline.after(timeout),
                    sink,
                    last_sequence=started.last_sequence,
                    interrupt=cancel.interrupt,
                    cancel_requested=cancel.requested,
                )
            )
        finally:
            otel_context.detach(token)
        beat = asyncio.create_task(self._heartbeat(task_id, started.attempt, running))
        watch = asyncio.create_task(cancel.poll())
        try:
            outcome = await running
        except asyncio.CancelledError:
            if beat.done() and isinstance(stale := beat.exception(), StaleAttempt):
                raise stale from None
            if writer.error is not None:
                raise writer.error from None
            writer.abort()
            raise
        except BaseException:
            writer.abort()
            raise
        finally:
            beat.cancel()
            watch.cancel()
            # Don't let a heartbeat stuck in a Redis call hold the task hostage.
            await asyncio.wait([beat, watch], timeout=1.0)
        # Everything before the final event is written first: finish() checks that
        # the final event continues the numbering.
        await writer.close()
        if isinstance(outcome.failure, Unavailable):
            # A dependency was down: that is not this task's answer. Leave the
            # entry pending; after the lease it is reclaimed and tried again
            # (counted as an attempt, so an outage cannot loop forever).
            raise DependencyDown(outcome.failure.message)
        [event] = final
        if not await self.store.finish(task_id, started.attempt, outcome.result, event):
            raise StaleAttempt(f"attempt {started.attempt} of {task_id} finished too late")
        token = otel_context.attach(trace_context)  # the line carries the task's trace id
        try:
            log.info(
                "task finished",
                extra={
                    "task_id": task_id,
                    "attempt": started.attempt,
                    "status": task_pb2.TaskStatus.Name(outcome.result.status),
                },
            )
        finally:
            otel_context.detach(token)

    async def _heartbeat(self, task_id: str, attempt: int, running: asyncio.Task[object]) -> None:
        try:
            while True:
                await asyncio.sleep(self.lease_seconds / 3)
                try:
                    await self.store.heartbeat(task_id, attempt, self.consumer, self._lease_ms)
                except (OSError, RedisError) as exc:
                    # One lost beat is not a lost lease: there are three per lease.
                    log.warning(
                        "heartbeat failed (%s); trying again", exc, extra={"task_id": task_id}
                    )
        except StaleAttempt:
            running.cancel()
            raise

    async def _dead_letter(self, task_id: str) -> None:
        message = (
            f"task was started {self.max_attempts} times without finishing (worker crashes, "
            "stalls or unavailable dependencies); moved to the dead-letter queue"
        )
        result = task_pb2.TaskResult(
            task_id=public_task_id(task_id), status=task_pb2.TASK_STATUS_FAILED, error=message
        )
        event = step_event_pb2.StepEvent(
            task_id=public_task_id(task_id),
            agent=self.store.agent,
            sequence=await self.store.last_sequence(task_id) + 1,
            error=step_event_pb2.TaskFailed(
                code=grpc.StatusCode.ABORTED.name, message=message, result=result
            ),
        )
        event.time.GetCurrentTime()
        await self.store.finish(task_id, None, result, event, dead_letter_reason=message)
        log.error("task dead-lettered", extra={"task_id": task_id})

    async def _drain(self) -> None:
        if not self._running:
            return
        log.info("draining %d running task(s)", len(self._running))
        _done, left = await asyncio.wait(list(self._running), timeout=self.grace_seconds)
        # Read what each unfinished job holds before cancelling it.
        unfinished = {job: self._running[job] for job in left if job in self._running}
        for job in unfinished:
            job.cancel()
        if unfinished:
            _stopped, stuck = await asyncio.wait(unfinished, timeout=CANCEL_WAIT_SECONDS)
            for job in stuck:
                log.error(
                    "task %s did not stop when cancelled; handing it back anyway",
                    unfinished[job].task_id,
                )
        for held in unfinished.values():
            # One that cannot be handed back (Redis failing) must not keep the rest:
            # it only waits out its lease, they would too.
            try:
                await self._return(held)
            except Exception as exc:
                log.warning(
                    "cannot hand the task back (%s); its lease will run out",
                    exc,
                    extra={"task_id": held.task_id, "attempt": held.attempt},
                )

    async def _return(self, held: _Job) -> None:
        """Give a held task back to the queue: a started one as pending again, an
        unstarted entry as reclaimable at once."""
        if not held.attempt:
            await self._give_back(held.entry_id)
        elif await self.store.hand_back(held.task_id, held.attempt, self.consumer, self._lease_ms):
            tasks_outcome.labels(self.store.agent, "handed_back").inc()
            log.info("handed back", extra={"task_id": held.task_id, "attempt": held.attempt})


class CancelFlag(Protocol):
    """What `CancelWatch` reads: `TaskStore.cancel_flag`."""

    async def cancel_flag(self, task_id: str) -> bool: ...


class CancelWatch:
    """The one cancel signal of a running attempt.

    A cancel reaches a running task only through the task's cancel flag, and
    this is the flag's only reader. `interrupt`, which the runner stops on, is
    set at once if the cancel was recorded before the start
    (`Started.cancel_requested`); else by `poll`, every `poll_seconds`, so a
    step in flight stops without waiting for its end (one waiting on
    sub-agents cancels them, and through their own workers their sub-agents);
    or by `requested`, which the runner asks at each step boundary. Once set,
    it stays set and the flag is not read again.
    """

    def __init__(
        self,
        store: CancelFlag,
        task_id: str,
        *,
        requested_at_start: bool,
        poll_seconds: float,
    ) -> None:
        self._store = store
        self._task_id = task_id
        self._poll_seconds = poll_seconds
        self.interrupt = asyncio.Event()  # what the runner stops on, mid-step
        if requested_at_start:
            self.interrupt.set()

    async def requested(self) -> bool:
        """Whether the task is to stop: the flag, read now unless already seen."""
        if not self.interrupt.is_set() and await self._store.cancel_flag(self._task_id):
            self.interrupt.set()
        return self.interrupt.is_set()

    async def poll(self) -> None:
        """Read the flag every `poll_seconds` until it is set (run as a task,
        cancelled when the attempt ends)."""
        while not self.interrupt.is_set():
            await asyncio.sleep(self._poll_seconds)
            try:
                await self.requested()
            except (OSError, RedisError) as exc:
                log.warning(
                    "cannot read the cancel flag (%s)", exc, extra={"task_id": self._task_id}
                )


@dataclass
class _Job:
    task_id: str
    entry_id: bytes
    attempt: int = 0


def _set(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return event


async def _acquire_unless_stopped(slots: asyncio.Semaphore, stop: asyncio.Event) -> bool:
    """Wait for a free slot; False as soon as `stop` is set instead."""
    if stop.is_set():
        return False
    acquire = asyncio.create_task(slots.acquire())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if acquire.done() and not stop.is_set():
        return True
    if acquire.done():
        slots.release()
    else:
        acquire.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acquire
        if acquire.done() and not acquire.cancelled():
            slots.release()
    return False
