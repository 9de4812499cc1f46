"""The entry point every service process shares: arguments, settings, logs, run.

`python -m agentplex.<service>` parses the same flags everywhere (`--port`,
`--metrics-port`, `--ready-file`), reads settings once, sets up JSON logs and
tracing under the service's name, and builds the service inside the event
loop (gRPC channels and Redis clients bind to the loop that creates them).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from agentplex.runtime import loop as event_loop
from agentplex.runtime.server import ServiceHost
from agentplex.runtime.settings import Settings
from agentplex.runtime.telemetry import configure_logging, configure_tracing

Build = Callable[[Settings, argparse.Namespace], Awaitable[ServiceHost]]


def service_main(
    prog: str,
    build: Build,
    *,
    name: Callable[[argparse.Namespace], str] | str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> None:
    parser = argparse.ArgumentParser(prog=prog)
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0 = any free port)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0 = any)")
    parser.add_argument("--ready-file", type=Path, help="write the bound address here once serving")
    args = parser.parse_args(argv)
    settings = Settings()
    service = name(args) if callable(name) else name
    configure_logging(service, settings.log_level)
    configure_tracing(service, settings.trace_exporter)

    async def run() -> None:
        host = await build(settings, args)
        await host.serve_until_signalled(args.ready_file)

    try:
        event_loop.run(run())
    except OSError as exc:  # e.g. the port is taken: one readable line, not a traceback
        logging.getLogger(service).error("cannot start: %s", exc)
        sys.exit(1)
