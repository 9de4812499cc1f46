"""`EventRecorder`: stamps step events with task id, sequence and time.

Sequence numbers start at 1 and have no gaps, so a caller can tell from the
numbers alone whether it missed an event.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import timestamp_pb2

from agentplex.v1 import step_event_pb2

EventSink = Callable[[step_event_pb2.StepEvent], Awaitable[None]]


class EventRecorder:
    def __init__(
        self,
        *,
        task_id: str,
        agent: str,
        sink: EventSink,
        depth: int = 0,
        last_sequence: int = 0,
    ) -> None:
        self._task_id = task_id
        self._agent = agent
        self._sink = sink
        self._depth = depth
        # A resumed task continues its numbering, so watchers see no repeats.
        self._sequence = last_sequence

    async def emit(self, step: int, **kind: Any) -> step_event_pb2.StepEvent:
        """Emit one event; `kind` is exactly one of StepEvent's oneof fields."""
        self._sequence += 1
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        event = step_event_pb2.StepEvent(
            task_id=self._task_id,
            sequence=self._sequence,
            time=now,
            agent=self._agent,
            depth=self._depth,
            step=step,
            **kind,
        )
        await self._sink(event)
        return event

    async def relay(self, event: step_event_pb2.StepEvent) -> step_event_pb2.StepEvent:
        """Carry a sub-task's event in this task's stream.

        It is renumbered into this stream (so the stream stays gap-free and
        resumable) and keeps its agent, depth, step and time; where it came
        from moves to `source_task_id`/`source_sequence`, set once at the
        first hop so deeper events keep their true origin.
        """
        self._sequence += 1
        relayed = step_event_pb2.StepEvent()
        relayed.CopyFrom(event)
        if not relayed.source_task_id:
            relayed.source_task_id, relayed.source_sequence = event.task_id, event.sequence
        relayed.task_id, relayed.sequence = self._task_id, self._sequence
        await self._sink(relayed)
        return relayed
