"""Keeping the mesh's parts running, as Kubernetes or systemd would on one machine.

A part that exits on its own is started again after a backoff that doubles
with each start that did not stay up (capped), so a crash loop costs little
and is reported, not hidden; the mesh never stops because one part died.
A requested restart is graceful (SIGTERM: NOT_SERVING, the drain delay, the
grace period) and goes one replica at a time, each serving again before the
next one stops, so an agent with replicas is never down as a whole.

What a part is (a Python service, Redis, Envoy, the model server) is the
`Runner`'s business; this module only knows processes that start, get
healthy, exit and are stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

# A start that stays up this long resets the backoff: it was not a crash loop.
STABLE_SECONDS = 10.0
# This many exits in a row without staying up is reported as a crash loop.
CRASH_LOOP_EXITS = 3


class LaunchError(Exception):
    """A part failed to start; the message says which and why."""


class UnknownPart(LookupError):
    """No part or group of that name."""


class SupervisorStopping(RuntimeError):
    """The mesh is shutting down: nothing is restarted any more."""


class Runner(Protocol):
    """How to start and stop one kind of process; the supervisor decides when."""

    name: str
    group: str
    log_path: Path | None

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        """The running process, or None before the first start."""
        ...

    @property
    def address(self) -> str:
        """Where it listens, once started ("" if it does not)."""
        ...

    async def launch(self) -> None:
        """Start and wait until healthy; raise LaunchError (with nothing left running) if not.

        A relaunch keeps the address of the first start: its peers were told it once.
        """
        ...

    async def stop(self, *, graceful: bool) -> None:
        """Stop the process: SIGTERM (with the drain delay) if graceful, else SIGINT; idempotent."""
        ...


class State(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class Supervised:
    """One part and what the supervisor knows of its life."""

    runner: Runner
    state: State = State.STARTING
    restarts: int = 0
    exits_in_a_row: int = 0
    last_exit_code: int | None = None
    started_at: float = 0.0  # wall clock, for display
    _up_since: float = 0.0  # monotonic, for the backoff
    _watch: asyncio.Task[None] | None = field(default=None, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.runner.name

    @property
    def group(self) -> str:
        return self.runner.group

    @property
    def pid(self) -> int:
        process = self.runner.process
        return process.pid if process is not None and process.returncode is None else 0

    @property
    def crash_looping(self) -> bool:
        return self.exits_in_a_row >= CRASH_LOOP_EXITS


@dataclass
class Supervisor:
    """Starts parts in order, restarts the ones that exit, stops them in reverse order."""

    backoff_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    say: Callable[[str], None] = print
    # After each part of a requested restart: wait until callers reach it again.
    settle: Callable[[Supervised], Awaitable[None]] | None = None
    _parts: list[Supervised] = field(default_factory=list)
    _stopping: bool = False
    _restarting: asyncio.Lock = field(default_factory=asyncio.Lock)

    def stopping(self) -> bool:
        """True once the mesh is shutting down (a method: it changes while we wait)."""
        return self._stopping

    @property
    def parts(self) -> Sequence[Supervised]:
        return tuple(self._parts)

    def find(self, name: str) -> list[Supervised]:
        """Every replica of the group `name`, else the part called `name`; in start order."""
        group = [part for part in self._parts if part.group == name]
        found = group or [part for part in self._parts if part.name == name]
        if not found:
            names = sorted({part.name for part in self._parts} | {p.group for p in self._parts})
            raise UnknownPart(f"no part or group named {name!r}; the mesh runs: {', '.join(names)}")
        return found

    async def add(self, runner: Runner) -> Supervised:
        """Start a part and keep it running; a first start that fails raises LaunchError.

        The part is tracked before it starts, so a failed start is still stopped
        with the rest.
        """
        if self._stopping:
            raise SupervisorStopping("the mesh is stopping")
        part = Supervised(runner)
        self._parts.append(part)
        await self._launch(part)
        self._start_watch(part)
        return part

    def _start_watch(self, part: Supervised) -> None:
        part._watch = asyncio.create_task(self._watch(part), name=f"supervise-{part.name}")
        part._watch.add_done_callback(_report_watch_death)

    async def _launch(self, part: Supervised) -> None:
        part.state = State.STARTING
        await part.runner.launch()
        part.state = State.RUNNING
        part.started_at = time.time()
        part._up_since = time.monotonic()

    async def _watch(self, part: Supervised) -> None:
        """Wait for the part to exit; then back off and start it again, until it stays up."""
        while not self.stopping():
            process = part.runner.process
            # No process: its last start failed before one was spawned.
            code = await process.wait() if process is not None else None
            if self.stopping():
                return
            self._record_exit(part, code)
            await self._bring_back(part, code)

    async def _bring_back(self, part: Supervised, code: int | None) -> None:
        """Start an exited part again, backing off while its starts keep failing."""
        while not self.stopping():
            delay = self._backoff(part)
            part.state = State.BACKOFF
            what = f"exited (code {code})" if code is not None else "did not start"
            loop_note = (
                f" (crash loop: {part.exits_in_a_row} exits in a row, see {part.runner.log_path})"
                if part.crash_looping
                else ""
            )
            self.say(f"agentplex: {part.name} {what}; restarting in {delay:g}s{loop_note}")
            await asyncio.sleep(delay)
            try:
                async with part._lock:
                    if self.stopping():
                        return
                    await self._launch(part)
            except Exception as exc:  # whatever failed the start, the part must come back
                part.exits_in_a_row += 1
                part.restarts += 1
                if isinstance(exc, LaunchError):
                    log.warning("%s failed to restart: %s", part.name, exc)
                else:
                    log.exception("%s failed to restart", part.name)
                process = part.runner.process
                code = process.returncode if process is not None else None
                continue
            part.restarts += 1
            self.say(
                f"agentplex: {part.name} is back at {part.runner.address or '-'} "
                f"(restart {part.restarts})"
            )
            return

    def _record_exit(self, part: Supervised, code: int | None) -> None:
        if code is not None:
            part.last_exit_code = code
        if time.monotonic() - part._up_since >= STABLE_SECONDS:
            part.exits_in_a_row = 0
        part.exits_in_a_row += 1

    def _backoff(self, part: Supervised) -> float:
        return min(
            self.backoff_seconds * 2.0 ** max(part.exits_in_a_row - 1, 0), self.backoff_max_seconds
        )

    async def restart(self, name: str) -> list[Supervised]:
        """Restart `name` gracefully; a group one replica at a time. Returns the parts.

        After each one, `settle` (when set) waits until callers reach it again,
        e.g. until the gateway routes to it: serving by its own health check is
        not yet taking traffic. A replica that fails to come back stops the
        rolling restart there (the remaining replicas keep serving) and raises
        LaunchError; the supervisor keeps trying to start it, as after a crash.
        """
        parts = self.find(name)
        # One restart at a time: two overlapping rolling restarts of a group could
        # otherwise take down a replica each, and with them the whole group.
        async with self._restarting:
            for part in parts:
                await self._restart_one(part)
                if self.settle is not None:
                    await self.settle(part)
        return parts

    async def _restart_one(self, part: Supervised) -> None:
        async with part._lock:
            if self._stopping:
                raise SupervisorStopping("the mesh is stopping")
            await _cancel(part._watch)
            part.state = State.STOPPING
            await part.runner.stop(graceful=True)
            process = part.runner.process
            if process is not None and process.returncode is not None:
                part.last_exit_code = process.returncode
            part.restarts += 1
            part.exits_in_a_row = 0
            try:
                await self._launch(part)
            except Exception as exc:
                part.exits_in_a_row = 1
                if isinstance(exc, LaunchError):
                    raise
                raise LaunchError(f"{part.name} failed to start: {exc!r}") from exc
            finally:
                # Watching again either way: a failed start is retried with backoff.
                self._start_watch(part)

    async def stop(self) -> None:
        """Stop every part, in reverse start order, without the drain delay; idempotent."""
        self._stopping = True
        parts, self._parts = self._parts, []
        for part in parts:
            await _cancel(part._watch)
        for part in reversed(parts):
            part.state = State.STOPPING
            try:
                await part.runner.stop(graceful=False)
            except Exception:
                log.exception("%s: stop failed", part.name)
            part.state = State.STOPPED
        self._parts = parts  # still listed (as stopped) for a final `ps`


def _report_watch_death(task: asyncio.Task[None]) -> None:
    """A watcher only ends when the mesh stops; anything else must be seen."""
    if not task.cancelled() and task.exception() is not None:
        log.error("supervising %s failed", task.get_name(), exc_info=task.exception())


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
