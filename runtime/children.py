"""Stopping the child processes a launcher started (services, Redis, Envoy, the model server)."""

from __future__ import annotations

import asyncio
import contextlib
import signal


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
