"""EventFeed against a real Redis: one blocking read for many watchers, nothing lost."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from agentplex.runtime.errors import Unavailable
from agentplex.tasks import event_feed
from agentplex.tasks.event_feed import READER_NAME, EventFeed, Lagged, Subscription
from agentplex.tasks.store import parse_id


@pytest.fixture
async def feed(redis_client: aioredis.Redis) -> AsyncIterator[EventFeed]:
    feed = EventFeed(redis_client)
    yield feed
    await feed.close()


@pytest.fixture
async def blocking_feed(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[EventFeed, aioredis.Redis]]:
    """A feed whose reads block for a minute (no socket timeout to end them sooner):
    only an interrupt gets a new stream into the read in flight."""
    monkeypatch.setattr(event_feed, "READER_BLOCK_MS", 60_000)
    client = aioredis.Redis.from_url(redis_url, socket_timeout=None)
    feed = EventFeed(client)
    yield feed, client
    await feed.close()
    await client.aclose()


def stream_key() -> str:
    return f"test-feed-{uuid.uuid4().hex[:10]}"


async def add(redis: aioredis.Redis, key: str, *sequences: int) -> None:
    for sequence in sequences:
        await redis.xadd(key, {"e": str(sequence)}, id=f"0-{sequence}")


async def received(subscription: Subscription, until: int) -> list[int]:
    """Sequences delivered to `subscription`, up to and including `until`."""
    seen: list[int] = []
    while not seen or seen[-1] < until:
        entries = await subscription.next(timeout=10)
        assert entries, f"nothing delivered after {seen}"
        seen += [parse_id(entry_id)[1] for entry_id, _ in entries]
    return seen


async def reader_connections(redis: aioredis.Redis) -> int:
    return sum(1 for client in await redis.client_list() if client.get("name") == READER_NAME)


async def test_many_watchers_of_many_streams_share_one_blocking_read(
    feed: EventFeed, redis_client: aioredis.Redis
) -> None:
    keys = [stream_key() for _ in range(20)]
    subscriptions = [feed.subscribe(key, "0-0") for key in keys for _ in range(5)]
    await add(redis_client, keys[0], 1)
    assert await received(subscriptions[0], 1) == [1]  # the reader is up and reading
    for key in keys:
        await add(redis_client, key, 2, 3, 4)
    for subscription in subscriptions:
        # The first stream's other watchers have not taken its first entry yet.
        unread = subscription.key == keys[0] and subscription is not subscriptions[0]
        assert await received(subscription, 4) == ([1] if unread else []) + [2, 3, 4]
    assert await reader_connections(redis_client) == 1
    assert feed.streams() == 20


async def test_a_late_subscriber_starts_where_the_feed_is_and_reads_the_gap_itself(
    feed: EventFeed, redis_client: aioredis.Redis
) -> None:
    key = stream_key()
    early = feed.subscribe(key, "0-0")
    assert early.start == (0, 0)
    await add(redis_client, key, 1, 2, 3)
    assert await received(early, 3) == [1, 2, 3]
    late = feed.subscribe(key, "0-1")  # it has seen 1; the feed is past 3
    assert late.start == (0, 3)
    # Entry ids are bytes: the client does not decode (redis-py's types allow str and None).
    gap = cast(list[tuple[bytes, Any]], await redis_client.xrange(key, min="(0-1", max="0-3"))
    assert [parse_id(entry_id)[1] for entry_id, _ in gap] == [2, 3]
    await add(redis_client, key, 4)
    assert await received(late, 4) == [4]
    assert await received(early, 4) == [4]


async def test_a_new_stream_joins_a_blocked_read_at_once(
    blocking_feed: tuple[EventFeed, aioredis.Redis],
) -> None:
    feed, redis_client = blocking_feed
    first, second = stream_key(), stream_key()
    waiting = feed.subscribe(first, "0-0")
    await add(redis_client, first, 1)
    assert await received(waiting, 1) == [1]  # the reader now blocks on `first` alone
    joined = feed.subscribe(second, "0-0")
    await add(redis_client, second, 1)
    assert await received(joined, 1) == [1]


async def test_a_stream_subscribed_again_from_further_back_gets_no_hole(
    blocking_feed: tuple[EventFeed, aioredis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    feed, redis_client = blocking_feed
    key = stream_key()
    await add(redis_client, key, 1, 2, 3, 4, 5)
    first = feed.subscribe(key, "0-3")
    assert await received(first, 5) == [4, 5]
    feed.unsubscribe(first)  # the read in flight still reads `key`, from 5
    # Subscribed again from 1 before the read in flight is interrupted: that read
    # then returns 6, and delivering it would skip 2–5.
    monkeypatch.setattr(feed, "_interrupt", lambda: None)
    again = feed.subscribe(key, "0-1")
    assert again.start == (0, 1)
    await add(redis_client, key, 6)
    assert await received(again, 6) == [2, 3, 4, 5, 6]


async def test_a_subscriber_that_falls_too_far_behind_is_told(redis_client: aioredis.Redis) -> None:
    feed = EventFeed(redis_client, max_pending=3)
    try:
        key = stream_key()
        slow = feed.subscribe(key, "0-0")
        await add(redis_client, key, 1, 2, 3, 4, 5)
        with pytest.raises(Lagged):
            for _ in range(5):
                await slow.next(timeout=10)
        assert feed.streams() == 0  # dropped: it reads on by itself
    finally:
        await feed.close()


async def test_the_reader_comes_back_after_its_connection_is_killed(
    feed: EventFeed, redis_client: aioredis.Redis, eventually
) -> None:
    key = stream_key()
    watcher = feed.subscribe(key, "0-0")
    await add(redis_client, key, 1)
    assert await received(watcher, 1) == [1]
    for client in await redis_client.client_list():
        if client.get("name") == READER_NAME:
            await redis_client.client_kill_filter(_id=client["id"])
    await add(redis_client, key, 2)
    assert await received(watcher, 2) == [2]
    await eventually(
        lambda: _one_reader(redis_client), timeout=10, message="the reader never came back"
    )


async def _one_reader(redis: aioredis.Redis) -> bool:
    return await reader_connections(redis) == 1


async def test_a_closed_feed_refuses_subscriptions_and_releases_its_watchers(
    redis_client: aioredis.Redis,
) -> None:
    feed = EventFeed(redis_client)
    watcher = feed.subscribe(stream_key(), "0-0")
    await feed.close()
    with pytest.raises(Lagged):
        await watcher.next(timeout=10)
    with pytest.raises(Unavailable, match="shutting down"):
        feed.subscribe(stream_key(), "0-0")
