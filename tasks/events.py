"""`EventWriter`: a running task's events, appended in order and in batches.

The runner does not wait for Redis on every event: events queue up and one
writer appends whatever piled up during its previous write, so a burst of
events (a step start, streamed text, tool calls) costs a round trip or two
instead of one each. Order is kept: one writer, one queue, consecutive
sequence numbers per batch. The final event is not written here: it goes
with the result, atomically, once `close()` has written everything before it.

With a `linger`, the writer waits that long after the first event of a batch
before writing it, so events a few milliseconds apart (a step's start, its
tool call, the tool's result across a registry hop) share one round trip.
That is Kafka's linger.ms: watchers see events up to `linger` later, in
exchange for fewer Redis scripts per task on the worker and fewer wake-ups of
every watcher. `close()` cuts a linger short: the end is never delayed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from agentplex.tasks.store import TaskStore
from agentplex.v1 import step_event_pb2


class EventWriter:
    def __init__(
        self,
        store: TaskStore,
        task_id: str,
        attempt: int,
        *,
        on_error: Callable[[], None],
        linger: float = 0.0,
    ) -> None:
        self._store = store
        self._task_id = task_id
        self._attempt = attempt
        self._on_error = on_error
        self._pending: list[step_event_pb2.StepEvent] = []
        self._wake = asyncio.Event()
        self._linger = linger
        self._closed = asyncio.Event()
        self.error: BaseException | None = None
        self._writer = asyncio.create_task(self._write(), name=f"events-{task_id}")
        # Its failure is reported through `error` (the worker raises that without
        # awaiting the writer): mark it retrieved, or asyncio logs it as lost.
        self._writer.add_done_callback(lambda done: done.cancelled() or done.exception())

    def add(self, event: step_event_pb2.StepEvent) -> None:
        if self.error is not None:
            raise self.error
        self._pending.append(event)
        self._wake.set()

    async def _write(self) -> None:
        try:
            while True:
                if not self._pending:
                    if self._closed.is_set():
                        return
                    await self._wake.wait()
                    self._wake.clear()
                    continue
                if self._linger > 0 and not self._closed.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closed.wait(), self._linger)
                batch = self._pending[:]
                del self._pending[: len(batch)]
                await self._store.append_events(self._task_id, self._attempt, batch)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # A stale attempt or a lost Redis: stop the run, report at close().
            self.error = exc
            self._on_error()
            raise

    async def close(self) -> None:
        """Write everything still queued; raises whatever stopped the writer."""
        self._closed.set()
        self._wake.set()
        await self._writer

    def abort(self) -> None:
        self._writer.cancel()
