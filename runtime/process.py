"""The one lifecycle every agentplex process main shares.

`python -m agentplex.<part>` (services, task workers, the gateway's control
plane) parses the same flags (`--port`, `--metrics-port`, `--ready-file`),
reads settings once, sets up JSON logs and tracing under the process's name,
then builds its part inside the event loop (gRPC channels and Redis clients
bind to the loop that creates them) and runs it: start, publish the bound
address in the ready file, run until SIGTERM or SIGINT, stop gracefully.
Stopping runs every step even when one fails, so one broken cleanup never
leaves the others undone. The launcher (`agentplex up`) is a process too and
stops on the same signals, through the same helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import ValidationError

from agentplex.runtime import audit
from agentplex.runtime import loop as event_loop
from agentplex.runtime.settings import Settings
from agentplex.runtime.telemetry import configure_logging, configure_tracing_from

log = logging.getLogger(__name__)

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# SIGTERM is the graceful stop (drain delay, then grace), as Kubernetes sends it;
# SIGINT (Ctrl-C, or `agentplex up` stopping the whole mesh) skips the drain
# delay: when every replica is going away there is nowhere to drain to.
QUICK_STOP_SIGNAL = signal.SIGINT
_quick_stop = False
EXIT_CANNOT_START = 1
EXIT_BAD_SETTINGS = 2
EXIT_STOP_OVERRAN = 3
# Beyond the drain delay and the grace period, what the last stop steps (closing
# connections, withdrawing from the registry) may take before the process exits anyway.
STOP_OVERRUN_SECONDS = 10.0


class CannotStart(Exception):
    """The part cannot start for a reason its operator must fix; one log line, exit 1."""


@dataclass(frozen=True)
class Endpoint:
    """Where a started part listens."""

    address: str
    metrics_port: int | None


class ProcessPart(Protocol):
    """What a process main builds: `ServiceHost`, a task worker, the control plane."""

    async def start(self) -> Endpoint:
        """Serve; on failure part-way, whatever was started is stopped again."""
        ...

    async def run(self, stop: asyncio.Event) -> None:
        """Do the part's work until `stop` is set (a server just waits)."""
        ...

    async def stop(self) -> None:
        """Drain and release everything; safe to call more than once."""
        ...


Build = Callable[[Settings, argparse.Namespace], Awaitable[ProcessPart]]


def run_process(
    prog: str,
    build: Build,
    *,
    name: Callable[[argparse.Namespace], str] | str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    port_help: str = "gRPC port (0 = any free port)",
    argv: Sequence[str] | None = None,
) -> None:
    """Parse, configure, then serve what `build` returns until SIGTERM/SIGINT; exits on error.

    Exit codes: 0 after a graceful stop, 1 when the part cannot start (a
    taken port, `CannotStart`: one readable log line, not a traceback), 2
    for bad arguments or settings.
    """
    parser = argparse.ArgumentParser(prog=prog)
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("--port", type=int, help=f"{port_help}; default $AGENTPLEX_PORT")
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus port (0 = any); default $AGENTPLEX_METRICS_PORT",
    )
    parser.add_argument("--ready-file", type=Path, help="write the bound address here once serving")
    args = parser.parse_args(argv)
    settings = read_settings(prog)
    # Flags win over the environment (a container sets AGENTPLEX_PORT, `agentplex up` flags).
    if args.port is None:
        args.port = settings.port
    if args.metrics_port is None:
        args.metrics_port = settings.metrics_port
    process = name(args) if callable(name) else name
    configure_logging(process, settings.log_level)
    if settings.audit_log_file is not None:
        audit.write_to(settings.audit_log_file, process)
    configure_tracing_from(process, settings)

    async def main() -> None:
        stop = asyncio.Event()
        stop_on_signals(
            stop,
            name=process,
            exit_after=settings.drain_seconds + settings.grace_seconds + STOP_OVERRUN_SECONDS,
        )
        part = await build(settings, args)
        await serve(part, stop, args.ready_file)

    try:
        event_loop.run(main(), settings)
    except (OSError, CannotStart) as exc:
        logging.getLogger(process).error("cannot start: %s", exc)
        sys.exit(EXIT_CANNOT_START)


