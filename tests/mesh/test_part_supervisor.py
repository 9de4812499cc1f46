"""The supervisor with real processes: restarts after exits, backoff and crash loops,
graceful and rolling restarts, stopping everything."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agentplex.mesh.supervisor import (
    CRASH_LOOP_EXITS,
    LaunchError,
    State,
    Supervised,
    Supervisor,
    SupervisorStopping,
    UnknownPart,
)
from agentplex.runtime.children import spawn, terminate

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


class ProcessRunner:
    """A Runner over a real child process; records what the supervisor asked of it."""

    def __init__(
        self,
        name: str,
        *,
        group: str | None = None,
        command: list[str] | None = None,
        journal: list[str] | None = None,
        fail_launches: int = 0,
    ) -> None:
        self.name = name
        self.group = group or name
        self.log_path: Path | None = None
        self.command = command or SLEEPER
        self.journal = journal if journal is not None else []
        self.fail_launches = fail_launches
        self.launches = 0
        self.stops: list[bool] = []
        self._process: asyncio.subprocess.Process | None = None

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        return self._process

    @property
    def address(self) -> str:
        return f"pid:{self._process.pid}" if self._process else ""

    async def launch(self) -> None:
        self.launches += 1
        if self.fail_launches:
            self.fail_launches -= 1
            raise LaunchError(f"{self.name} refused to start")
        self._process = await spawn(*self.command)
        self.journal.append(f"up {self.name}")

    async def stop(self, *, graceful: bool) -> None:
        self.stops.append(graceful)
        if self._process is not None and self._process.returncode is None:
            self.journal.append(f"down {self.name}")
        if self._process is not None:
            await terminate(self._process, timeout=5)


@pytest.fixture
def said() -> list[str]:
    return []


@pytest.fixture
async def supervisor(said: list[str]) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(backoff_seconds=0.05, backoff_max_seconds=0.2, say=said.append)
    try:
        yield supervisor
    finally:
        await supervisor.stop()


async def until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while not condition():
        if loop.time() > give_up:
            raise AssertionError(f"{what} within {timeout}s")
        await asyncio.sleep(0.02)


async def test_a_killed_part_is_started_again_and_counted(
    supervisor: Supervisor, said: list[str]
) -> None:
    runner = ProcessRunner("memory")
    part = await supervisor.add(runner)
    first = part.pid
    assert part.state is State.RUNNING and first > 0

    assert runner.process is not None
    runner.process.send_signal(signal.SIGKILL)

    await until(lambda: part.restarts == 1 and part.state is State.RUNNING, "restarted")
    assert part.pid not in (0, first)
    assert part.last_exit_code == -signal.SIGKILL
    assert any("memory exited (code -9); restarting" in line for line in said)


async def test_a_crash_loop_backs_off_and_is_reported(
    supervisor: Supervisor, said: list[str]
) -> None:
    runner = ProcessRunner("registry", command=[sys.executable, "-c", "raise SystemExit(3)"])
    part = await supervisor.add(runner)

    await until(lambda: part.restarts >= CRASH_LOOP_EXITS + 1, "several restarts")
    assert part.crash_looping
    assert part.last_exit_code == 3
    assert any("crash loop" in line for line in said)
    # The backoff doubles, capped: 0.05, 0.1, 0.2, 0.2 ...
    delays = [
        line.split("restarting in ")[1].split("s")[0] for line in said if "restarting in" in line
    ]
    assert delays[:4] == ["0.05", "0.1", "0.2", "0.2"]


async def test_a_failed_relaunch_is_retried(supervisor: Supervisor) -> None:
    runner = ProcessRunner("tools")
    part = await supervisor.add(runner)
    runner.fail_launches = 2
    assert runner.process is not None
    runner.process.send_signal(signal.SIGKILL)

    await until(lambda: part.state is State.RUNNING and runner.launches == 4, "back up")
    assert part.restarts == 3  # two failed starts and the one that held


async def test_restart_is_graceful_and_returns_once_serving(supervisor: Supervisor) -> None:
    runner = ProcessRunner("assistant")
    part = await supervisor.add(runner)
    before = part.pid

    [restarted] = await supervisor.restart("assistant")

    assert restarted is part and part.state is State.RUNNING
    assert part.pid not in (0, before)
    assert runner.stops == [True]  # SIGTERM: the part drains
    assert part.restarts == 1 and not part.crash_looping
    # A requested restart is not a crash: the old process's exit was not watched.
    assert (runner.launches == 2 and part.last_exit_code == 0) or part.last_exit_code == -15


async def test_replicas_restart_one_at_a_time(supervisor: Supervisor) -> None:
    journal: list[str] = []
    for name in ("assistant", "assistant-2", "assistant-3"):
        await supervisor.add(ProcessRunner(name, group="assistant", journal=journal))
    await supervisor.add(ProcessRunner("researcher", journal=journal))
    journal.clear()

    parts = await supervisor.restart("assistant")

    assert [part.name for part in parts] == ["assistant", "assistant-2", "assistant-3"]
    # Each replica serves again before the next one stops; the others are untouched.
    assert journal == [
        "down assistant",
        "up assistant",
        "down assistant-2",
        "up assistant-2",
        "down assistant-3",
        "up assistant-3",
    ]
    [one] = await supervisor.restart("assistant-2")
    assert one.name == "assistant-2"


async def test_overlapping_restarts_never_stop_two_replicas_at_once(
    supervisor: Supervisor,
) -> None:
    journal: list[str] = []
    for name in ("assistant", "assistant-2"):
        await supervisor.add(ProcessRunner(name, group="assistant", journal=journal))
    journal.clear()

    await asyncio.gather(supervisor.restart("assistant"), supervisor.restart("assistant"))

    # Whatever the order, every "down" is followed by its own "up" before the next "down".
    assert len(journal) == 8
    for down, up in zip(journal[::2], journal[1::2], strict=True):
        assert down.startswith("down ") and up == "up " + down.removeprefix("down ")


async def test_settle_runs_after_each_replica(supervisor: Supervisor) -> None:
    journal: list[str] = []
    for name in ("assistant", "assistant-2"):
        await supervisor.add(ProcessRunner(name, group="assistant", journal=journal))
    journal.clear()

    async def settle(part: Supervised) -> None:
        journal.append(f"settled {part.name}")

    supervisor.settle = settle
    await supervisor.restart("assistant")
    assert journal == [
        "down assistant",
        "up assistant",
        "settled assistant",
        "down assistant-2",
        "up assistant-2",
        "settled assistant-2",
    ]


async def test_a_start_that_fails_unexpectedly_is_retried_not_dropped(
    supervisor: Supervisor,
) -> None:
    class Flaky(ProcessRunner):
        async def launch(self) -> None:
            if self.launches == 1:  # the relaunch after the kill
                self.launches += 1
                raise OSError("no space left on device")
            await super().launch()

    runner = Flaky("tools")
    part = await supervisor.add(runner)
    assert runner.process is not None
    runner.process.send_signal(signal.SIGKILL)

    await until(lambda: part.state is State.RUNNING and runner.launches == 3, "back up")
    assert part.restarts == 2


async def test_unknown_names_are_refused_with_the_known_ones(supervisor: Supervisor) -> None:
    await supervisor.add(ProcessRunner("memory"))
    with pytest.raises(UnknownPart, match=r"no part or group named 'memroy'.*memory"):
        await supervisor.restart("memroy")


async def test_stop_stops_everything_in_reverse_and_restarts_nothing(
    supervisor: Supervisor,
) -> None:
    journal: list[str] = []
    runners = [ProcessRunner(name, journal=journal) for name in ("redis", "memory", "agent")]
    for runner in runners:
        await supervisor.add(runner)
    journal.clear()

    await supervisor.stop()

    assert journal == ["down agent", "down memory", "down redis"]
    assert all(runner.stops == [False] for runner in runners)  # quick: no drain delay
    assert all(part.state is State.STOPPED and part.pid == 0 for part in supervisor.parts)
    assert all(runner.launches == 1 for runner in runners)
    with pytest.raises(SupervisorStopping):
        await supervisor.add(ProcessRunner("late"))


async def test_a_first_start_that_fails_is_still_tracked(supervisor: Supervisor) -> None:
    with pytest.raises(LaunchError, match="refused"):
        await supervisor.add(ProcessRunner("memory", fail_launches=1))
    assert [part.name for part in supervisor.parts] == ["memory"]
