"""Children of a launcher die with it, even when the launcher is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from agentplex.runtime.orphan_guard import EXIT_PARENT_GONE, EXIT_USAGE, guarded

# A launcher in miniature: starts a guarded child, reports its pid, then waits.
PARENT = """
import subprocess, sys, time
from agentplex.runtime.orphan_guard import guarded
child = subprocess.Popen(guarded([sys.executable, "-c", "import time; time.sleep(120)"]))
print(child.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): look at its state.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_a_child_dies_when_its_launcher_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        give_up = time.monotonic() + 10
        while alive(child) and time.monotonic() < give_up:
            time.sleep(0.02)
        assert not alive(child), "the child outlived its SIGKILLed launcher"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_guarded_command_keeps_the_pid_and_exit_code() -> None:
    # exec, not a child of its own: a supervisor's pid and exit status are the part's.
    command = guarded([sys.executable, "-c", "import os, sys; print(os.getpid()); sys.exit(7)"])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 7
    assert int(out) == process.pid


def test_a_command_whose_parent_is_already_gone_does_not_start() -> None:
    # The guard is told a parent that is not its own: as if it had died before prctl.
    done = subprocess.run(
        guarded(["true"], parent_pid=1), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == EXIT_PARENT_GONE


def test_usage() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agentplex.runtime.orphan_guard", "x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == EXIT_USAGE and "PARENT_PID -- COMMAND" in done.stderr
