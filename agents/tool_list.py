"""The agent's tool list, read from the registry only when it may have moved on.

Within a task, the list is read again only after a tool call reported a newer
registry revision (or failed, which reports none). Across the tasks of one
process, the last list read is reused for up to `max_age` seconds, unless a
call since reported a newer revision: a registry round trip (and five Redis
commands) fewer per task, though in full benchmark runs the gain stayed within
run-to-run drift (docs/BENCHMARKS.md, "Changes measured").

It is a cache of the registry's data, not task state: losing it costs one read.
The registry stays the authority; it checks grants, versions and schemas on
every invocation, so a list up to `max_age` old can offer a tool that was
withdrawn a moment ago (the call is refused and the model told so) or miss one
published a moment ago (seen on the next step or task), never run what the
registry forbids. `max_age` 0 reads the list at the start of every task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agentplex.v1 import tool_pb2, tool_registry_service_pb2


@dataclass
class SharedToolList:
    """The last list one agent process read, shared by its tasks."""

    max_age: float
    clock: Callable[[], float] = time.monotonic
    _tools: list[tool_pb2.ToolDefinition] | None = None
    _revision: int = -1
    _read_at: float = 0.0
    # Newest revision any call of this process reported.
    _newest_seen: int = -1

    def fresh(self) -> tuple[list[tool_pb2.ToolDefinition], int] | None:
        """The shared list and its revision, if still good to use; else None."""
        if self._tools is None or self.max_age <= 0:
            return None
        if self.clock() - self._read_at > self.max_age or self._newest_seen > self._revision:
            return None
        return self._tools, self._revision

    def store(self, tools: list[tool_pb2.ToolDefinition], revision: int) -> None:
        self._tools, self._revision, self._read_at = tools, revision, self.clock()
        self._newest_seen = max(self._newest_seen, revision)

    def saw(self, revision: int | None) -> None:
        """A call reported `revision`; None (a failed call) means: read it again."""
        if revision is None:
            self._tools = None
        else:
            self._newest_seen = max(self._newest_seen, revision)


@dataclass
class TaskToolList:
    """One task's view: the shared list when fresh, re-read when a call saw a newer one."""

    shared: SharedToolList
    tools: list[tool_pb2.ToolDefinition] = field(default_factory=list)
    revision: int = -1  # revision the list was read at; -1: never read
    seen: int | None = None  # newest revision a call reported; None: unknown

    def stale(self) -> bool:
        if self.revision < 0:
            shared = self.shared.fresh()
            if shared is not None:
                self.tools, self.revision = shared
                self.seen = self.revision
        return self.revision < 0 or self.seen != self.revision

    def read(self, response: tool_registry_service_pb2.ListToolsResponse) -> None:
        self.tools = list(response.tools)
        self.revision = self.seen = int(response.revision)
        self.shared.store(self.tools, self.revision)

    def delegates(self, name: str) -> bool:
        """Whether invoking `name` runs a task on another agent."""
        return any(
            t.name == name and t.backend_kind == tool_pb2.BACKEND_KIND_AGENT for t in self.tools
        )

    def saw(self, revision: int | None) -> None:
        self.shared.saw(revision)
        if revision is None or self.seen is None:
            self.seen = None
        else:
            self.seen = max(self.seen, revision)
