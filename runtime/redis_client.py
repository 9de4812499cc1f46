"""One way to open Redis: every client has socket timeouts.

Without them a half-dead connection can hang a call forever (and with it a
health check, a heartbeat or a shutdown). Five seconds is well above the
longest blocking read we issue (a one-second XREAD).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

SOCKET_TIMEOUT_SECONDS = 5.0
# Headroom for bursts: watchers share one blocking read (tasks/event_feed.py),
# but each still makes short reads of its own, as do runners and workers.
MAX_CONNECTIONS = 2000


def answers(redis: aioredis.Redis) -> Callable[[], Awaitable[None]]:
    """A health dependency check: Redis answers a PING."""

    async def check() -> None:
        await redis.ping()

    return check


def as_bytes(value: bytes | str) -> bytes:
    """A reply as bytes. Our clients never decode replies (`connect` sets no
    decode_responses), but redis-py types every reply as `bytes | str`."""
    return value if isinstance(value, bytes) else value.encode()


def as_text(value: bytes | str) -> str:
    """A reply (a key, a name) as text; see `as_bytes`."""
    return value.decode() if isinstance(value, bytes) else value


def connect(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
        health_check_interval=30,
        max_connections=MAX_CONNECTIONS,
    )
