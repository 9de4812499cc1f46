"""Run a command that dies with the process that started it.

`agentplex up` starts every part through this: `python -m
agentplex.runtime.orphan_guard PARENT_PID -- COMMAND...` asks Linux to send
the command SIGINT when its parent dies (PR_SET_PDEATHSIG, kept across exec),
then execs it, so the part keeps its pid and nothing stays in between. A
launcher killed with SIGKILL can run no cleanup at all; without this its
children would live on, holding the mesh's ports. SIGINT is the quick stop
(no drain delay: with the launcher gone there is nowhere to drain to).
Elsewhere than Linux the command simply runs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Sequence

PR_SET_PDEATHSIG = 1
DEATH_SIGNAL = signal.SIGINT
EXIT_PARENT_GONE = 125
EXIT_USAGE = 2
USAGE = "agentplex.runtime.orphan_guard PARENT_PID -- COMMAND..."


def guarded(command: Sequence[str], parent_pid: int | None = None) -> list[str]:
    """`command`, wrapped so it gets SIGINT when `parent_pid` (default: this process) dies."""
    parent = os.getpid() if parent_pid is None else parent_pid
    return [sys.executable, "-m", __name__, str(parent), "--", *command]


def die_with_parent(parent_pid: int) -> bool:
    """Arrange DEATH_SIGNAL on the parent's death; False if the parent is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(DEATH_SIGNAL), 0, 0, 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    # The parent may have died before prctl took effect: then we were re-parented.
    return os.getppid() == parent_pid


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--" or not args[0].isdigit():
        print(
            "usage: python -m agentplex.runtime.orphan_guard PARENT_PID -- COMMAND...",
            file=sys.stderr,
        )
        sys.exit(EXIT_USAGE)
    if not die_with_parent(int(args[0])):
        sys.exit(EXIT_PARENT_GONE)
    command = args[2:]
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
