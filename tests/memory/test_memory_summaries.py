"""MemoryStore positions, reads and summaries against a real Redis: a summary replaces
old turns atomically, and neither concurrent appends nor a racing summarizer lose a
message."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from agentplex.memory.store import MAX_READ_MESSAGES, MemoryStore
from agentplex.runtime.errors import Aborted, InvalidArgument
from agentplex.v1 import memory_pb2

TTL_SECONDS = 3600


def scope(session_id: str = "s-1") -> memory_pb2.SessionScope:
    return memory_pb2.SessionScope(agent="assistant", session_id=session_id)


def msg(content: str, tokens: int = 1) -> memory_pb2.MemoryMessage:
    return memory_pb2.MemoryMessage(role=memory_pb2.ROLE_USER, content=content, token_count=tokens)


def summary(content: str, through: int, tokens: int = 3) -> memory_pb2.ContextSummary:
    return memory_pb2.ContextSummary(
        content=content, token_count=tokens, through_position=through, model="fake/1"
    )


@pytest.fixture
def store(redis_client: aioredis.Redis, key_prefix: str) -> MemoryStore:
    return MemoryStore(
        redis_client,
        key_prefix=key_prefix,
        ttl_seconds=TTL_SECONDS,
        max_messages=1000,
        default_context_tokens=1000,
    )


async def append_all(store: MemoryStore, *contents: str) -> None:
    await store.append(scope(), [msg(c) for c in contents])


# --- positions and reads --------------------------------------------------------------------


async def test_messages_carry_stable_positions(store: MemoryStore) -> None:
    await append_all(store, "a", "b", "c")
    packet = await store.load(scope(), 2)
    assert [(m.content, m.position) for m in packet.messages] == [("b", 1), ("c", 2)]
    assert (packet.next_position, packet.omitted_count, packet.summary) == (3, 1, None)


async def test_positions_survive_the_hard_cap(redis_client, key_prefix) -> None:
    capped = MemoryStore(
        redis_client,
        key_prefix=key_prefix,
        ttl_seconds=TTL_SECONDS,
        max_messages=3,
        default_context_tokens=100,
    )
    await capped.append(scope(), [msg(str(i)) for i in range(5)])
    packet = await capped.load(scope())
    assert [(m.content, m.position) for m in packet.messages] == [("2", 2), ("3", 3), ("4", 4)]
    assert packet.next_position == 5
    read = await capped.read(scope(), 0, 10)  # trimmed positions are skipped
    assert [m.position for m in read.messages] == [2, 3, 4]


async def test_read_from_a_position_is_bounded(store: MemoryStore) -> None:
    await append_all(store, *"abcdef")
    read = await store.read(scope(), 2, 3)
    assert [(m.content, m.position) for m in read.messages] == [("c", 2), ("d", 3), ("e", 4)]
    assert read.next_position == 6
    assert (await store.read(scope(), 6, 5)).messages == []
    assert (await store.read(scope("unknown"), 0, 5)).next_position == 0


@pytest.mark.parametrize(
    ("start", "count"), [(-1, 1), (0, 0), (0, MAX_READ_MESSAGES + 1)], ids=["neg", "0", "big"]
)
async def test_read_rejects_bad_bounds(store: MemoryStore, start: int, count: int) -> None:
    with pytest.raises(InvalidArgument):
        await store.read(scope(), start, count)


# --- summaries ------------------------------------------------------------------------------


async def test_summary_replaces_the_turns_it_covers(store: MemoryStore) -> None:
    await append_all(store, *"abcde")
    stored = await store.store_summary(scope(), summary("a to c", 3, tokens=4), 0)
    assert (stored.removed_count, stored.message_count) == (3, 2)

    packet = await store.load(scope(), 100)
    assert packet.summary is not None
    assert (packet.summary.content, packet.summary.through_position) == ("a to c", 3)
    assert packet.summary.model == "fake/1" and packet.summary.created_at.seconds > 0
    assert [(m.content, m.position) for m in packet.messages] == [("d", 3), ("e", 4)]
    # The summary counts towards the packet and its limit.
    assert packet.token_count == 4 + 2
    tight = await store.load(scope(), 5)
    assert [m.content for m in tight.messages] == ["e"] and tight.token_count == 5
    assert tight.omitted_count == 1


async def test_next_summary_must_name_the_current_one(store: MemoryStore) -> None:
    await append_all(store, *"abcdef")
    await store.store_summary(scope(), summary("first", 2), 0)
    with pytest.raises(Aborted) as caught:
        await store.store_summary(scope(), summary("stale", 4), 0)
    assert caught.value.reason == "SUMMARY_CONFLICT"
    packet = await store.load(scope(), 100)
    assert packet.summary is not None and packet.summary.content == "first"
    assert [m.position for m in packet.messages] == [2, 3, 4, 5]

    await store.store_summary(scope(), summary("second", 4), 2)
    packet = await store.load(scope(), 100)
    assert packet.summary is not None and packet.summary.content == "second"
    assert [m.content for m in packet.messages] == ["e", "f"]


async def test_summary_cannot_cover_unwritten_messages(store: MemoryStore) -> None:
    await append_all(store, "a", "b")
    with pytest.raises(InvalidArgument, match="next position 2"):
        await store.store_summary(scope(), summary("too far", 3), 0)
    assert (await store.load(scope(), 100)).summary is None


@pytest.mark.parametrize(
    ("content", "through", "expected"),
    [("", 1, 0), ("   ", 1, 0), ("x" * (64 * 1024 + 1), 1, 0), ("ok", 1, 1), ("ok", 0, 0)],
    ids=["empty", "blank", "oversize", "not-past-expected", "zero"],
)
async def test_bad_summaries_are_rejected(
    store: MemoryStore, content: str, through: int, expected: int
) -> None:
    await append_all(store, "a", "b")
    with pytest.raises(InvalidArgument):
        await store.store_summary(scope(), summary(content, through), expected)
    packet = await store.load(scope(), 100)
    assert packet.summary is None and len(packet.messages) == 2


async def test_a_summary_that_alone_overflows_keeps_only_its_position(store: MemoryStore) -> None:
    await append_all(store, *"abc")
    await store.store_summary(scope(), summary("big", 2, tokens=50), 0)
    packet = await store.load(scope(), 10)
    assert packet.summary is not None
    assert (packet.summary.content, packet.summary.through_position) == ("", 2)
    assert packet.token_count == 1 and [m.content for m in packet.messages] == ["c"]


async def test_summary_covering_everything_leaves_an_empty_list_then_appends_continue(
    store: MemoryStore,
) -> None:
    await append_all(store, "a", "b")
    await store.store_summary(scope(), summary("all", 2), 0)
    await append_all(store, "c")
    packet = await store.load(scope(), 100)
    assert [(m.content, m.position) for m in packet.messages] == [("c", 2)]
    assert packet.next_position == 3


async def test_summary_keys_expire_and_clear_removes_them(
    store: MemoryStore, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    await append_all(store, *"abc")
    await store.store_summary(scope(), summary("ab", 2), 0)
    meta = f"{key_prefix}:memory:assistant:s-1:meta"
    assert 0 < await redis_client.ttl(meta) <= TTL_SECONDS
    assert await store.clear(scope())
    assert await redis_client.keys(f"{key_prefix}:*") == []
    packet = await store.load(scope(), 100)
    assert (packet.summary, packet.next_position) == (None, 0)


# --- concurrency ----------------------------------------------------------------------------


async def test_an_append_between_read_and_summary_is_kept(store: MemoryStore) -> None:
    await append_all(store, *"abcd")
    seen = await store.load(scope(), 100)  # a summarizer reads positions 0..3 ...
    await append_all(store, "late-1", "late-2")  # ... a task appends meanwhile ...
    await store.store_summary(scope(), summary("a-d", seen.next_position), 0)  # ... then it writes
    packet = await store.load(scope(), 100)
    assert [m.content for m in packet.messages] == ["late-1", "late-2"]
    assert packet.next_position == 6


async def test_appends_racing_summarizers_lose_nothing(store: MemoryStore) -> None:
    """20 writers append while two summarizers keep folding the oldest turns: every
    message ends up either stored or inside exactly one accepted summary."""
    writers, batches = 20, 5
    folded: list[str] = []
    done = asyncio.Event()
    conflicts = 0

    async def write(writer: int) -> None:
        for batch in range(batches):
            await store.append(scope(), [msg(f"w{writer}-b{batch}-{i}") for i in range(2)])
            await asyncio.sleep(0)

    async def summarize() -> None:
        nonlocal conflicts
        while not done.is_set():
            packet = await store.load(scope(), 1000)
            current = packet.summary.through_position if packet.summary else 0
            read = await store.read(scope(), current, 7)
            if read.messages:
                through = read.messages[-1].position + 1
                try:
                    await store.store_summary(scope(), summary("folded", through), current)
                except Aborted:
                    conflicts += 1
                else:
                    folded.extend(m.content for m in read.messages)
            await asyncio.sleep(0)

    summarizers = [asyncio.create_task(summarize()) for _ in range(2)]
    await asyncio.gather(*(write(w) for w in range(writers)))
    done.set()
    await asyncio.gather(*summarizers)

    packet = await store.load(scope(), 1000)
    stored = [m.content for m in packet.messages]
    expected = {f"w{w}-b{b}-{i}" for w in range(writers) for b in range(batches) for i in range(2)}
    assert folded, "the summarizers never folded while the writers wrote"
    assert len(folded) + len(stored) == len(expected)  # nothing twice ...
    assert set(folded) | set(stored) == expected  # ... and nothing lost
    assert packet.next_position == len(expected)
    through = packet.summary.through_position if packet.summary else 0
    assert [m.position for m in packet.messages] == list(range(through, len(expected)))


async def test_concurrent_summaries_one_wins_whole(store: MemoryStore) -> None:
    await append_all(store, *"abcdef")
    outcomes = await asyncio.gather(
        store.store_summary(scope(), summary("two", 2), 0),
        store.store_summary(scope(), summary("four", 4), 0),
        return_exceptions=True,
    )
    assert sum(isinstance(o, Aborted) for o in outcomes) == 1
    packet = await store.load(scope(), 100)
    assert packet.summary is not None
    winner = {"two": 2, "four": 4}[packet.summary.content]
    assert packet.summary.through_position == winner
    assert [m.position for m in packet.messages] == list(range(winner, 6))


# --- over gRPC ------------------------------------------------------------------------------


async def test_summary_rpcs_over_grpc(settings, channel_to) -> None:
    import grpc

    from agentplex.memory import app as memory_app
    from agentplex.runtime.errors import from_rpc_error
    from agentplex.v1 import memory_service_pb2 as pb
    from agentplex.v1 import memory_service_pb2_grpc as pb_grpc

    host = memory_app.build_host(settings, metrics_port=None)
    stub = pb_grpc.MemoryServiceStub(channel_to((await host.start()).address))
    try:
        await stub.AppendMessages(
            pb.AppendMessagesRequest(scope=scope(), messages=[msg(c) for c in "abcd"])
        )
        stored = await stub.StoreSummary(
            pb.StoreSummaryRequest(scope=scope(), summary=summary("a-b", 2))
        )
        assert (stored.removed_count, stored.message_count) == (2, 2)
        loaded = await stub.LoadContext(pb.LoadContextRequest(scope=scope()))
        assert loaded.summary.content == "a-b" and loaded.next_position == 4
        assert [(m.content, m.position) for m in loaded.messages] == [("c", 2), ("d", 3)]
        read = await stub.ReadMessages(
            pb.ReadMessagesRequest(scope=scope(), start_position=0, max_messages=10)
        )
        assert [m.position for m in read.messages] == [2, 3] and read.next_position == 4

        with pytest.raises(grpc.aio.AioRpcError) as stale:
            await stub.StoreSummary(
                pb.StoreSummaryRequest(scope=scope(), summary=summary("stale", 3))
            )
        assert stale.value.code() == grpc.StatusCode.ABORTED
        assert from_rpc_error(stale.value).reason == "SUMMARY_CONFLICT"
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.ReadMessages(pb.ReadMessagesRequest(scope=scope(), max_messages=0))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await host.stop()
