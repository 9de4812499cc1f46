"""`TaskService`: the durable task API an agent serves (submit, get, cancel, watch).

Transport-free: the agent's servicer adapts it to gRPC. It only reads and
writes the task store (which alone knows the Redis layout); the work itself
happens in the workers.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator

from opentelemetry import propagate

from agentplex.contract import lineage
from agentplex.contract.events import is_final
from agentplex.contract.reasons import Reason
from agentplex.contract.task_request import TASK_ID_PATTERN, TaskRequest
from agentplex.runtime import principal as principals
from agentplex.runtime.errors import InvalidArgument, NotFound, OutOfRange
from agentplex.tasks.event_feed import EventFeed, Lagged
from agentplex.tasks.store import (
    PENDING,
    RUNNING,
    TERMINAL,
    StaleAttempt,
    TaskStore,
    delegation_fingerprint,
    fingerprint,
    record_id,
)
from agentplex.v1 import step_event_pb2, task_pb2

# How long a watcher waits for the feed before checking that its task still exists.
WATCH_BLOCK_MS = 1000
WATCH_BATCH = 200


class TaskService:
    def __init__(self, store: TaskStore, feed: EventFeed) -> None:
        self._store = store
        self._feed = feed

    async def submit(self, spec: task_pb2.TaskSpec) -> tuple[task_pb2.Task, bool]:
        """Record and queue a task; (the task, whether it is new).

        A task id already taken by the same request returns that task; by a
        different one, TASK_ID_REUSED — except for a replayed delegation. The
        registry derives a sub-task's id from the invocation's idempotency key
        and recomputes its deadline and budget share each time it runs it (a
        durable parent retried after its worker died, its ledger claim gone).
        If only those differ — same agent, prompt, session, lineage, metadata,
        step limit — it is the same delegation, and the resubmission
        *re-attaches*: it gets the existing sub-task, which the registry then
        watches to its end. Chosen over cancel-and-replace because the work
        already done (model calls, tool side effects, tokens spent) is kept
        rather than paid for twice, and the id keeps naming one sub-task, whose
        record and events stay whole; it keeps the deadline and budget share
        it was given first (the watching registry still cancels it if the
        replayed caller goes away or runs out of time). A sub-task that
        already ended is re-attached to as well: its result is the answer
        (a CANCELLED one a tool error the caller's model sees).
        """
        fp = fingerprint(spec)  # of the request as sent, before defaults
        same_delegation = delegation_fingerprint(spec)
        request = TaskRequest.from_proto(spec)  # validates; fills defaults
        lineage.check_accepts(self._store.agent, spec.lineage)
        normalized = task_pb2.TaskSpec(
            prompt=request.prompt,
            session_id=request.session_id,
            metadata=request.metadata,
            max_steps=request.max_steps,
            token_budget=request.token_budget,
            task_id=spec.task_id or f"t-{uuid.uuid4().hex}",
            lineage=spec.lineage,
            trace_context=dict(spec.trace_context),
        )
        if spec.HasField("deadline"):
            normalized.deadline.CopyFrom(spec.deadline)
        # The queue breaks the gRPC call chain; the trace continues through the record,
        # and so does the principal: the task runs for whoever submitted it.
        propagate.inject(normalized.trace_context)
        created = await self._store.submit(
            normalized, fp, same_delegation, principals.as_proto(principals.current())
        )
        return await self._store.get(record_id(normalized.task_id)), created

    async def get(self, task_id: str) -> task_pb2.Task:
        _check_id(task_id)
        return await self._store.get(record_id(task_id))

    async def cancel(self, public_id: str) -> task_pb2.Task:
        _check_id(public_id)
        task_id = record_id(public_id)  # another tenant's task is simply not found
        for _ in range(10):
            task = await self._store.get(task_id)
            if task.status in TERMINAL:
                return task  # cancelling a finished task changes nothing
            if task.status == RUNNING:
                if await self._store.request_cancel(task_id) == RUNNING:
                    return await self._store.get(task_id)
                continue  # handed back or ended meanwhile: decide again
            if task.status == PENDING and await self._cancel_pending(task):
                return await self._store.get(task_id)
            # It started (or ended) between our read and our write: look again.
        return await self._store.get(task_id)

    async def _cancel_pending(self, task: task_pb2.Task) -> bool:
        """`task` as `get` returned it: its public id; the store is asked by record id."""
        result = task_pb2.TaskResult(
            task_id=task.task_id,
            status=task_pb2.TASK_STATUS_CANCELLED,
            error="cancelled",
            session_id=task.session_id,
        )
        event = step_event_pb2.StepEvent(
            task_id=task.task_id,
            agent=self._store.agent,
            sequence=task.last_sequence + 1,
            final_result=step_event_pb2.TaskFinished(result=result),
        )
        event.time.GetCurrentTime()
        try:
            return await self._store.finish(
                record_id(task.task_id), None, result, event, only_if_pending=True
            )
        except StaleAttempt:
            return False

    async def watch(
        self, public_id: str, after_sequence: int, *, final_only: bool = False
    ) -> AsyncIterator[step_event_pb2.StepEvent]:
        """Events after `after_sequence`, then live ones until the task's final event;
        with `final_only`, just the final event (the history is never read).

        Live events come through the process's one `EventFeed` reader, not a
        blocking read of this watcher's own: the events up to where the feed
        took over are read here (`read_events`), the rest arrive from it."""
        _check_id(public_id)
        task_id = record_id(public_id)
        task = await self._store.get(task_id)
        if after_sequence > task.last_sequence:
            raise InvalidArgument(
                f"after_sequence {after_sequence} is beyond the task's last event "
                f"({task.last_sequence})"
            )
        if task.status in TERMINAL and after_sequence == task.last_sequence:
            return
        if final_only and task.status in TERMINAL:
            last = await self._store.last_event(task_id)
            if last is None:
                raise _expired(public_id, task.last_sequence + 1, available=False)
            yield last
            return
        if after_sequence < task.last_sequence and not final_only:
            first = await self._store.first_event_sequence(task_id)
            first_seq = task.last_sequence + 1 if first is None else first
            if first_seq > after_sequence + 1:
                raise _expired(public_id, first_seq, available=first is not None)
        # A final-only watch starts at the task's last event: its end comes after it.
        cursor = task.last_sequence if final_only else after_sequence
        while True:  # once per subscription: again only after falling behind the feed
            subscription = self._store.subscribe_events(self._feed, task_id, cursor)
            gap_left = True  # events before the feed's start, read here
            try:
                while True:
                    if gap_left and cursor < subscription.start:
                        events = await self._store.read_events(
                            task_id, cursor, subscription.start, WATCH_BATCH
                        )
                        gap_left = bool(events)
                    else:
                        events = await subscription.next(timeout=WATCH_BLOCK_MS / 1000)
                        if not events and not await self._store.exists(task_id):
                            raise NotFound(
                                f"task {public_id!r} expired while being watched",
                                reason=Reason.TASK_NOT_FOUND,
                            )
                    for event in events:
                        if event.sequence <= cursor:
                            continue
                        cursor = event.sequence
                        final = is_final(event)
                        if final or not final_only:
                            yield event
                        if final:
                            return
            except Lagged:
                continue  # read on from the cursor, then subscribe again
            finally:
                subscription.close()


def _expired(task_id: str, first_seq: int, *, available: bool) -> OutOfRange:
    return OutOfRange(
        reason=Reason.EVENTS_EXPIRED,
        message=f"events of task {task_id} up to sequence {first_seq - 1} are past "
        f"retention; the first still available is {first_seq}"
        + ("" if available else " (none: read the result with GetTask)"),
    )


def _check_id(task_id: str) -> None:
    if not task_id:
        raise InvalidArgument("task_id is required")
    if not re.fullmatch(TASK_ID_PATTERN, task_id):
        raise InvalidArgument(
            f"task_id {task_id[:80]!r} is not a task id (1-64 letters, digits and ._-)"
        )
