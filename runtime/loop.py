"""The event loop every agentplex process runs on.

uvloop when it is installed (it is a dependency on Linux and macOS), the
standard loop otherwise or when `AGENTPLEX_EVENT_LOOP=asyncio` asks for it.
Why: the mesh's cost is per-call machinery on the event loop, spread over
many gRPC hops and Redis round trips, and uvloop cut a bare grpc.aio echo's
p50 by ~15 % on the benchmark machine (docs/BENCHMARKS.md, "Changes
measured", where it is measured with and without dropped spans).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

from agentplex.runtime.settings import Settings

T = TypeVar("T")

LoopName = Literal["uvloop", "asyncio"]


def chosen(settings: Settings | None = None) -> LoopName:
    """The loop `run` will use, by `settings.event_loop` (AGENTPLEX_EVENT_LOOP).

    Without settings they are read here (commands that need no others).
    """
    wanted = (settings or Settings()).event_loop
    available = importlib.util.find_spec("uvloop") is not None
    if wanted == "uvloop" and not available:
        raise ValueError("AGENTPLEX_EVENT_LOOP=uvloop, but uvloop is not installed")
    if wanted == "asyncio" or not available:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T], settings: Settings | None = None) -> T:
    """`asyncio.run`, on the chosen loop."""
    try:
        name = chosen(settings)
    except BaseException:
        main.close()  # it will never run: no "never awaited" warning on top of the error
        raise
    if name == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
