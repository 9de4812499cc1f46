"""One way to open Redis: every client has socket timeouts.

Without them a half-dead connection can hang a call forever (and with it a
health check, a heartbeat or a shutdown). Five seconds is well above the
longest blocking read we issue (a one-second XREAD).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

SOCKET_TIMEOUT_SECONDS = 5.0
# Each open WatchTask holds a connection during its blocking read, so the pool
# must be larger than redis-py's default of 100.
MAX_CONNECTIONS = 2000


def answers(redis: aioredis.Redis) -> Callable[[], Awaitable[None]]:
    """A health dependency check: Redis answers a PING."""

    async def check() -> None:
        await redis.ping()

    return check


def connect(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
        health_check_interval=30,
        max_connections=MAX_CONNECTIONS,
    )
