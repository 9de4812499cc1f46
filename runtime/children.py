"""Starting and stopping the child processes a launcher runs (services, Redis, Envoy,
the model server): each in its own session, each dying with its launcher."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

from agentplex.runtime.orphan_guard import guarded


async def spawn(*command: str, **kwargs: Any) -> asyncio.subprocess.Process:
    """Start `command` in its own session (Ctrl-C reaches only the launcher, which stops
    its children in order) and bound to this process's life (see orphan_guard)."""
    return await asyncio.create_subprocess_exec(*guarded(command), start_new_session=True, **kwargs)


async def terminate(
    process: asyncio.subprocess.Process,
    *,
    timeout: float,
    sig: signal.Signals = signal.SIGTERM,
) -> None:
    """`sig` (SIGTERM: a graceful drain; SIGINT: agentplex parts skip the drain delay),
    then SIGKILL if it outlasts `timeout`; idempotent."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)
    try:
        await asyncio.wait_for(process.wait(), timeout=timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