def read_settings(prog: str) -> Settings:
    """Settings from the environment, or a readable message and exit 2."""
    try:
        return Settings()
    except ValidationError as exc:
        print(f"{prog}: invalid settings: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_SETTINGS)


async def serve(part: ProcessPart, stop: asyncio.Event, ready_file: Path | None = None) -> None:
    """Start `part`, announce it, run it until `stop`, then stop it, whatever happened.

    A stop that arrives while the part is still starting cancels the start
    (a stopping launcher must not wait out a slow dependency).
    """
    try:
        endpoint = await until_stopped(part.start(), stop)
        if endpoint is not None:
            if ready_file is not None:
                write_ready_file(ready_file, endpoint)
            await part.run(stop)
    finally:
        await part.stop()


async def until_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """`work`'s result, or None (with `work` cancelled) if `stop` is set first."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (stopped, task):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
    return task.result() if not task.cancelled() else None


def stop_on_signals(
    stop: asyncio.Event, *, name: str | None = None, exit_after: float | None = None
) -> None:
    """Set `stop` on SIGTERM or SIGINT (the event loop must be running).

    SIGINT also marks the stop as quick (`quick_stop_requested`).
    With a `name`, the first signal is logged as "<name> received a stop
    signal; draining"; later ones change nothing (the drain is under way).
    With `exit_after`, a process still alive that many seconds after the first
    signal exits anyway (`exit_if_still_stopping`).
    """
    loop = asyncio.get_running_loop()

    def received(sig: signal.Signals) -> None:
        global _quick_stop
        if sig == QUICK_STOP_SIGNAL:
            _quick_stop = True
        if not stop.is_set():
            if name is not None:
                log.info("%s received a stop signal; draining", name, extra={"signal": sig.name})
            if exit_after is not None:
                exit_if_still_stopping(name or "process", exit_after)
        stop.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, received, sig)


def exit_if_still_stopping(name: str, seconds: float) -> None:
    """Exit the process `seconds` from now if it has not exited by then.

    A stop is bounded by the drain delay and the grace period; a step that
    hangs beyond them (a dependency that never answers, a stuck thread) must
    not keep the process, its ports and its leases forever, as Kubernetes ends
    a pod its grace period did not. A thread, so a blocked event loop cannot
    hold it up.
    """

    def overdue() -> None:
        log.error("%s did not stop within %.0fs of the stop signal; exiting", name, seconds)
        logging.shutdown()
        os._exit(EXIT_STOP_OVERRAN)

    timer = threading.Timer(seconds, overdue)
    timer.daemon = True
    timer.start()


def quick_stop_requested() -> bool:
    """True once this process got SIGINT: stop without the drain delay (signals are per process)."""
    return _quick_stop


async def stop_each(owner: str, steps: Sequence[Callable[[], Awaitable[object]]]) -> bool:
    """Run every stop step in order, even when an earlier one fails; True if all succeeded.

    Each failure is logged with the step's name and the owner's, then the
    next step runs: a registry withdraw that raises must not leave a Redis
    connection open. Cancellation still stops the sequence.
    """
    ok = True
    for step in steps:
        try:
            await step()
        except Exception:
            ok = False
            log.exception("%s: stop step %s failed", owner, step_name(step))
    return ok


def step_name(step: Callable[..., object]) -> str:
    """A readable name for a hook: module and qualified name when it has them."""
    qualname = getattr(step, "__qualname__", None)
    if qualname is None:
        return repr(step)
    module = getattr(step, "__module__", None)
    return f"{module}.{qualname}" if module else qualname


def write_ready_file(path: Path, endpoint: Endpoint) -> None:
    """Publish the bound address atomically, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(
        json.dumps(
            {"address": endpoint.address, "metrics_port": endpoint.metrics_port, "pid": os.getpid()}
        )
    )
    tmp.replace(path)
