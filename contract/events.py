"""What a StepEvent stream's end looks like.

Every stream of a task — StreamSteps, WatchTask, a relayed sub-task — ends
with exactly one final event, `final_result` or `error`; everyone who reads a
stream decides "is this the end?" with `is_final`.
"""

from __future__ import annotations

from agentplex.v1 import step_event_pb2

FINAL_KINDS = frozenset({"final_result", "error"})


def is_final(event: step_event_pb2.StepEvent) -> bool:
    """True for the one event that ends a task's stream."""
    return event.WhichOneof("kind") in FINAL_KINDS
