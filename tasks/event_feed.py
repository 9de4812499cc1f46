"""`EventFeed`: one blocking Redis read per agent process, for all of its watchers.

A WatchTask that blocks in its own `XREAD` holds a Redis connection for as
long as it waits: a thousand open watches are a thousand connections, on the
agent and on Redis, and a thousand reads of every event batch. Here one
reader per process blocks in a single `XREAD` over every watched task's event
stream, from the position it has delivered up to, and hands each batch to the
subscribers of that stream; a thousand watches cost one connection and one
read per batch.

A subscription delivers the stream's entries *after the position at which it
was made* (`Subscription.start`); a watcher whose cursor is behind that reads
the gap itself (`XRANGE`) before taking from the subscription, and skips
anything at or before its cursor, so it sees every event once, in order.

New streams join the read in flight through `CLIENT UNBLOCK` of the reader's
connection (one per burst of new subscriptions). A subscriber that falls more
than `max_pending` entries behind is dropped and told so (`Lagged`); it reads
on by itself and subscribes again. If Redis fails the reader, it retries, and
the watchers, who wait with a timeout, check the task themselves meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agentplex.runtime.errors import Unavailable
from agentplex.tasks.store import StreamEntry, StreamId, format_id, parse_id, streams_read

log = logging.getLogger(__name__)

READER_NAME = "agentplex-event-feed"
# How long the reader blocks before reading again (new streams interrupt it sooner).
READER_BLOCK_MS = 1_000  # well under the clients' 5 s socket timeout
# Entries per stream per read.
READER_BATCH = 256
# Pause before the reader tries again after Redis failed it.
READER_RETRY_SECONDS = 0.5


class Lagged(Exception):
    """The subscriber fell too far behind and was dropped; read on without the feed."""


@dataclass(eq=False)
class Subscription:
    key: str
    # Entries after this position are delivered; earlier ones are the watcher's to read.
    start: StreamId
    max_pending: int
    _entries: asyncio.Queue[Sequence[StreamEntry] | None] = field(default_factory=asyncio.Queue)
    _pending: int = 0
    lagged: bool = False

    def _deliver(self, entries: Sequence[StreamEntry]) -> None:
        self._pending += len(entries)
        if self._pending > self.max_pending:
            self.lagged = True
            self._entries.put_nowait(None)
        else:
            self._entries.put_nowait(entries)

    async def next(self, timeout: float) -> Sequence[StreamEntry]:
        """The next delivered entries; [] after `timeout`; raises Lagged if dropped."""
        try:
            entries = await asyncio.wait_for(self._entries.get(), timeout)
        except TimeoutError:
            return []
        if entries is None:
            raise Lagged(f"watcher of {self.key} fell more than {self.max_pending} entries behind")
        self._pending -= len(entries)
        return entries


@dataclass
class _Stream:
    position: StreamId
    subscribers: set[Subscription] = field(default_factory=set)


class EventFeed:
    def __init__(self, redis: aioredis.Redis, *, max_pending: int = 10_000) -> None:
        self._redis = redis
        self._max_pending = max_pending
        self._streams: dict[str, _Stream] = {}
        self._reader: asyncio.Task[None] | None = None
        self._reader_id: int | None = None
        # Streams (and positions) of the XREAD now blocking; None when not blocked.
        self._reading: dict[str, StreamId] | None = None
        self._interrupting = False
        self._wanted = asyncio.Event()
        self._closed = False

    def subscribe(self, key: str, after: bytes | str) -> Subscription:
        """Entries of stream `key` from now on, delivered after `Subscription.start`."""
        if self._closed:
            raise Unavailable("this agent is shutting down: watch again (another replica answers)")
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(parse_id(after))
        subscription = Subscription(key, stream.position, self._max_pending)
        stream.subscribers.add(subscription)
        self._wanted.set()
        if self._reader is None or self._reader.done():
            # Its own, empty context: it serves every watcher, not the first one's
            # principal or trace.
            self._reader = asyncio.create_task(
                self._read_forever(), name="event-feed", context=contextvars.Context()
            )
        elif self._not_covered(key):
            self._interrupt()
        return subscription

    def _not_covered(self, key: str) -> bool:
        """Whether the read in flight misses `key`, or reads it from further on."""
        reading, stream = self._reading, self._streams.get(key)
        if reading is None or stream is None:
            return False
        return key not in reading or reading[key] > stream.position

    def unsubscribe(self, subscription: Subscription) -> None:
        stream = self._streams.get(subscription.key)
        if stream is None:
            return
        stream.subscribers.discard(subscription)
        if not stream.subscribers:
            # Left in a read in flight, its entries are simply dropped on arrival.
            del self._streams[subscription.key]

    def streams(self) -> int:
        """Streams being read for at least one subscriber."""
        return len(self._streams)

    async def close(self) -> None:
        self._closed = True
        self._wanted.set()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for stream in self._streams.values():
            for subscription in stream.subscribers:
                subscription.lagged = True
                subscription._entries.put_nowait(None)
        self._streams.clear()

    def _interrupt(self) -> None:
        if self._interrupting or self._reader_id is None:
            return  # already on its way, or not yet blocked (the next read sees the stream)
        self._interrupting = True
        asyncio.get_running_loop().create_task(self._unblock(self._reader_id))

    def _missing_from_read(self) -> bool:
        return any(self._not_covered(key) for key in self._streams)

    async def _unblock(self, client_id: int) -> None:
        # The read may not have reached Redis yet (CLIENT UNBLOCK then finds nothing
        # blocked): try again shortly, while the read in flight still lacks a stream.
        try:
            for _ in range(100):
                if await self._redis.client_unblock(client_id) or not self._missing_from_read():
                    return
                await asyncio.sleep(0.002)
        except (RedisError, OSError) as exc:
            # The reader still comes back within READER_BLOCK_MS.
            log.debug("could not interrupt the event feed's read: %s", exc)
        finally:
            self._interrupting = False

    async def _read_forever(self) -> None:
        connection = self._redis.client()
        try:
            while not self._closed:
                try:
                    await self._read_once(connection)
                except Exception as exc:  # Redis failing, or a bug: never leave watchers unfed
                    log.warning("event feed read failed (%s); retrying", exc, exc_info=exc)
                    self._reader_id = None
                    with contextlib.suppress(Exception):
                        await connection.aclose()
                    connection = self._redis.client()
                    await asyncio.sleep(READER_RETRY_SECONDS)
        finally:
            self._reading = None
            with contextlib.suppress(Exception):
                await connection.aclose()

    async def _read_once(self, connection: aioredis.Redis) -> None:
        if not self._streams:
            self._wanted.clear()
            await self._wanted.wait()
            return
        if self._reader_id is None:
            await connection.client_setname(READER_NAME)
            self._reader_id = int(await connection.client_id())
        reading = {key: stream.position for key, stream in self._streams.items()}
        self._reading, self._interrupting = reading, False
        try:
            found = await connection.xread(
                {key: format_id(position) for key, position in reading.items()},
                count=READER_BATCH,
                block=READER_BLOCK_MS,
            )
        finally:
            self._reading = None
        for key, entries in streams_read(found):
            stream = self._streams.get(key)
            if stream is None or not entries or stream.position < reading.get(key, (0, 0)):
                # Nobody left, or the stream was dropped and subscribed again from further
                # back than this read began: its entries would leave a hole. Next read.
                continue
            fresh = [entry for entry in entries if parse_id(entry[0]) > stream.position]
            if not fresh:
                continue
            stream.position = parse_id(fresh[-1][0])
            for subscription in list(stream.subscribers):
                subscription._deliver(fresh)
                if subscription.lagged:
                    stream.subscribers.discard(subscription)
            if not stream.subscribers:
                del self._streams[key]
