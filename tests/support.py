"""Small helpers for tests: polling instead of sleeping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def eventually(
    condition: Callable[[], Awaitable[bool] | bool],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition not met",
) -> None:
    """Poll `condition` until it holds; fail with `message` after `timeout` seconds."""
    give_up = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > give_up:
            raise AssertionError(f"{message} within {timeout}s")
        await asyncio.sleep(interval)
